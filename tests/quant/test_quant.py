import copy

import pytest
import torch
from timm.layers import Attention

from smi.errors import SmiError
from smi.models.sparse import sparse_forward
from smi.quant import BaselineConfig, QuantConfig, RepQConfig, convert, prepare, quantize_
from smi.quant.modules import QuantAttention, QuantLinear
from smi.quant.quantizers import ActQuantizer, fake_quantize, quantize_weight
from tests.conftest import tiny_vit


def _x(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_prepared_model_computes_the_float_function():
    model = tiny_vit()
    ref = model(_x())
    prepare(model, BaselineConfig(w_bits=4, a_bits=4))
    assert isinstance(model.blocks[0].attn, QuantAttention) and isinstance(model.blocks[0].mlp.fc1, QuantLinear)
    assert isinstance(model.head, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), ref, atol=1e-5, rtol=1e-5)


def test_quant_attention_equals_timm_attention_before_rounding():
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    q = QuantAttention(copy.deepcopy(attn), BaselineConfig())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), attn(x), atol=1e-6, rtol=1e-5)


def test_weight_quantizer_is_symmetric_per_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.09, 0.05, -0.2]])
    q = quantize_weight(w, 3)  # qmax = 3 -> channel 0 step 1/3, channel 1 step 0.2/3
    torch.testing.assert_close(q[0], torch.tensor([1.0, -2 / 3, 1 / 3]))
    torch.testing.assert_close(q[1], torch.tensor([0.2 / 3, 0.2 / 3, -0.2]))


def test_act_quantizer_running_min_max():
    aq = ActQuantizer(8)
    aq.mode = "observe"
    aq(torch.tensor([0.5, 1.0]))
    aq(torch.tensor([-1.0, 0.2]))
    aq.freeze()
    assert aq.min_val.item() == -1.0 and aq.max_val.item() == 1.0
    torch.testing.assert_close(aq.scale, torch.tensor(2.0 / 255))
    assert aq(torch.tensor([0.0])).item() == 0.0  # zero is exactly representable
    assert aq(torch.tensor([5.0])).item() == pytest.approx(1.0, abs=aq.scale.item())  # clipped to the range


def test_fake_quantize_grid():
    x = torch.linspace(-1, 1, 101)
    y = fake_quantize(x, torch.tensor(0.25), torch.tensor(4.0), 0, 7)
    assert set(torch.round(y / 0.25).tolist()) <= set(range(-4, 4))


def test_w8a8_is_close_to_float_and_low_bits_are_not():
    model = tiny_vit()
    x = _x(16)
    with torch.no_grad():
        ref = model(x)
        errs = {}
        for bits in (8, 3):
            cfg = BaselineConfig(w_bits=bits, a_bits=bits)
            m = quantize_(copy.deepcopy(model), cfg, [_x(8, seed=1), _x(8, seed=2)])
            errs[bits] = ((m(x) - ref).norm() / ref.norm()).item()
    assert errs[8] < 0.05 and errs[3] > 2 * errs[8]


def test_quantized_model_runs_token_sparse():
    model = quantize_(tiny_vit(), BaselineConfig(w_bits=8, a_bits=8), [_x(4)])
    idx = torch.tensor([[0, 3, 5, 9]] * 2)
    with torch.no_grad():
        out = sparse_forward(model, _x(2), idx)
    assert out.logits.shape == (2, 5)


def test_convert_without_calibration_is_a_clear_error():
    model = prepare(tiny_vit(), BaselineConfig())
    with pytest.raises(RuntimeError, match="calibration"):
        convert(model)


@pytest.mark.parametrize("kwargs,match", [(dict(w_bits=1), "w_bits must be an integer from 2 to 8"),
                                          (dict(a_bits=9), "a_bits must be"), (dict(a_bits=True), "a_bits")])
def test_bad_config(kwargs, match):
    with pytest.raises(SmiError, match=match):
        RepQConfig(**kwargs)
    with pytest.raises(SmiError, match="unknown quantizer preset 'nope'"):
        QuantConfig.create("nope")
    with pytest.raises(SmiError, match="abstract"):
        QuantConfig()


@pytest.mark.parametrize("cls", [BaselineConfig, RepQConfig])
def test_configs_round_trip_through_json_and_old_folders_still_load(cls):
    import json

    from smi.quant import PRESETS

    cfg = cls(w_bits=4, a_bits=6)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["preset"] == cls.name and d["version"] == 1 and PRESETS.get(cls.name) is cls
    assert QuantConfig.from_dict(d) == cfg and type(QuantConfig.from_dict(d)) is cls
    legacy = {"w_bits": 4, "a_bits": 6, "quantizer": cls.name}  # what smi wrote before presets were types
    assert QuantConfig.from_dict(legacy) == cfg
    with pytest.raises(SmiError, match="newer"):
        QuantConfig.from_dict({**d, "version": 99})


def test_the_config_lives_in_the_wrapped_modules_not_on_the_model():
    from smi.quant import config_of

    model = quantize_(tiny_vit(), RepQConfig(w_bits=8, a_bits=8), [_x(4)])
    assert config_of(model) == RepQConfig(w_bits=8, a_bits=8)
    assert not hasattr(model, "smi_quant_config")
    with pytest.raises(SmiError, match="not quantized"):
        config_of(tiny_vit())


def test_cnn_gets_every_conv_and_linear_quantized():
    import timm

    from smi.quant.modules import QuantConv2d

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    x = torch.randn(8, 3, 32, 32)
    ref = model(x)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    q = quantize_(copy.deepcopy(model), BaselineConfig(w_bits=8, a_bits=8), [x])
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == convs
    assert isinstance(q.fc, QuantLinear)
    out = q(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert not torch.equal(out, ref)


def test_edge_bits_quantize_the_first_layer_and_the_head_on_their_own_grid():
    import timm

    from smi.quant.api import edge_layers
    from smi.quant.modules import QuantConv2d

    vit = tiny_vit()
    assert edge_layers(vit) == {"patch_embed.proj", "head"}
    cnn = timm.create_model("resnet10t", num_classes=5)
    assert edge_layers(cnn) == {"conv1.0", "fc"}  # timm's first_conv names the stem's Sequential: its first conv
    cfg = RepQConfig(w_bits=3, a_bits=3, edge_bits=8)
    assert cfg.at_edge() == RepQConfig(w_bits=8, a_bits=8, edge_bits=8) and cfg.label() == "W3A3 (edges 8)"
    assert RepQConfig(w_bits=3, a_bits=3).at_edge() == RepQConfig(w_bits=3, a_bits=3)
    assert "edge_bits" not in RepQConfig().to_dict()  # older folders and their configs compare equal
    x = _x(8)
    model = quantize_(tiny_vit(), cfg, [x])
    from smi.quant import config_of

    assert config_of(model) == cfg  # one config per model; the edges read their bits from it
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            bits = 8 if name in ("patch_embed.proj", "head") else 3
            assert m.w_bits == bits and m.input_quant.bits == bits, name
            # independent of the module: the cached weight sits on a symmetric grid of 2^(bits-1)-1 steps
            codes = m.weight_fq / m.weight_scale.view(-1, *[1] * (m.weight.dim() - 1))
            assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-3
    low = quantize_(tiny_vit(), RepQConfig(w_bits=3, a_bits=3), [x])
    ref = tiny_vit()(x)
    with torch.no_grad():  # 8-bit edges lose less of the float function than 3-bit ones
        assert (model(x) - ref).abs().mean() < (low(x) - ref).abs().mean()
    with pytest.raises(SmiError, match="edge_bits must be an integer from 2 to 8"):
        RepQConfig(edge_bits=9)
