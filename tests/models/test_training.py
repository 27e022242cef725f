import json

import pytest
import torch
from safetensors.torch import load_file

import smi.models.training as training
from smi.errors import SmiError
from smi.models.loading import load_teacher
from smi.models.training import TeacherTrainConfig, train_teacher

TINY = dict(epochs=2, batch_size=64, train_images=256, test_images=200, warmup_epochs=0.5)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = TeacherTrainConfig(**TINY)
    train_teacher(cfg, tmp_path / "full", progress=False)

    real_eval = training.evaluate
    calls = {"n": 0}

    def dies_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, tmp_path / "resumed", progress=False)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(log) == 1
    monkeypatch.setattr(training, "evaluate", real_eval)
    train_teacher(cfg, tmp_path / "resumed", progress=False)

    a = load_file(str(tmp_path / "full" / "fmnist_vit_tiny.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "fmnist_vit_tiny.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    teacher = load_teacher(str(tmp_path / "resumed" / "fmnist_vit_tiny.safetensors"))
    assert teacher.class_names[0] == "T-shirt/top" and teacher.input_size == (1, 28, 28)
    assert len((tmp_path / "resumed" / "log.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "resumed" / "fmnist_vit_tiny.json").read_text())["train_config"]["epochs"] == 2


def test_other_config_in_the_folder_is_refused(tmp_path):
    train_teacher(TeacherTrainConfig(**{**TINY, "epochs": 1}), tmp_path, progress=False)
    with pytest.raises(SmiError, match="training run with other settings"):
        train_teacher(TeacherTrainConfig(**{**TINY, "lr": 3e-4}), tmp_path, progress=False)
