"""Learnable quantization and block reconstruction, checked against independent computations."""

import copy

import pytest
import timm
import torch

from smi.errors import SmiError
from smi.quant import BaselineConfig, RepQConfig, quantize_
from smi.quant.learn import AdaRound, lsq_fake_quantize, lsq_grad_factor, round_ste
from smi.quant.modules import QuantLinear
from smi.quant.quantizers import ActQuantizer, fake_quantize
from smi.quant.reconstruct import ReconstructConfig, reconstruct_, reconstruction_units
from tests.conftest import as_teacher, tiny_vit


def _images(n=16, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _smooth_images(n, seed):
    """Image-like inputs: neighbouring pixels correlate (on white noise, nearest rounding is already optimal)."""
    z = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(z, size=32, mode="bilinear", align_corners=False)


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.2, 0.7, -1.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 1.0, -1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_lsq_gradient_matches_the_formula():
    # LSQ (Esser et al. 2020), symmetric: dq/ds = round(x/s) - x/s inside the range, qmin or qmax where clipped,
    # times g = 1/sqrt(N * qmax); dq/dx = 1 inside, 0 outside
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(200, generator=gen) * 2).requires_grad_(True)
    upstream = torch.randn(200, generator=gen)
    s = torch.tensor(0.3, requires_grad=True)
    qmin, qmax = -7, 7
    g = lsq_grad_factor(x.numel(), qmax)
    y = lsq_fake_quantize(x, s, torch.tensor(0.0), qmin, qmax, g)
    torch.testing.assert_close(y, fake_quantize(x.detach(), s.detach(), torch.tensor(0.0), qmin, qmax))
    (y * upstream).sum().backward()

    v = (x.detach() / s.detach()).numpy()
    u = upstream.numpy()
    ds = sum(ui * (qmin if vi <= qmin else qmax if vi >= qmax else round(float(vi)) - vi)
             for vi, ui in zip(v, u, strict=True))
    assert s.grad.item() == pytest.approx(float(ds) * g, rel=1e-4)
    inside = torch.from_numpy((v > qmin) & (v < qmax))
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert g == pytest.approx(1 / (200 * 7) ** 0.5)


def test_act_quantizer_learnable_keeps_function_and_state_keys():
    aq = ActQuantizer(4, granularity="channel")
    aq.mode = "observe"
    x = torch.randn(64, 8)
    aq(x)
    aq.freeze()
    ref, keys = aq(x), set(aq.state_dict())
    aq.learnable_(True)
    assert {n for n, _ in aq.named_parameters()} == {"scale", "zero_point"}
    torch.testing.assert_close(aq(x), ref)
    aq(x).pow(2).sum().backward()
    assert aq.scale.grad is not None and torch.all(torch.isfinite(aq.scale.grad))
    aq.learnable_(False)
    assert not list(aq.parameters()) and set(aq.state_dict()) == keys
    torch.testing.assert_close(aq(x), ref)


def test_adaround_starts_at_the_float_weight_and_regularizer_formula():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen) * 0.1
    s = torch.full((6, 1), 0.02)
    r = AdaRound(w, s)
    soft = r(w, s, -127, 127)
    torch.testing.assert_close(soft, w, atol=2e-6, rtol=0)  # h(alpha) = fractional part of w/s
    h = (torch.sigmoid(r.alpha) * 1.2 - 0.1).clamp(0, 1)
    for beta in (20.0, 2.0):
        torch.testing.assert_close(r.regularizer(beta), (1 - (2 * h - 1).abs() ** beta).sum())
    with torch.no_grad():
        r.alpha.copy_(torch.where(torch.rand(6, 5, generator=gen) > 0.5, 10.0, -10.0))  # h saturated at 0 or 1
    assert r.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)
    hard = r.hard_weight(w, s, -127, 127) / s
    assert torch.equal(hard, hard.round())
    assert torch.all((hard == torch.floor(w / s)) | (hard == torch.floor(w / s) + 1))  # only up or down


def test_finish_rounding_puts_the_weight_on_the_grid():
    lin = QuantLinear(torch.nn.Linear(5, 4), BaselineConfig(w_bits=3, a_bits=8))
    lin.convert_weight()
    lin.start_rounding()
    with torch.no_grad():
        lin.weight_rounding.alpha.normal_()
    expected = lin.weight_rounding.hard_weight(lin.weight, lin.weight_scale, lin.w_qmin, lin.w_qmax)
    lin.finish_rounding()
    assert not hasattr(lin, "weight_rounding")
    torch.testing.assert_close(lin.weight.detach(), expected)
    torch.testing.assert_close(lin.qweight(), expected)
    torch.testing.assert_close(lin.int_weight().float() * lin.weight_scale, expected)


def test_reconstruction_units_in_forward_order():
    vit = tiny_vit()
    quantize_(vit, BaselineConfig(w_bits=4, a_bits=4), [_images(4)])
    assert reconstruction_units(vit) == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    cnn = timm.create_model("resnet10t", num_classes=5).eval()
    quantize_(cnn, BaselineConfig(w_bits=4, a_bits=4), [_images(2)])
    units = reconstruction_units(cnn)
    assert units[0] == "conv1.0" and units[-1] == "fc" and "layer1.0" in units and "layer4.0" in units


def _errors(model, fp, x):
    """Feature error after the last block (the random head of a test model gives near-zero logits)."""
    with torch.no_grad():
        return (model.forward_features(x) - fp.forward_features(x)).pow(2).sum(-1).mean().item()


@pytest.mark.slow  # end to end, 15-30 s: make test-all (CI) runs it
@pytest.mark.parametrize("config", [BaselineConfig(w_bits=3, a_bits=8), RepQConfig(w_bits=3, a_bits=6)])
def test_reconstruction_lowers_every_unit_error_and_the_output_error(config):
    fp = tiny_vit()
    x = _smooth_images(256, 0)  # more rows than each block has weights: the learned rounding generalizes
    plain = quantize_(copy.deepcopy(fp), config, [x])
    model = quantize_(copy.deepcopy(fp), config, [x])
    rows = reconstruct_(model, fp, x.split(64), ReconstructConfig(iterations=300))
    assert [r["unit"] for r in rows] == reconstruction_units(model)
    for r in rows:
        assert r["error_after"] <= r["error_before"], r
        if r["unit"].startswith("blocks."):
            assert r["reconstructed"] and r["error_after"] < r["error_before"], r
    held_out = _smooth_images(64, 1)
    assert _errors(model, fp, held_out) < 0.8 * _errors(plain, fp, held_out)
    assert not [n for n, _ in model.named_parameters() if "alpha" in n]  # the rounding state is gone
    assert not any(isinstance(m, ActQuantizer) and m.drop_prob for m in model.modules())


def test_reconstructed_model_saves_and_loads_bit_exactly(tmp_path):
    from smi.quant.io import load_quantized, save_quantized

    fp = tiny_vit()
    x = _images(16)
    teacher = as_teacher(copy.deepcopy(fp))
    model = quantize_(teacher.model, RepQConfig(w_bits=4, a_bits=4), [x])
    reconstruct_(model, fp, [x], ReconstructConfig(iterations=20))
    save_quantized(model, tmp_path / "q", teacher)
    loaded, _ = load_quantized(tmp_path / "q", as_teacher(copy.deepcopy(fp)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_reconstruction_reads_sparse_batches():
    from smi.quant.api import calibration_forward

    fp = tiny_vit()
    x = _images(8)
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[:, :6] = True  # every image keeps 6 of its 16 patches
    model = copy.deepcopy(fp)
    quantize_(model, BaselineConfig(w_bits=4, a_bits=4), [(x, masks)])
    rows = reconstruct_(model, fp, [(x, masks)], ReconstructConfig(iterations=10), forward=calibration_forward)
    assert all(r["error_after"] <= r["error_before"] * 1.5 for r in rows)


def test_prediction_term_is_the_kl_through_the_rest_of_the_float_model():
    # PD-Quant's term for the last block: its output through the float model's norm and head (timm's own
    # forward_head, not the hook path), KL from the float prediction on the same rows
    from smi.quant.api import calibration_logits
    from smi.quant.reconstruct import _Prediction

    fp = tiny_vit()
    torch.nn.init.normal_(fp.head.weight, std=0.5)  # a random test head gives near-zero logits otherwise
    x = _images(8)
    rows = torch.tensor([1, 4, 6])
    with torch.no_grad():
        target = torch.log_softmax(fp(x[rows]), -1)
        clean = fp.blocks[1](fp.blocks[0](fp._pos_embed(fp.patch_embed(x[rows]))))
    out = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    predict = _Prediction(fp, fp.blocks[1], [x], calibration_logits)
    got = predict(0, rows, out)
    pred = torch.log_softmax(fp.forward_head(fp.norm(out)), -1)
    expected = (target.exp() * (target - pred)).sum(-1).mean()
    torch.testing.assert_close(got, expected)
    assert predict(0, rows, clean).item() < 1e-5  # the float block's own output predicts exactly
    got.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_reconstruction_with_the_prediction_term_leaves_the_float_model_alone():
    from smi.quant.api import calibration_forward

    fp = tiny_vit()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    x = _images(8)
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[:, :6] = True
    model = copy.deepcopy(fp)
    quantize_(model, BaselineConfig(w_bits=4, a_bits=4), [(x, masks)])
    rows = reconstruct_(model, fp, [(x, masks)], ReconstructConfig(iterations=10, prediction_weight=1.0))
    assert all(r["error_after"] <= r["error_before"] for r in rows)
    assert all(torch.equal(v, before[k]) for k, v in fp.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in fp.parameters())
    with pytest.raises(SmiError, match="logits"):
        reconstruct_(model, fp, [x], ReconstructConfig(iterations=1, prediction_weight=1.0),
                     forward=calibration_forward)


def test_reconstruct_config_refuses_bad_values():
    for bad in ({"iterations": 0}, {"batch_size": -1}, {"lr": float("nan")}, {"drop_prob": 1.0}, {"warmup": -0.1},
                {"prediction_weight": -1.0}):
        with pytest.raises(SmiError):
            ReconstructConfig(**bad)


def test_reconstruct_config_records_the_prediction_term_only_when_on():
    # folders and benchmark caches written before the term existed still match the default settings
    assert "prediction_weight" not in ReconstructConfig().to_dict()
    assert ReconstructConfig(prediction_weight=2.0).to_dict()["prediction_weight"] == 2.0


def test_reconstruct_refuses_an_unquantized_model():
    with pytest.raises(SmiError, match="no quantized units"):
        reconstruct_(tiny_vit(), tiny_vit(), [_images(2)])


class _Killed(Exception):
    pass


def _dies_at_unit(n, real):
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise _Killed
        return real(*args, **kwargs)

    return fake


def test_reconstruction_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import smi.quant.reconstruct as rec
    from smi.quant.pipeline import quantize_teacher

    def run(out):
        teacher = as_teacher(tiny_vit())
        return quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), "noise", num_images=8, out=out,
                                reconstruct=ReconstructConfig(iterations=15))

    whole = run(tmp_path / "whole")
    real = rec._reconstruct_unit
    monkeypatch.setattr(rec, "_reconstruct_unit", _dies_at_unit(3, real))
    with pytest.raises(_Killed):
        run(tmp_path / "cut")
    cut = tmp_path / "cut"
    assert (cut / "reconstruct.safetensors").exists() and not (cut / "quantized.json").exists()
    monkeypatch.setattr(rec, "_reconstruct_unit", real)
    resumed = run(tmp_path / "cut")
    assert [r["unit"] for r in resumed.reconstruction] == [r["unit"] for r in whole.reconstruction]
    a, b = load_file(tmp_path / "whole" / "quantized.safetensors"), load_file(cut / "quantized.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "reconstruct.safetensors").exists()  # the checkpoint goes once the model is saved


def test_reconstruction_with_other_settings_is_refused_midway(tmp_path, monkeypatch):
    import smi.quant.reconstruct as rec
    from smi.quant.pipeline import quantize_teacher

    monkeypatch.setattr(rec, "_reconstruct_unit", _dies_at_unit(2, rec._reconstruct_unit))
    teacher = as_teacher(tiny_vit())
    with pytest.raises(_Killed):
        quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), "noise", num_images=4, out=tmp_path / "q",
                         reconstruct=ReconstructConfig(iterations=5))
    with pytest.raises(SmiError, match="unfinished reconstruction with other settings"):
        quantize_teacher(as_teacher(tiny_vit()), RepQConfig(w_bits=4, a_bits=4), "noise", num_images=4,
                         out=tmp_path / "q", reconstruct=ReconstructConfig(iterations=6))


def test_overwriting_a_reconstruction_keeps_a_users_files(tmp_path, monkeypatch):
    import smi.quant.reconstruct as rec
    from smi.quant.pipeline import quantize_teacher

    real = rec._reconstruct_unit
    monkeypatch.setattr(rec, "_reconstruct_unit", _dies_at_unit(2, real))
    with pytest.raises(_Killed):
        quantize_teacher(as_teacher(tiny_vit()), RepQConfig(w_bits=4, a_bits=4), "noise", num_images=4,
                         out=tmp_path / "q", reconstruct=ReconstructConfig(iterations=5))
    monkeypatch.setattr(rec, "_reconstruct_unit", real)
    (tmp_path / "q" / "notes.txt").write_text("the user's own")
    quantize_teacher(as_teacher(tiny_vit()), RepQConfig(w_bits=4, a_bits=4), "noise", num_images=4,
                     out=tmp_path / "q", overwrite=True, reconstruct=ReconstructConfig(iterations=6))
    assert (tmp_path / "q" / "notes.txt").read_text() == "the user's own"
    assert (tmp_path / "q" / "quantized.json").exists() and not (tmp_path / "q" / "reconstruct.safetensors").exists()


def test_lsq_step_size_gradient_does_not_depend_on_the_batch_size():
    """LSQ's N is the number of features per sample: a batch of two copies of a sample gives exactly twice the
    step-size gradient of the sample alone (with N counting the batch, it would be sqrt(2) times)."""
    aq = ActQuantizer(4)
    aq.mode = "observe"
    x = torch.randn(1, 6, 8)
    aq(x)
    aq.freeze()
    aq.learnable_(True)
    grads = []
    for batch in (x, torch.cat([x, x])):
        aq.scale.grad = None
        aq(batch).sum().backward()
        grads.append(aq.scale.grad.item())
    assert grads[1] == pytest.approx(2 * grads[0], rel=1e-5)
