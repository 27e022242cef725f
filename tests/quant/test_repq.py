import copy

import torch

from smi.models.loading import load_teacher
from smi.quant import RepQConfig, calibrate, convert, prepare
from smi.quant.io import load_quantized, save_quantized
from smi.quant.presets.repq import ln_linear_pairs, reparameterize_
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer, fake_quantize, mse_weight_scale, quantize_weight
from tests.conftest import tiny_vit
from tests.helpers import write_tiny_checkpoint

REPQ = RepQConfig(w_bits=4, a_bits=4)


def _x(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _calibrated(model=None):
    model = prepare(model or tiny_vit(), REPQ)
    with torch.no_grad():
        model(_x(8, 1))
    return model


def _set_modes(model, mode):
    for m in model.modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)):
            m.mode = mode


def test_reparameterized_model_computes_the_same_function_before_rounding():
    """With quantizers off, the folded model equals the float timm model it came from (non-trivial LN affine)."""
    float_model = tiny_vit()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # give the LayerNorms a non-trivial affine so the fold has something to do
        for blk in float_model.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
                norm.bias.copy_(0.6 * torch.rand(norm.bias.shape, generator=g) - 0.3)
        ref = float_model(_x())
    model = _calibrated(copy.deepcopy(float_model))
    reparameterize_(model)
    assert len(ln_linear_pairs(model)) == 4 and all(lin.role == "ln_out_reparameterized"
                                                     for _, lin in ln_linear_pairs(model))
    assert not torch.allclose(model.blocks[0].norm1.weight, float_model.blocks[0].norm1.weight)  # it did fold
    _set_modes(model, "off")
    for m in model.modules():
        if hasattr(m, "w_quant"):
            m.w_quant = False  # float weights (reparameterized)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), ref, atol=1e-4, rtol=1e-4)


def test_per_tensor_after_reparam_equals_per_channel_before():
    """With only the post-LayerNorm quantizers on, the folded per-tensor quantizer gives the per-channel result."""
    model = _calibrated()
    per_channel = copy.deepcopy(model)
    _set_modes(per_channel, "off")
    for _, lin in ln_linear_pairs(per_channel):
        lin.input_quant.freeze()  # per-channel, quant mode
    reparameterize_(model)
    _set_modes(model, "off")
    assert len(ln_linear_pairs(model)) == 4  # 2 blocks x (norm1 -> qkv, norm2 -> fc1)
    for _, lin in ln_linear_pairs(model):
        assert lin.input_quant.granularity == "tensor"
        lin.input_quant.mode = "quant"
    with torch.no_grad():
        a, b = model(_x()), per_channel(_x())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_log_sqrt2_levels():
    q = LogSqrt2Quantizer(4)
    q.mode = "observe"
    q(torch.tensor([0.2, 1.0]))
    q.freeze()
    out = q(torch.tensor([1.0, 0.5, 0.7071, 0.6, 1e-6]))
    torch.testing.assert_close(out[:3], torch.tensor([1.0, 0.5, 2 ** -0.5]), atol=1e-4, rtol=0)
    assert min(abs(out[3].item() - 0.5), abs(out[3].item() - 2**-0.5)) < 1e-6  # nearest level in log domain
    assert out[4].item() == 0.0  # below the smallest of the 16 levels (2^-7.5)


def test_per_head_quantizer_has_one_scale_per_head():
    aq = ActQuantizer(8, granularity="head")
    aq.mode = "observe"
    x = torch.randn(2, 3, 5, 4) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    aq(x)
    aq.freeze()
    assert aq.scale.shape == (3,) and aq.scale[0] < aq.scale[1] < aq.scale[2]


def test_mse_weight_scale_is_never_worse_than_min_max():
    w = torch.randn(16, 64)
    w[0, 0] = 12.0  # an outlier makes min-max waste levels
    s, qmin, qmax = mse_weight_scale(w, 4)
    mse = (torch.clamp(torch.round(w / s), qmin, qmax) * s - w).pow(2).sum(1)
    minmax = (quantize_weight(w, 4) - w).pow(2).sum(1)
    assert torch.all(mse <= minmax + 1e-6) and mse[0] < minmax[0]


def test_repq_save_load_round_trip(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    teacher = load_teacher(str(path))
    model = prepare(teacher.model, REPQ)
    calibrate(model, [_x(8, 2)])
    convert(model)
    with torch.no_grad():
        ref = model(_x())
    save_quantized(model, tmp_path / "q", teacher)
    again, _ = load_quantized(tmp_path / "q", load_teacher(str(path)))
    with torch.no_grad():
        torch.testing.assert_close(again(_x()), ref, rtol=0, atol=0)


def test_dfq_sams_scale_reparameterization_is_repqs_fold_and_covers_the_segmenter():
    """DFQ-SAM's scale reparameterization of post-LayerNorm activations is RepQ-ViT's: on the segmenter every block's
    two LayerNorm -> Linear pairs fold, the float function is unchanged, and the folded per-tensor quantizer gives the
    per-channel integers, per pixel of the output."""
    import timm

    torch.manual_seed(0)
    seg = timm.create_model("fmnist_scene_segmenter", embed_dim=32, depth=2, num_heads=1).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in seg.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
                norm.bias.copy_(0.6 * torch.rand(norm.bias.shape, generator=g) - 0.3)
    x = torch.randn(4, 1, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = seg(x)
        model = prepare(copy.deepcopy(seg), REPQ)
        model(torch.randn(8, 1, 56, 56, generator=torch.Generator().manual_seed(2)))
    per_channel = copy.deepcopy(model)
    _set_modes(per_channel, "off")
    for _, lin in ln_linear_pairs(per_channel):
        lin.input_quant.freeze()
    reparameterize_(model)
    assert len(ln_linear_pairs(model)) == 4 and all(lin.input_quant.granularity == "tensor"
                                                     for _, lin in ln_linear_pairs(model))
    float_folded = copy.deepcopy(model)
    _set_modes(float_folded, "off")
    for m in float_folded.modules():
        if hasattr(m, "w_quant"):
            m.w_quant = False
    _set_modes(model, "off")
    for _, lin in ln_linear_pairs(model):
        lin.input_quant.mode = "quant"
    with torch.no_grad():
        torch.testing.assert_close(float_folded(x), ref, atol=1e-4, rtol=1e-4)
        out = model(x)
        assert out.shape == (4, 2, 56, 56)
        torch.testing.assert_close(out, per_channel(x), atol=1e-4, rtol=1e-3)


def test_in_place_inference_paths_are_bit_equal_to_the_formulas():
    # evaluation runs the quantizers in place (no autograd); it must give exactly what the plain formulas give
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 9, generator=g) * 3
    s, z = torch.tensor(0.11), torch.tensor(5.0)
    expected = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
    assert torch.equal(fake_quantize(x, s, z, 0, 15), expected)
    xg = x.clone().requires_grad_()
    assert torch.equal(fake_quantize(xg, s, z, 0, 15).detach(), expected)  # the autograd path agrees
    q = LogSqrt2Quantizer(4)
    q.mode = "observe"
    p = torch.rand(2, 3, 11, 11, generator=g).softmax(-1)
    q(p)
    q.freeze()
    k = torch.round(-2 * torch.log2((p / q.scale).clamp_min(1e-30)))
    ref = torch.where(k > 15, torch.zeros_like(p), q.scale * torch.pow(2.0, -k.clamp(0, 15) / 2))
    assert torch.equal(q(p), ref)
    pg = p.clone().requires_grad_()
    out = q(pg)
    assert torch.equal(out.detach(), ref)
    out.sum().backward()
    assert torch.equal(pg.grad, torch.ones_like(p))  # straight-through
