"""Activation correction: the closed-form fit, the exact fold, and lower block errors against the float model."""

import copy

import numpy as np
import pytest
import torch

from smi.data.sources import NoiseSource
from smi.errors import SmiError
from smi.quant import RepQConfig, quantize_
from smi.quant.correct import _fold, affine_fit, correct_activations_
from smi.quant.io import load_quantized
from smi.quant.modules import QuantLinear
from smi.quant.pipeline import quantize_teacher
from tests.conftest import as_teacher, tiny_vit


def _smooth_images(n, seed):
    z = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(z, size=32, mode="bilinear", align_corners=False)


def test_affine_fit_is_least_squares_per_column():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 3, generator=gen)
    t = z * torch.tensor([0.8, 1.2, 3.0]) + torch.tensor([0.1, -0.2, 0.0]) + 0.05 * torch.randn(200, 3, generator=gen)
    a, c = affine_fit(z, t, scale_range=(-10.0, 10.0))
    for d in range(3):
        A = np.stack([z[:, d].double().numpy(), np.ones(200)], 1)
        (ra, rc), *_ = np.linalg.lstsq(A, t[:, d].double().numpy(), rcond=None)
        assert a[d].item() == pytest.approx(ra, rel=1e-4) and c[d].item() == pytest.approx(rc, abs=1e-4)
    a, c = affine_fit(z, t)  # clamped to [0.5, 1.5], bias refitted for the clamped scale
    assert a[2].item() == 1.5 and c[2].item() == pytest.approx((t[:, 2] - 1.5 * z[:, 2]).mean().item(), abs=1e-5)
    a, c = affine_fit(torch.ones(10, 1), torch.full((10, 1), 3.0))  # a constant column: shift only
    assert a.item() == 1.0 and c.item() == pytest.approx(2.0)


def test_fold_is_exact_and_keeps_the_integer_codes():
    model = tiny_vit()
    quantize_(model, RepQConfig(w_bits=4, a_bits=8), [_smooth_images(8, 0)])
    lin = model.blocks[0].mlp.fc2
    assert isinstance(lin, QuantLinear)
    x = torch.randn(5, lin.in_features)
    ref, codes = lin(x), lin.int_weight().clone()
    a = torch.linspace(0.6, 1.4, lin.out_features)
    c = torch.linspace(-0.1, 0.1, lin.out_features)
    _fold(lin, a, c)
    torch.testing.assert_close(lin(x), ref * a + c, rtol=1e-5, atol=1e-5)
    assert torch.equal(lin.int_weight(), codes)


def _stream(model, x):
    """The residual stream after the last block (before the final norm): what the corrections align."""
    with torch.no_grad():
        return model.blocks(model._pos_embed(model.patch_embed(x)))


def test_correction_lowers_every_branch_error_and_the_held_out_stream_error():
    fp = tiny_vit(depth=3)
    model = copy.deepcopy(fp)
    calib = [_smooth_images(16, 1)]
    quantize_(model, RepQConfig(w_bits=3, a_bits=4), calib)
    held_out = _smooth_images(64, 9)
    before = (_stream(model, held_out) - _stream(fp, held_out)).pow(2).mean().item()
    rows = correct_activations_(model, fp, calib)
    assert [r["unit"] for r in rows] == [f"blocks.{i}.{b}" for i in range(3) for b in ("attn.proj", "mlp.fc2")]
    assert all(r["error_after"] < r["error_before"] for r in rows)
    after = (_stream(model, held_out) - _stream(fp, held_out)).pow(2).mean().item()
    assert after < 0.95 * before
    with pytest.raises(SmiError, match="needs a quantized timm ViT"):
        correct_activations_(tiny_vit(), fp, calib)


def test_corrected_folder_reads_back_exactly(tmp_path):
    teacher = as_teacher(tiny_vit())
    res = quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), NoiseSource(), num_images=8, out=tmp_path / "q",
                           copy_model=True, correct_activations=True)
    assert len(res.correction) == 4
    loaded, meta = load_quantized(tmp_path / "q", copy.deepcopy(teacher))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x), res.model(x), rtol=0, atol=1e-6)
    assert meta["correct_activations"] is True


def test_correcting_all_layers_fits_the_inner_linears_to_the_float_outputs(tmp_path):
    fp = tiny_vit(depth=2)
    model = copy.deepcopy(fp)
    calib = [_smooth_images(16, 1)]
    quantize_(model, RepQConfig(w_bits=3, a_bits=4), calib)
    # by hand, block 0's qkv: its quantized output fitted per channel to the float qkv output (same images)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, k=k: seen.__setitem__(k, out.reshape(-1, out.shape[-1])))
             for k, m in (("q", model.blocks[0].attn.qkv), ("f", fp.blocks[0].attn.qkv))]
    with torch.no_grad():
        model(calib[0])
        fp(calib[0])
    for h in hooks:
        h.remove()
    a, c = affine_fit(seen["q"], seen["f"])
    expected = model.blocks[0].attn.qkv.bias.detach() * a + c
    rows = correct_activations_(model, fp, calib, layers="all")
    assert [r["unit"] for r in rows] == [f"blocks.{i}.{b}" for i in range(2)
                                         for b in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(r["error_after"] < r["error_before"] for r in rows)
    torch.testing.assert_close(model.blocks[0].attn.qkv.bias, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(SmiError, match="outputs, all"):
        correct_activations_(model, fp, calib, layers="inner")
    # the pipeline and its record: "all" is named, the default keeps the record it always had
    teacher = as_teacher(tiny_vit())
    res = quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), NoiseSource(), num_images=8, out=tmp_path / "q",
                           copy_model=True, correct_activations="all")
    assert len(res.correction) == 8
    _, meta = load_quantized(tmp_path / "q", copy.deepcopy(teacher))
    assert meta["correct_activations"] == "all"
    with pytest.raises(SmiError, match="outputs, all"):
        quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), NoiseSource(), num_images=8, out=tmp_path / "bad",
                         copy_model=True, correct_activations="inner")
    assert not (tmp_path / "bad").exists()
