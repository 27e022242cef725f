"""Property-based fuzzing of the CLI: random argument vectors for every subcommand, random corruptions of
pools, manifests, checkpoints and image folders.

For every case: no traceback, a non-zero exit comes with one ``error:`` line, and no file outside the
output folder changes (sha256 before and after). Seeded (``derandomize``), so a failure reproduces;
``make test`` runs a few hundred cases, ``make test-all`` (CI) a few thousand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smi.cli import build_parser, main  # noqa: E402
from tests.helpers import write_image_folder, write_tiny_checkpoint  # noqa: E402

QUICK, CI = 120, 1500  # cases per test: make test / make test-all (two tests: 3,000 in CI)

# cheap settings put first on every command line, so that a valid draw finishes in a fraction of a second;
# the drawn options come after them and override (argparse keeps the last)
CHEAP = {
    "invert": ["--iterations", "3", "--num-images", "2", "--batch-size", "2", "--sparsity", "dense", "--no-grid"],
    "quantize": ["--calib-images", "2", "--reconstruct-iterations", "2"],
    "train-generator": ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--latent-dim", "4",
                        "--width", "4"],
    "eval": ["--limit", "4"],
    "distill": ["--epochs", "1", "--batch-size", "2", "--online-steps", "1", "--steps-per-epoch", "1",
                "--generator-steps", "1", "--iterations", "3", "--synth-batch-size", "2", "--eval-data", "none",
                "--eval-images", "4"],
    "qat": ["--epochs", "1", "--batch-size", "2", "--online-steps", "1", "--steps-per-epoch", "1",
            "--generator-steps", "1", "--iterations", "3", "--synth-batch-size", "2", "--eval-data", "none",
            "--eval-images", "4"],
    "train-teacher": ["--epochs", "1", "--batch-size", "4"],
    "demo": ["--num-images", "2", "--iterations", "301", "--distill-seconds", "0.1"],
}
# options whose value is an amount of work: a huge draw (2**70 epochs) is a valid request that runs for ever,
# so these draw small and invalid values only
WORK_FLAGS = {"--img-size", "--epochs", "--batch-size", "--iterations", "--num-images", "--steps-per-epoch",
              "--online-steps", "--online-images", "--eval-images", "--distill-seconds", "--calib-images", "--limit",
              "--synth-batch-size", "--time-budget", "--train-images", "--latent-dim", "--width",
              "--reconstruct-iterations", "--generator-steps", "--mapped-dim"}
# options fixed by CHEAP for a command: a drawn value could make a valid run of minutes (the demo of a shipped
# teacher, a teacher trained on all of Fashion-MNIST)
FIXED = {"demo": {"--model", "--data"}, "train-teacher": {"--data"}}
SKIP_FLAGS = {"--pretrained", "--help", "--version", "--json", "--device"}  # network; output format; covered elsewhere


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    w = {"dir": d, "ckpt": str(write_tiny_checkpoint(d, "tiny"))}
    assert main(["invert", "--model", w["ckpt"], *CHEAP["invert"], "--num-images", "4", "--out", str(d / "pool")]) == 0
    w["pool"] = str(d / "pool")
    assert main(["quantize", "--model", w["ckpt"], "--calib", "noise", "--calib-images", "2", "--w-bits", "4",
                 "--out", str(d / "quant")]) == 0
    w["quant"] = str(d / "quant")
    w["images"] = str(write_image_folder(d / "images", classes=5, per_class=3, size=(16, 16), split=True))
    (d / "afile.txt").write_text("hello")
    (d / "out").mkdir()
    return w


def _digest(root: Path, skip: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and skip not in p.parents}


def _values(w: dict, flag: str) -> st.SearchStrategy[str]:
    d = w["dir"]
    paths = [w["ckpt"], w["pool"], f"pool:{w['pool']}", str(d / "afile.txt"), str(d / "nope"), str(d),
             f"imagefolder:{w['images']}", "imagefolder:", "imagefolder:/nope", "real", "noise", "fashion-mnist", ""]
    numbers = ["0", "1", "2", "-1", "3", "0.5", "-0.0", "nan", "inf", "1e-300", "x", "2:0.5"]
    if flag in WORK_FLAGS:
        return st.sampled_from(numbers)
    numbers += ["1e9", str(2**70)]
    words = ["dense", "default", "2:0.5", "1:1.5", "psaq", "deepinversion", "qimera-mix", "mixed", "bn=1",
             "ris_input=nan", "nope=1", "tv_target_low=2", "baseline", "repq", "patch", "pixel", "cosine",
             "fmnist_vit_mini", "resnet10t", "vit_tiny_patch16_224", "fmnist_resnet_tiny", "patch_size=4", "é", "--"]
    if flag in ("--model", "--teacher", "--student-checkpoint"):
        return st.sampled_from([w["ckpt"], "fmnist_vit_tiny", str(d / "nope.safetensors"), w["pool"], "deit_tiny_pat"])
    if flag == "--quantized":
        return st.sampled_from([w["quant"], w["pool"], str(d / "afile.txt"), str(d / "nope"), str(d / "out"), ""])
    if flag in ("--calib", "--pool", "--data", "--eval-data", "--real", "--out", "folder", "--generator"):
        return st.sampled_from(paths)
    return st.sampled_from(numbers + words)


@st.composite
def command_lines(draw, w: dict, skip: tuple[str, ...] = ()) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    name = draw(st.sampled_from(sorted(set(sub.choices) - set(skip))))
    p = sub.choices[name]
    argv = [name]
    if name == "pool":
        inner = next(a for a in p._actions if a.dest == "pool_command")
        action = draw(st.sampled_from(sorted(inner.choices)))
        return argv + [action, draw(_values(w, "folder"))]
    argv += CHEAP.get(name, [])
    if name == "train-teacher":
        argv += ["--data", f"imagefolder:{w['images']}", "--arch", "resnet10t"]
    if name == "demo":
        argv += ["--model", w["ckpt"]]
    if name == "qat":  # a valid start, so that draws reach the training loop
        argv += ["--model", w["ckpt"], "--quantized", w["quant"], "--noise"]
    options = [a for a in p._actions if a.option_strings and a.option_strings[0] not in SKIP_FLAGS
               and not set(a.option_strings) & SKIP_FLAGS]
    for action in draw(st.lists(st.sampled_from(options), max_size=5)):
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if flag == "--out" or flag in FIXED.get(name, ()):
            continue  # the output folder is drawn below, inside the sandbox
        argv.append(flag)
        if action.nargs != 0:
            argv.append(draw(_values(w, flag)))
    if any(a.dest == "out" for a in p._actions):
        argv += ["--out", str(w["dir"] / "out" / draw(st.sampled_from(["a", "b", "a/b", "."])))]
    return argv


PHASES = (Phase.explicit, Phase.generate)  # no shrinking: a failure names its argv, and CI time stays bounded
CASE_SECONDS = 60  # one case that runs longer is a failure (a drawn value made smi work for hours), not a hang


class _CaseTooSlow(BaseException):  # not an Exception: smi's own handlers must not turn it into an exit code
    pass


def _alarm(signum, frame):
    raise _CaseTooSlow


def _run(argv: list[str], capsys) -> tuple[int, str]:
    log = os.environ.get("SMI_FUZZ_LOG")  # per-case timings, to find what makes a run slow
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"start": argv, "at": time.time()}) + "\n")
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 2
    except _CaseTooSlow:
        pytest.fail(f"case ran over {CASE_SECONDS} s: {argv}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"seconds": round(time.perf_counter() - start, 3), "argv": argv}) + "\n")
    return code, capsys.readouterr().err


def _check(argv: list[str], code: int, err: str) -> None:
    assert "Traceback" not in err and code != 3, (argv, err)
    if code != 0:  # the last line says why, as smi (or its argparse) words it
        last = (err.strip().splitlines() or [""])[-1]
        assert last.startswith("smi") and "error:" in last, (argv, err)


def _fuzz_arguments(world, capsys, n: int, skip: tuple[str, ...] = ()) -> None:
    out = world["dir"] / "out"

    @settings(max_examples=n, derandomize=True, deadline=None, database=None, phases=PHASES,
              suppress_health_check=list(HealthCheck))
    @given(argv=command_lines(world, skip))
    def case(argv: list[str]) -> None:
        before = _digest(world["dir"], out)
        code, err = _run(argv, capsys)
        _check(argv, code, err)
        assert _digest(world["dir"], out) == before, argv  # nothing outside the output folder changed
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    case()


def _corrupt(data: bytes, how: str, where: float, value: int) -> bytes:
    if not data:
        return bytes([value])
    i = min(len(data) - 1, int(where * len(data)))
    if how == "truncate":
        return data[:i]
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (1 << (value % 8))]) + data[i + 1:]
    if how == "empty":
        return b""
    return data[:i] + bytes([value]) * 16 + data[i:]  # insert


def _json_edit(text: str, path_pick: float, value: object) -> str:
    """Replace one value somewhere in the JSON document (depth-first, picked by ``path_pick``) with ``value``."""
    doc = json.loads(text)
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            slots.append((node, k))
            walk(v)

    walk(doc)
    if slots:
        node, key = slots[min(len(slots) - 1, int(path_pick * len(slots)))]
        node[key] = value
    return json.dumps(doc)


def _fuzz_files(world, capsys, n: int, tmp_path_factory) -> None:
    d = world["dir"]
    targets = {  # file to corrupt (relative to its copied folder) -> commands that read it
        "pool/manifest.json": lambda c: [["pool", "info", c], ["pool", "verify", c],
                                         ["quantize", "--model", world["ckpt"], "--calib", c, "--calib-images", "2",
                                          "--out", f"{c}_q"]],
        "pool/shard-00000.safetensors": lambda c: [
            ["pool", "verify", c], ["distill", "--teacher", world["ckpt"], "--pool", c, *CHEAP["distill"],
                                    "--out", f"{c}_kd"]],
        "ckpt/tiny.json": lambda c: [["eval", "--model", f"{c}/tiny.safetensors", "--data",
                                      f"imagefolder:{world['images']}", "--limit", "2"]],
        "ckpt/tiny.safetensors": lambda c: [["invert", "--model", f"{c}/tiny.safetensors", *CHEAP["invert"],
                                             "--out", f"{c}_p"]],
        "images/val/class_1/0.png": lambda c: [["eval", "--model", world["ckpt"], "--data", f"imagefolder:{c}"]],
    }

    @settings(max_examples=n, derandomize=True, deadline=None, database=None, phases=PHASES,
              suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(sorted(targets)), how=st.sampled_from(["truncate", "flip", "empty", "insert", "json",
                                                                          "delete"]),
           where=st.floats(0, 1), value=st.integers(0, 255),
           json_value=st.sampled_from([None, -1, 0, 1e308, "", "x", [], {}, True, "../../etc/passwd", 2**64]))
    def case(target, how, where, value, json_value):
        sandbox = Path(tmp_path_factory.mktemp("corrupt"))
        folder, name = target.split("/", 1)
        source = {"pool": Path(world["pool"]), "ckpt": d, "images": Path(world["images"])}[folder]
        copy = sandbox / folder
        if folder == "ckpt":
            copy.mkdir()
            for f in ("tiny.safetensors", "tiny.json"):
                shutil.copy(d / f, copy / f)
        else:
            shutil.copytree(source, copy)
        victim = copy / name
        if how == "delete":
            victim.unlink()
        elif how == "json" and name.endswith(".json"):
            victim.write_text(_json_edit(victim.read_text(), where, json_value))
        else:
            victim.write_bytes(_corrupt(victim.read_bytes(), how, where, value))
        before = _digest(d, sandbox)
        for argv in targets[target](str(copy)):
            code, err = _run(argv, capsys)
            _check(argv, code, err)
        assert _digest(d, sandbox) == before
        shutil.rmtree(sandbox, ignore_errors=True)

    case()


def test_fuzz_argument_vectors(world, capsys):
    _fuzz_arguments(world, capsys, QUICK, skip=("demo",))  # the demo takes seconds: CI's run includes it


def test_fuzz_corrupted_files(world, capsys, tmp_path_factory):
    _fuzz_files(world, capsys, QUICK, tmp_path_factory)


@pytest.mark.slow
def test_fuzz_thousands(world, capsys, tmp_path_factory):
    _fuzz_arguments(world, capsys, CI)
    _fuzz_files(world, capsys, CI, tmp_path_factory)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", ""]))
