import pytest
import torch

from smi.errors import SmiError
from smi.runner import FitConfig, RunFolder, fit
from smi.utils.schedule import scheduled_lr, warmup_cosine


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def _fit(tmp_path, cfg, loss_fn=None, identity=None, **kw):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunFolder(tmp_path / "run", identity or {"what": 1}, fmt="test-run/1", what="test run", **kw)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    def batches(epoch, gen):
        for _ in range(cfg.steps_per_epoch):
            yield x[torch.randint(0, 8, (4,), generator=gen)]

    step = loss_fn or (lambda b: model(b).pow(2).mean())
    return fit(run, model, opt, cfg, batches, lambda b: step(b) if loss_fn is None else loss_fn(model, b),
               progress=False), model


def test_resume_is_exact_and_the_log_keeps_one_row_per_epoch(tmp_path):
    cfg = FitConfig(epochs=3, steps_per_epoch=4, lr=0.1)
    log, model = _fit(tmp_path / "a", cfg)
    short, _ = _fit(tmp_path / "b", FitConfig(epochs=3, steps_per_epoch=4, lr=0.1, time_budget_s=1e-9))
    assert [r["epoch"] for r in log] == [1, 2, 3] and len(short) == 1  # the budget stops after epoch 1
    resumed, again = _fit(tmp_path / "b", cfg)  # same identity, more budget: resumes after epoch 1
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert torch.equal(again.weight, model.weight)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in log]


def test_nan_guard_names_the_epoch_and_keeps_checkpoints(tmp_path):
    calls = {"n": 0}

    def loss(model, b):
        calls["n"] += 1
        return model(b).pow(2).mean() * (float("nan") if calls["n"] > 4 else 1.0)

    with pytest.raises(SmiError, match="loss became nan at epoch 2, step 1.*kept"):
        _fit(tmp_path, FitConfig(epochs=3, steps_per_epoch=4, lr=0.1), loss_fn=loss)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_another_identity_is_refused_unless_overwrite(tmp_path):
    _fit(tmp_path, FitConfig(epochs=1, steps_per_epoch=1, lr=0.1))
    with pytest.raises(SmiError, match=r"other settings \(differs in: what\)"):
        RunFolder(tmp_path / "run", {"what": 2}, fmt="test-run/1", what="test run")
    RunFolder(tmp_path / "run", {"what": 2}, fmt="test-run/1", what="test run", overwrite=True)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    # a tuple in memory is a list after the JSON round trip: still the same run
    RunFolder(tmp_path / "t", {"size": (1, 2)}, fmt="test-run/1", what="test run")
    RunFolder(tmp_path / "t", {"size": (1, 2)}, fmt="test-run/1", what="test run")


def test_schedules():
    assert scheduled_lr("constant", 0, 10, 2, 1.0) == 0.5 and scheduled_lr("constant", 7, 10, 2, 1.0) == 1.0
    assert warmup_cosine(2, 10, 2, 1.0) == 1.0 and warmup_cosine(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(6, 10, 2, 1.0) == pytest.approx(0.5)  # half way down the cosine


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    _fit(tmp_path, FitConfig(epochs=1, steps_per_epoch=1, lr=0.1))
    run = tmp_path / "run"
    (run / "my_notes.txt").write_text("mine")
    (run / "student.json").write_text("not a product of this run")  # a name another kind of run writes
    RunFolder(run, {"what": 2}, fmt="test-run/1", what="test run", overwrite=True)
    assert not (run / "checkpoint.safetensors").exists() and not (run / "log.jsonl").exists()
    assert (run / "my_notes.txt").read_text() == "mine"
    assert (run / "student.json").read_text() == "not a product of this run"


def _fit_recording(tmp_path, cfg):
    """fit on a tiny model, returning (the model fit returned, weights at the start of every step (the previous
    step's result), weights end_of_epoch saw)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunFolder(tmp_path, {"what": 1}, fmt="test-run/1", what="test run")
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    steps, seen = [], []

    def batches(epoch, gen):
        for _ in range(cfg.steps_per_epoch):
            yield x[torch.randint(0, 8, (4,), generator=gen)]

    def step(b):
        steps.append(model.weight.detach().clone())
        return model(b).pow(2).mean()

    fit(run, model, opt, cfg, batches, step, end_of_epoch=lambda e: seen.append(model.weight.detach().clone()) or {},
        progress=False)
    return model, steps, seen


def test_weight_average_matches_a_replay_of_the_trained_weights_and_resumes_exactly(tmp_path):
    """With ema, training follows the same weights as without; end_of_epoch and the caller get the average,
    which equals an independent replay of timm's warmed-up decay over the weights after every step."""
    plain, plain_steps, _ = _fit_recording(tmp_path / "plain", FitConfig(epochs=3, steps_per_epoch=4, lr=0.1))
    cfg = FitConfig(epochs=3, steps_per_epoch=4, lr=0.1, ema=0.5)
    averaged, steps, seen = _fit_recording(tmp_path / "ema", cfg)
    assert all(torch.equal(a, b) for a, b in zip(steps, plain_steps, strict=True))  # training is untouched
    trained = [*plain_steps[1:], plain.weight.detach()]  # the weights after steps 1..12
    e = trained[0]
    for k, w in enumerate(trained[1:], start=1):
        d = min(0.5, 1 - (1 + k) ** (-2 / 3))
        e = d * e + (1 - d) * w
    assert torch.allclose(averaged.weight, e, atol=1e-6) and not torch.allclose(averaged.weight, plain.weight)
    assert torch.equal(seen[-1], averaged.weight)
    # stopped by its budget after epoch 1, then resumed: the same average
    _fit_recording(tmp_path / "resumed", FitConfig(epochs=3, steps_per_epoch=4, lr=0.1, ema=0.5, time_budget_s=1e-9))
    again, _, _ = _fit_recording(tmp_path / "resumed", cfg)
    assert torch.equal(again.weight, averaged.weight)
