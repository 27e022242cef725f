"""Quantization-aware training: what learns, that it learns, and that its folder reads back."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import smi.runner as runner_mod
from smi.data.sources import NoiseSource, PoolSource
from smi.errors import SmiError
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.synthesis import synthesize
from smi.quant import RepQConfig
from smi.quant.calibration import calibration_set
from smi.quant.io import load_quantized
from smi.quant.pipeline import quantize_teacher
from smi.quant.qat import QatConfig, learnable_quant_, qat
from smi.quant.quantizers import LogSqrt2Quantizer
from tests.conftest import as_teacher, tiny_vit

SPARSE = InversionConfig(iterations=6, batch_size=4, sparsity=SparsityConfig.parse("2:0.5,4:0.5"))


@pytest.fixture
def sparse_pool(tiny_teacher, tmp_path):
    return synthesize(tiny_teacher, SPARSE, 8, tmp_path / "pool", progress=False, grid=False).folder


@pytest.fixture
def quantized(tiny_teacher, tmp_path):
    """The tiny teacher at W3A3 (repq), calibrated on noise: far from its float function, so QAT has work."""
    quantize_teacher(tiny_teacher, RepQConfig(w_bits=3, a_bits=3), NoiseSource(), num_images=16,
                     out=tmp_path / "q", copy_model=True)
    return tmp_path / "q"


def _kl(teacher, model, x):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(teacher.model(x), 1), reduction="batchmean",
                        log_target=True).item()


def test_log_quantizer_passes_the_gradient_straight_through():
    q = LogSqrt2Quantizer(3)
    q.mode = "observe"
    x = torch.rand(4, 6).softmax(-1)
    q(x)
    q.freeze()
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    torch.testing.assert_close(y, q(x), rtol=0, atol=1e-7)  # the same values as without a gradient
    (y * torch.arange(24.0).view(4, 6)).sum().backward()
    torch.testing.assert_close(xg.grad, torch.arange(24.0).view(4, 6))


def test_learnable_keeps_function_keys_and_trains_every_step_size(tiny_teacher, quantized):
    model, _ = load_quantized(quantized, copy.deepcopy(tiny_teacher))
    x = torch.randn(4, 3, 32, 32)
    ref, keys = model(x), set(model.state_dict())
    learnable_quant_(model, True).requires_grad_(True)
    torch.testing.assert_close(model(x), ref)
    names = {n for n, _ in model.named_parameters()}
    assert any(n.endswith("input_quant.scale") for n in names) and any(n.endswith("weight_scale") for n in names)
    model(x).sum().backward()
    scales = [p for n, p in model.named_parameters() if n.endswith(("weight_scale", ".scale"))]
    assert all(p.grad is not None for p in scales)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # reached through the STE
    learnable_quant_(model, False)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), ref)


def test_qat_brings_the_quantized_model_closer_to_its_float_teacher(tiny_teacher, quantized, tmp_path):
    held_out = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    before, _ = load_quantized(quantized, copy.deepcopy(tiny_teacher))
    teacher_state = {k: v.clone() for k, v in tiny_teacher.model.state_dict().items()}
    res = qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "qat",
              QatConfig(epochs=3, steps_per_epoch=20, batch_size=16, lr=1e-3), eval_data=None, progress=False)
    assert _kl(tiny_teacher, res.model, held_out) < 0.7 * _kl(tiny_teacher, before, held_out)
    assert all(torch.equal(v, tiny_teacher.model.state_dict()[k]) for k, v in teacher_state.items())
    # the folder reads back as a quantized model computing exactly what was trained
    loaded, meta = load_quantized(tmp_path / "qat", copy.deepcopy(tiny_teacher))
    torch.testing.assert_close(loaded(held_out), res.model(held_out), rtol=0, atol=1e-6)
    assert meta["qat"]["epochs"] == 3 and meta["calibration"]["source"] == "noise"


def test_sparse_pool_reaches_both_models_as_kept_patches(tiny_teacher, quantized, sparse_pool, tmp_path):
    res = qat(tiny_teacher, quantized, PoolSource(sparse_pool), tmp_path / "qat",
              QatConfig(epochs=1, steps_per_epoch=2, batch_size=4), eval_data=None, progress=False)
    assert res.log[0]["images"] == 8 and torch.isfinite(torch.tensor(res.log[0]["loss"]))


def test_refilled_pool_resumes_exactly_and_is_not_the_plain_pool(tiny_teacher, quantized, sparse_pool, tmp_path,
                                                                  monkeypatch):
    from smi.inversion.background import FilledPoolSource

    source = FilledPoolSource(str(sparse_pool), background=0.25, refill=True)
    cfg = QatConfig(epochs=2, steps_per_epoch=2, batch_size=4, lr=1e-3)
    full = qat(tiny_teacher, quantized, source, tmp_path / "full", cfg, eval_data=None, progress=False)
    real_save = runner_mod.save_checkpoint

    def dies_in_epoch_2(*args, **kwargs):
        if dies_in_epoch_2.calls == 1:
            raise KeyboardInterrupt
        dies_in_epoch_2.calls += 1
        return real_save(*args, **kwargs)

    dies_in_epoch_2.calls = 0
    monkeypatch.setattr(runner_mod, "save_checkpoint", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        qat(tiny_teacher, quantized, source, tmp_path / "resumed", cfg, eval_data=None, progress=False)
    monkeypatch.setattr(runner_mod, "save_checkpoint", real_save)
    resumed = qat(tiny_teacher, quantized, source, tmp_path / "resumed", cfg, eval_data=None, progress=False)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]
    with pytest.raises(SmiError, match="other"):  # the same folder, the kept patches alone: another run's data
        qat(tiny_teacher, quantized, PoolSource(sparse_pool), tmp_path / "full", cfg, eval_data=None, progress=False)


@pytest.mark.parametrize("ema", [0.0, 0.9])  # with a weight average too: its copy of the quantized model resumes
def test_resume_equals_uninterrupted_run(tiny_teacher, quantized, tmp_path, monkeypatch, ema):
    cfg = QatConfig(epochs=3, steps_per_epoch=3, batch_size=8, lr=1e-3, ema=ema)
    full = qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "full", cfg, eval_data=None, progress=False)
    real_save = runner_mod.save_checkpoint
    calls = {"n": 0}

    def dies_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "save_checkpoint", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "resumed", cfg, eval_data=None, progress=False)
    monkeypatch.setattr(runner_mod, "save_checkpoint", real_save)
    resumed = qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "resumed", cfg, eval_data=None, progress=False)
    a = load_file(str(tmp_path / "full" / "quantized.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "quantized.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]


def test_refusals(tiny_teacher, quantized, tmp_path):
    other = as_teacher(tiny_vit(embed_dim=16), spec="other")
    with pytest.raises(SmiError, match="quantized from"):
        qat(other, quantized, NoiseSource(), tmp_path / "a", QatConfig(epochs=1), eval_data=None, progress=False)
    out = tmp_path / "b"
    qat(tiny_teacher, quantized, NoiseSource(), out, QatConfig(epochs=1, steps_per_epoch=1), eval_data=None,
        progress=False)
    with pytest.raises(SmiError, match="other settings"):
        qat(tiny_teacher, quantized, NoiseSource(), out, QatConfig(epochs=1, steps_per_epoch=1, lr=1e-3),
            eval_data=None, progress=False)
    with pytest.raises(SmiError, match="holds files smi did not write"):  # a quantize folder is not a QAT run
        qat(tiny_teacher, quantized, NoiseSource(), quantized, QatConfig(epochs=1), eval_data=None, progress=False)
    with pytest.raises(SmiError):
        QatConfig(epochs=0)


@pytest.mark.parametrize("kind", ["noise", "pool"])
def test_train_images_are_the_calibration_images(tiny_teacher, sparse_pool, kind):
    source = NoiseSource() if kind == "noise" else PoolSource(sparse_pool)
    calib = calibration_set(tiny_teacher, source, 6, seed=3)
    subset = source.open(tiny_teacher).subset(6, torch.Generator().manual_seed(3))
    assert torch.equal(subset.images, calib.images) and not subset.endless and len(subset) == 6
    assert (subset.masks is None) == (calib.masks is None)
    if calib.masks is not None:
        assert torch.equal(subset.masks, calib.masks)


def test_train_images_fix_the_training_set(tiny_teacher, quantized, tmp_path):
    res = qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "qat",
              QatConfig(epochs=2, batch_size=4, train_images=8), eval_data=None, progress=False)
    assert [r["images"] for r in res.log] == [8, 8]  # one pass over 8 fixed images per epoch, not endless noise
    with pytest.raises(SmiError, match="train_images"):
        from smi.inversion.synthesis import OnlineSource

        qat(tiny_teacher, quantized, OnlineSource(SPARSE), tmp_path / "o", QatConfig(epochs=1, train_images=8),
            eval_data=None, progress=False)


def test_feature_losses_against_a_direct_computation():
    from smi.quant.qat import FEATURE_LOSSES
    from smi.transfer import kd_loss

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    mse = sum(((s[b, n] - t[b, n]) ** 2).sum() for b in range(3) for n in range(5)) / 15
    torch.testing.assert_close(FEATURE_LOSSES["mse"](s, t), mse)
    akt = kd_loss((s ** 2).mean(1), (t ** 2).mean(1), 8.0) + kd_loss((s ** 2).mean(2), (t ** 2).mean(2), 8.0)
    torch.testing.assert_close(FEATURE_LOSSES["akt"](s, t), akt)
    assert FEATURE_LOSSES["akt"](t, t).abs() < 1e-6 and FEATURE_LOSSES["mse"](t, t) == 0


@pytest.mark.parametrize("feature_loss", ["mse", "akt"])
def test_feature_loss_trains_and_adds_to_the_loss(tiny_teacher, quantized, tmp_path, feature_loss):
    base = qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "a", QatConfig(epochs=1, steps_per_epoch=2,
               batch_size=4, train_images=8), eval_data=None, progress=False)
    feat = qat(tiny_teacher, quantized, NoiseSource(), tmp_path / "b",
               QatConfig(epochs=1, steps_per_epoch=2, batch_size=4, train_images=8, feature_loss=feature_loss),
               eval_data=None, progress=False)
    assert feat.log[0]["loss"] > base.log[0]["loss"]  # the same first batch, plus a positive feature term
    with pytest.raises(SmiError, match="feature_loss"):
        QatConfig(feature_loss="nope")


def test_psaq_v2_loop_synthesizes_against_the_quantized_model(tiny_teacher, quantized, tmp_path):
    """PSAQ-ViT V2's adaptive loop: each epoch's images are optimized against the quantized model as it is then
    (its weights untouched by the synthesis and still trainable after it), then the model trains on the pool."""
    from smi.inversion.synthesis import OnlineSource

    cfg = InversionConfig.for_method("psaq-v2", iterations=6, batch_size=2,
                                     sparsity=SparsityConfig.parse("2:0.5,4:0.5"))
    res = qat(tiny_teacher, quantized, OnlineSource(cfg), tmp_path / "v2",
              QatConfig(epochs=2, online_steps=2, batch_size=2), eval_data=None, progress=False)
    assert [r["images"] for r in res.log] == [2, 4]
    pool_cfg = (tmp_path / "v2" / "pool" / "config.json").read_text()
    assert '"adversarial": 1.0' in pool_cfg and '"ce_weight": 0.0' in pool_cfg
    assert load_quantized(tmp_path / "v2", copy.deepcopy(tiny_teacher))[1]["qat"]["data"]["kind"] == "online"


def test_overwrite_replaces_only_what_the_qat_run_made(tiny_teacher, quantized, tmp_path):
    """--overwrite of a QAT run with other settings deletes its checkpoint, log and quantized files; a user's own file
    in the folder survives, and so does the quantized folder the run started from."""
    out = tmp_path / "qat"
    cfg = QatConfig(epochs=1, steps_per_epoch=1, batch_size=4)
    qat(tiny_teacher, quantized, NoiseSource(), out, cfg, eval_data=None, progress=False)
    (out / "notes.txt").write_text("the user's own")
    start = {p.name: p.read_bytes() for p in quantized.iterdir()}
    first = (out / "quantized.safetensors").read_bytes()
    qat(tiny_teacher, quantized, NoiseSource(), out, QatConfig(epochs=1, steps_per_epoch=1, batch_size=4, lr=1e-3),
        eval_data=None, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "the user's own"
    assert (out / "quantized.safetensors").read_bytes() != first  # replaced by the new run's result
    assert {p.name: p.read_bytes() for p in quantized.iterdir()} == start
