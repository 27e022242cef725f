import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from smi.errors import SmiError
from smi.models.loading import load_teacher
from tests.helpers import write_tiny_checkpoint


def test_checkpoint_round_trip(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    t = load_teacher(str(path))
    assert (t.num_classes, t.input_size, t.class_names) == (5, (3, 32, 32), ["a", "b", "c", "d", "e"])
    assert t.fingerprint.startswith("sha256:")
    assert not any(p.requires_grad for p in t.model.parameters()) and not t.model.training
    state = load_file(str(path))
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, state[k])


def test_timm_name_random_init():
    t = load_teacher("test_vit")
    assert t.input_size == (3, 160, 160) and t.fingerprint == "random-init:test_vit"


def test_unknown_name_suggests_close_names():
    with pytest.raises(SmiError, match="did you mean deit_tiny_patch16_224"):
        load_teacher("deit_tiny_patch16_22")


def test_shape_mismatch_is_one_clear_error(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["model_kwargs"]["embed_dim"] = 48
    meta["model_kwargs"]["num_heads"] = 3
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(SmiError, match="do not match"):
        load_teacher(str(path))


@pytest.mark.parametrize("damage", ["truncate", "bad_json", "no_json", "wrong_format"])
def test_damaged_checkpoints(tmp_path, damage):
    path = write_tiny_checkpoint(tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "bad_json":
        path.with_suffix(".json").write_text("{not json")
    elif damage == "no_json":
        path.with_suffix(".json").unlink()
    else:
        path.with_suffix(".json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SmiError):
        load_teacher(str(path))


def test_extra_tensor_is_refused(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    state = load_file(str(path))
    state["surprise"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(SmiError, match="unexpected"):
        load_teacher(str(path))


def test_import_has_no_side_effects():
    code = ("import sys, smi, torch; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'matplotlib' not in sys.modules; print('ok', end='')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "ok" and out.stderr == ""


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(writer, tmp_path, capsys):
    import pickle

    from smi.cli import main

    ckpt = write_tiny_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "tiny.pt"
    payload = {"head.weight": _RunsCode(marker)}
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    assert ckpt.with_suffix(".json").is_file()
    assert main(["eval", "--model", str(evil), "--data", "fashion-mnist", "--limit", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smi: error:") and "refused" in err and "\n" not in err
    assert not marker.exists()


def test_plain_torch_state_dict_loads_with_weights_only(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path)
    state = load_teacher(str(ckpt)).model.state_dict()
    torch.save(state, tmp_path / "tiny.pt")
    t = load_teacher(str(tmp_path / "tiny.pt"))
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in state.items())


def test_checkpoints_record_the_models_own_channels_and_transform(tmp_path):
    """timm's pretrained config says 3 channels for a resnet18 built with in_chans=1; the checkpoint must not."""
    from smi.models.loading import create_model, save_teacher

    model, kwargs = create_model("resnet18", (1, 20, 24), 4)
    path = save_teacher(model, tmp_path / "r.safetensors", arch="resnet18", model_kwargs=kwargs)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["input_size"][0] == 1 and len(meta["mean"]) == len(meta["std"]) == 1
    teacher = load_teacher(str(path))
    assert teacher.input_size[0] == 1 and teacher.dataset is None
    data = {"input_size": [1, 20, 24], "mean": [0.5], "std": [0.2], "crop_pct": 0.9, "interpolation": "bicubic",
            "dataset": "fashion-mnist"}
    path = save_teacher(model, tmp_path / "s.safetensors", arch="resnet18", model_kwargs=kwargs, data_config=data)
    back = load_teacher(str(path))
    assert back.data_config() == {**data, "input_size": [1, 20, 24]}


def test_a_plain_timm_student_records_its_teachers_input(tmp_path):
    from smi.data.sources import NoiseSource
    from smi.transfer import DistillConfig, build_student, distill

    teacher = load_teacher("fmnist_vit_tiny")
    res = distill(teacher, build_student("resnet18", teacher), NoiseSource(), tmp_path / "kd",
                  DistillConfig(epochs=1, batch_size=4, online_steps=1), eval_data=None, progress=False)
    student = load_teacher(str(res.weights))
    assert student.data_config() == teacher.data_config()


@pytest.mark.parametrize("field,value", [("architecture", True), ("interpolation", "bicubicc"),
                                         ("interpolation", 3), ("class_names", True), ("class_names", ["a"])])
def test_hand_edited_checkpoint_fields_are_one_error(tmp_path, field, value):
    # found by the fuzz test: these reached timm / torchvision as tracebacks
    ckpt = write_tiny_checkpoint(tmp_path, "t")
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta[field] = value
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(SmiError, match=field):
        load_teacher(str(ckpt))


@pytest.mark.parametrize("size", [[3, True, 32], [3, 16, 32], [1, 32, 32]])
def test_recorded_input_size_must_fit_the_model(tmp_path, size):
    # found by the fuzz test: a hand-edited input_size reached the model as a shape traceback in smi eval
    ckpt = write_tiny_checkpoint(tmp_path, "t")
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta["input_size"] = size
    meta["mean"], meta["std"] = [0.5] * size[0], [0.5] * size[0]
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(SmiError, match="input_size"):
        load_teacher(str(ckpt))
