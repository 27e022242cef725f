"""Rotation (QuaRot-style, folded into the weights): the float function is unchanged, the residual stream and
each head's queries and keys are rotated as stated, and quantizing the rotated model loses less."""

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from smi.data.sources import NoiseSource
from smi.errors import SmiError
from smi.quant import BaselineConfig, QuantConfig, RepQConfig, quantize_
from smi.quant.io import load_quantized
from smi.quant.pipeline import quantize_teacher
from smi.quant.qat import QatConfig, _block_features
from smi.quant.rotate import is_rotated, residual_rotation, rotate_, rotation_matrix
from tests.conftest import as_teacher, tiny_vit


def _perturbed(model):
    """A model whose LayerNorm affines, LayerScales and biases are not at their init (so folding them matters)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("n", [8, 12, 20, 48])
@pytest.mark.parametrize("keep_ones", [False, True])
def test_rotation_matrix_is_orthogonal_and_keeps_the_ones_direction(n, keep_ones):
    q = rotation_matrix(n, torch.Generator().manual_seed(0), keep_ones=keep_ones)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    if keep_ones:
        torch.testing.assert_close(q @ torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))
    assert not torch.allclose(q.abs(), torch.eye(n, dtype=torch.float64))  # not a signed permutation


@pytest.mark.parametrize("n", [1, 2, 12, 64, 96, 192, 768])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitudes(n):
    from smi.quant.rotate import _hadamard

    h = _hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    assert torch.all(h[:, 0] == h[0, 0])  # a constant first column: what keep_ones relies on
    assert _hadamard(20) is None and _hadamard(6) is None  # no construction here: random orthogonal instead


@pytest.mark.parametrize("kwargs", [
    {},  # power-of-two widths: Hadamard
    {"embed_dim": 48, "num_heads": 4},  # 48 and 12: Paley's Hadamard matrix doubled
    {"embed_dim": 40, "num_heads": 4},  # 40 and 10: random orthogonal
    {"init_values": 0.5},  # LayerScale
    {"class_token": True, "reg_tokens": 2},
    {"global_pool": "avg", "fc_norm": True},  # the head reads fc_norm, not norm
])
def test_rotation_keeps_the_float_function(kwargs):
    model = _perturbed(tiny_vit(**kwargs))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        rotated = rotate_(copy.deepcopy(model))
        out = rotated(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    changed = [n for n, p in rotated.state_dict().items() if not torch.allclose(p, model.state_dict()[n])]
    assert any("qkv.weight" in n for n in changed) and any("pos_embed" in n for n in changed)
    assert set(rotated.state_dict()) == set(model.state_dict())  # the same layers: exports and loads read them


def test_block_outputs_are_the_float_ones_times_q_and_attention_is_unchanged():
    model = _perturbed(tiny_vit(depth=3))
    rotated = rotate_(copy.deepcopy(model))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = {}
    for tag, m in (("f", model), ("r", rotated)):
        for i, blk in enumerate(m.blocks):
            blk.register_forward_hook(lambda mod, a, o, key=(tag, i): seen.__setitem__(key, o.detach().double()))
            blk.attn.qkv.register_forward_hook(lambda mod, a, o, key=(tag, i, "qkv"): seen.__setitem__(key, o.detach()))
        with torch.no_grad():
            m(x)
    q = residual_rotation(model.embed_dim)
    for i in range(3):
        torch.testing.assert_close(seen["r", i], seen["f", i] @ q, rtol=1e-4, atol=1e-5)
        attn = []
        for tag in "fr":  # the attention each head computes, from its queries and keys
            B, N, _ = seen[tag, i, "qkv"].shape
            qkv = seen[tag, i, "qkv"].reshape(B, N, 3, 2, -1).permute(2, 0, 3, 1, 4)
            attn.append((qkv[0] @ qkv[1].transpose(-2, -1)).softmax(-1))
        torch.testing.assert_close(attn[1], attn[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(seen["r", i, "qkv"], seen["f", i, "qkv"], atol=1e-3)  # the operands did turn


def test_rotating_twice_or_a_copy_does_nothing_more():
    model = rotate_(_perturbed(tiny_vit()))
    state = copy.deepcopy(model.state_dict())
    twin = copy.deepcopy(model)
    assert is_rotated(twin)
    for m in (model, twin):
        rotate_(m)
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k


def _outlier_vit():
    """A tiny ViT whose residual stream has two outlier channels (as trained ViTs' have), so every LayerNorm's
    output has them too."""
    model = _perturbed(tiny_vit(depth=2))
    with torch.no_grad():
        model.pos_embed[..., :2] += 20.0
        model.cls_token[..., :2] += 20.0
    return model


def _smooth_images(n, seed):
    z = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(z, size=32, mode="bilinear", align_corners=False)


def _outlier_queries():
    """A tiny ViT whose first query channel of every head is 10x and key channel 0.1x (the same attention): one
    outlier channel per head for the per-head query/key quantizers of repq."""
    model = _perturbed(tiny_vit(depth=2))
    with torch.no_grad():
        for blk in model.blocks:
            d, hd = model.embed_dim, blk.attn.head_dim
            for h in range(blk.attn.num_heads):
                for part, factor in ((0, 10.0), (1, 0.1)):
                    row = part * d + h * hd
                    blk.attn.qkv.weight[row] *= factor
                    blk.attn.qkv.bias[row] *= factor
    return model


@pytest.mark.parametrize(("make", "config"), [(_outlier_vit, BaselineConfig(w_bits=4, a_bits=4)),
                                              (_outlier_queries, RepQConfig(w_bits=4, a_bits=4))])
def test_rotation_lowers_the_quantization_error_of_a_model_with_outlier_channels(make, config):
    model = make()
    calib, held = _smooth_images(16, 0), _smooth_images(32, 1)
    with torch.no_grad():
        ref = model(held)
    errors = {}
    for rotate in (False, True):
        cfg = QuantConfig.create(config.name, w_bits=4, a_bits=4, rotate=rotate)
        q = quantize_(copy.deepcopy(model), cfg, [calib])
        with torch.no_grad():
            errors[rotate] = (q(held) - ref).pow(2).mean().item()
    assert errors[True] < 0.5 * errors[False], errors


def test_a_rotated_quantized_model_saves_and_loads(tmp_path):
    teacher = as_teacher(_perturbed(tiny_vit()))
    cfg = RepQConfig(w_bits=4, a_bits=4, rotate=True)
    res = quantize_teacher(teacher, cfg, NoiseSource(), num_images=8, out=tmp_path / "q", copy_model=True)
    assert not is_rotated(teacher.model)  # the teacher stays the float model it was
    x = _smooth_images(4, 3)
    fresh = as_teacher(_perturbed(tiny_vit()))
    loaded, meta = load_quantized(tmp_path / "q", fresh)
    assert meta["config"]["rotate"] is True and QuantConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x))
    assert cfg.label() == "W4A4 rotated"
    assert "rotate" not in RepQConfig(w_bits=4, a_bits=4).to_dict()  # older folders' configs read back unchanged


def test_reconstruction_and_correction_compare_against_the_rotated_float_model():
    from smi.quant.reconstruct import _float_twin  # the float reference of both (correct.py imports it)

    model = _perturbed(tiny_vit())
    q = quantize_(copy.deepcopy(model), RepQConfig(w_bits=4, a_bits=4, rotate=True), [_smooth_images(8, 0)])
    twin = _float_twin(q, model)
    assert is_rotated(twin) and not is_rotated(model)
    x, seen = _smooth_images(3, 4), {}
    for tag, m in (("f", model), ("t", twin)):
        m.blocks[0].register_forward_hook(lambda mod, a, o, key=tag: seen.__setitem__(key, o.detach().double()))
        with torch.no_grad():
            m(x)
    torch.testing.assert_close(seen["t"], seen["f"] @ residual_rotation(model.embed_dim), rtol=1e-4, atol=1e-5)


def test_the_qat_feature_term_compares_in_the_rotated_basis():
    model = _perturbed(tiny_vit())
    x = _smooth_images(4, 5)
    losses = {}
    for rotate in (False, True):
        q = quantize_(copy.deepcopy(model), RepQConfig(w_bits=8, a_bits=8, rotate=rotate), [_smooth_images(8, 0)])
        q.train()
        with _block_features(model, q, QatConfig(feature_loss="mse")) as loss, torch.no_grad():
            model(x)
            q(x)
            losses[rotate] = loss().item()
    # an 8-bit model is close to its float blocks in either case; without turning the teacher's features the
    # rotated one would be compared with vectors in another basis
    assert losses[True] < 2 * losses[False] + 1e-4, losses


def test_rotation_is_refused_where_it_cannot_be_exact():
    import timm

    cnn = timm.create_model("resnet10t", num_classes=3).eval()
    with pytest.raises(SmiError, match="needs a plain pre-norm timm ViT"):
        quantize_(cnn, BaselineConfig(w_bits=8, a_bits=8, rotate=True), [torch.randn(2, 3, 32, 32)])
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, qk_norm=True).eval()
    with pytest.raises(SmiError, match="block 0"):
        rotate_(vit)
    with pytest.raises(SmiError, match="rotate"):
        RepQConfig(w_bits=4, a_bits=4, rotate="yes")
