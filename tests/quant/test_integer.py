"""The integer preset: BatchNorm folded, the quantization points an integer runtime has."""

import copy

import pytest
import timm
import torch
import torch.nn as nn

from smi.errors import SmiError
from smi.quant import QuantConfig, quantize_
from smi.quant.io import load_quantized, save_quantized
from smi.quant.presets.integer import IntegerConfig, OutputQuant, fold_batchnorm_
from smi.quant.quantizers import ActQuantizer
from tests.conftest import as_teacher, tiny_vit


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # running statistics and affine far from identity, so the fold has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_folding_batchnorm_leaves_the_function_unchanged():
    model = _resnet()
    folded = fold_batchnorm_(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, got = model(_x()), folded(_x())
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()


def _grid_error(x: torch.Tensor, q: ActQuantizer) -> float:
    """How far ``x`` is from ``q``'s integer grid (0 when every value is a code)."""
    codes = x / q.scale + q.zero_point
    return float((codes - codes.round()).abs().max())


def test_every_tensor_between_kernels_is_on_an_integer_grid():
    model = quantize_(_resnet(), IntegerConfig(w_bits=8, a_bits=4), [_x(8, seed=2)])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    seen = {}

    def grab(name):
        return lambda _m, inp, out: seen.__setitem__(name, (inp[0].detach(), out.detach()))

    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    for i, b in enumerate(blocks):
        b.register_forward_hook(grab(f"block{i}"))
    with torch.no_grad():
        model(_x(3, seed=5))
    stem_q = model.act1[1]
    # the first block's shortcut is its input, the stem's output after max pooling: on the stem's grid
    assert blocks[0].downsample is None and _grid_error(seen["block0"][0], stem_q) < 1e-3
    for i, b in enumerate(blocks):
        out_q = b.act2[1]
        assert isinstance(b.act2, OutputQuant) and isinstance(b.bn2, OutputQuant)  # after the add; before it
        assert _grid_error(seen[f"block{i}"][1], out_q) < 1e-3  # the block's output: add + ReLU, requantized
    n_quant = sum(isinstance(m, ActQuantizer) for m in model.modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in _resnet().modules())
    # conv and fc inputs + stem output + per block: branch end, block output (+ shortcut where it has one)
    expected = convs + 1 + 1 + sum(2 + (b.downsample is not None) for b in blocks)
    assert n_quant == expected


def test_integer_w8a8_stays_close_to_float_and_low_bits_do_not():
    model = _resnet()
    with torch.no_grad():
        ref = model(_x(16, seed=3))
    calib = [_x(16, seed=2)]
    q8 = quantize_(copy.deepcopy(model), IntegerConfig(w_bits=8, a_bits=8), calib)
    q3 = quantize_(copy.deepcopy(model), IntegerConfig(w_bits=3, a_bits=3), calib)
    with torch.no_grad():
        e8 = (q8(_x(16, seed=3)) - ref).norm() / ref.norm()
        e3 = (q3(_x(16, seed=3)) - ref).norm() / ref.norm()
    assert e8 < 0.05 and e3 > 2 * e8, (e8, e3)


def test_saved_integer_model_loads_back_identical(tmp_path):
    teacher = as_teacher(_resnet(), spec="resnet10t")
    model = quantize_(teacher.model, IntegerConfig(w_bits=4, a_bits=8), [_x(8, seed=2)])
    with torch.no_grad():
        ref = model(_x(4, seed=7))
    save_quantized(model, tmp_path / "q", teacher)
    again, meta = load_quantized(tmp_path / "q", as_teacher(_resnet(), spec="resnet10t"))
    assert meta["config"]["preset"] == "integer"
    with torch.no_grad():
        assert torch.equal(again(_x(4, seed=7)), ref)


def test_integer_preset_refuses_a_vit():
    assert isinstance(QuantConfig.create("integer", w_bits=4, a_bits=4), IntegerConfig)
    with pytest.raises(SmiError, match="for timm ResNets"):
        quantize_(tiny_vit(), IntegerConfig(), [_x(2)])
