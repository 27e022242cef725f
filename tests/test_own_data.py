"""A user's own data and model, end to end from the CLI; every resumable command resumes when rerun."""

import json
from pathlib import Path

import pytest

from smi.cli import main
from smi.models.loading import load_teacher
from tests.helpers import write_image_folder

VIT = ["--arch", "vit_tiny_patch16_224", "--model-kwarg", "patch_size=4", "--model-kwarg", "embed_dim=32",
       "--model-kwarg", "depth=2", "--model-kwarg", "num_heads=2"]
INVERT = ["--iterations", "12", "--num-images", "6", "--batch-size", "6"]
DISTILL = ["--epochs", "1", "--batch-size", "4"]


def _ok(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (argv, err)
    return out


@pytest.mark.slow  # end to end, 15-30 s: make test-all (CI) runs it
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_command_runs_on_a_users_image_folder_and_reads_the_last_ones_output(mode, tmp_path, capsys):
    """A 3-class 20x24 folder (no split folders: a seeded split); a ViT trained on it by smi; then everything."""
    data = write_image_folder(tmp_path / "images", classes=3, per_class=8, size=(20, 24), mode=mode)
    d = str(tmp_path)
    _ok(["train-teacher", "--data", f"imagefolder:{data}", *VIT, "--epochs", "1", "--batch-size", "8",
         "--out", f"{d}/teacher"], capsys)
    ckpt = f"{d}/teacher/vit_tiny_patch16_224.safetensors"
    teacher = load_teacher(ckpt)
    channels = 3 if mode == "RGB" else 1
    assert teacher.input_size == (channels, 20, 24) and teacher.num_classes == 3
    assert teacher.dataset == f"imagefolder:{data.resolve()}" and len(teacher.mean) == channels

    assert "(6 images)" in _ok(["eval", "--model", ckpt], capsys)  # the recorded dataset's held-out split
    for sparsity in ("dense", "4:0.5"):
        _ok(["invert", "--model", ckpt, *INVERT, "--sparsity", sparsity, "--out", f"{d}/pool_{sparsity}"], capsys)
    pool = f"{d}/pool_4:0.5"
    for calib in (pool, "real", f"imagefolder:{data}"):
        out = f"{d}/q_{calib.replace('/', '_')}"
        _ok(["quantize", "--model", ckpt, "--calib", calib, "--calib-images", "4", "--w-bits", "4",
             "--out", out], capsys)
        assert "top-1" in _ok(["eval", "--model", ckpt, "--quantized", out], capsys)
    for source in (["--pool", pool], ["--real"], ["--online", "--iterations", "6", "--synth-batch-size", "4",
                                                  "--sparsity", "2:0.5", "--online-steps", "2"]):
        out = f"{d}/kd_{source[0][2:]}"
        assert "test top-1" in _ok(["distill", "--teacher", ckpt, *source, *DISTILL, "--out", out], capsys)
        student = f"{out}/student.safetensors"
        assert load_teacher(student).input_size == teacher.input_size
        assert "(6 images)" in _ok(["eval", "--model", student], capsys)
    _ok(["quantize", "--model", f"{d}/kd_pool/student.safetensors", "--calib", "real", "--calib-images", "4",
         "--out", f"{d}/q_student"], capsys)
    report = _ok(["demo", "--model", ckpt, "--num-images", "4", "--iterations", "301", "--distill-seconds", "1",
                  "--out", f"{d}/demo"], capsys)
    assert "W4A8" in report and "student top-1" in report


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".png"}


def _twice(argv: list[str], out: Path, capsys) -> None:
    first = _ok(argv, capsys)
    before = _state(out)
    logs = {p: p.read_text() for p in out.rglob("*.jsonl")}
    second = _ok(argv, capsys)
    assert second == first
    assert {p: p.read_text() for p in out.rglob("*.jsonl")} == logs  # no step was run again
    kept = {k: v for k, v in _state(out).items() if k.startswith(("shard-", "pool/shard-", "checkpoint"))}
    assert kept == {k: v for k, v in before.items() if k in kept} and kept  # nothing rewritten


@pytest.mark.parametrize("teacher", ["fmnist_vit_tiny", "fmnist_resnet_tiny", "own"])
def test_the_same_command_twice_resumes(teacher, tmp_path, capsys):
    """invert, distill (pool and online) and train-teacher; the own teacher has a non-square img_size tuple."""
    images = write_image_folder(tmp_path / "images", classes=10 if teacher != "own" else 3, per_class=4,
                                size=(28, 28) if teacher != "own" else (20, 24), mode="L")
    arch = VIT if teacher == "own" else ["--arch", teacher]
    _twice(["train-teacher", "--data", f"imagefolder:{images}", *arch, "--epochs", "1", "--batch-size", "8",
            "--out", str(tmp_path / "t")], tmp_path / "t", capsys)
    if teacher == "own":
        teacher = str(tmp_path / "t" / "vit_tiny_patch16_224.safetensors")
        assert json.loads(Path(teacher).with_suffix(".json").read_text())["model_kwargs"]["img_size"] == [20, 24]
    sparsity = "dense" if "resnet" in teacher else "4:0.5"
    invert = ["invert", "--model", teacher, *INVERT, "--sparsity", sparsity, "--jitter-unit",
              "pixel" if sparsity == "dense" else "patch"]
    _twice([*invert, "--out", str(tmp_path / "pool")], tmp_path / "pool", capsys)
    eval_data = ["--eval-data", f"imagefolder:{images}", "--eval-images", "8"]
    _twice(["distill", "--teacher", teacher, "--pool", str(tmp_path / "pool"), *DISTILL, *eval_data,
            "--out", str(tmp_path / "kd")], tmp_path / "kd", capsys)
    _twice(["distill", "--teacher", teacher, "--online", "--iterations", "6", "--synth-batch-size", "4",
            "--sparsity", "dense" if "resnet" in teacher else "2:0.5", *DISTILL, "--online-steps", "2", *eval_data,
            "--out", str(tmp_path / "online")], tmp_path / "online", capsys)


@pytest.mark.parametrize("student", ["fmnist_vit_mini", "resnet18", "vit_tiny_patch16_224"])
def test_each_student_family_is_read_back_by_each_command(student, tmp_path, capsys):
    """A student's checkpoint records its teacher's input (1x28x28 here, not timm's 3x224x224)."""
    out = tmp_path / "kd"
    _ok(["distill", "--teacher", "fmnist_vit_tiny", "--student", student, "--noise", "--epochs", "1",
         "--online-steps", "1", "--batch-size", "4", "--eval-data", "none", "--out", str(out)], capsys)
    ckpt = str(out / "student.safetensors")
    assert load_teacher(ckpt).data_config() == load_teacher("fmnist_vit_tiny").data_config()
    assert "(10 images)" in _ok(["eval", "--model", ckpt, "--limit", "10"], capsys)  # fashion-mnist, recorded
    _ok(["quantize", "--model", ckpt, "--calib", "real", "--calib-images", "4", "--out", str(tmp_path / "q")], capsys)
    _ok(["eval", "--model", ckpt, "--quantized", str(tmp_path / "q"), "--limit", "10"], capsys)
    sparse = (["--sparsity", "2:0.5"] if student == "fmnist_vit_mini"
              else ["--sparsity", "dense", "--jitter-unit", "pixel"])
    _ok(["invert", "--model", ckpt, "--iterations", "4", "--num-images", "2", "--batch-size", "2", *sparse,
         "--out", str(tmp_path / "p")], capsys)
