"""Every subcommand, fed bad input: one line naming the problem, a non-zero exit, no traceback."""

import json
import os

import pytest

from smi.cli import main
from tests.helpers import write_tiny_checkpoint

INV = ["--num-images", "4", "--batch-size", "2", "--iterations", "6", "--sparsity", "2:0.5", "--no-grid"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher, another teacher, a pool of the first, and broken files of every kind."""
    d = tmp_path_factory.mktemp("hostile")
    w = {"dir": d, "ckpt": str(write_tiny_checkpoint(d, "tiny")), "other": str(write_tiny_checkpoint(d, "other", 1))}
    assert main(["invert", "--model", w["ckpt"], *INV, "--out", str(d / "pool")]) == 0
    w["pool"] = str(d / "pool")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "empty.json").write_text((d / "tiny.json").read_text())
    data = (d / "tiny.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (d / "trunc.json").write_text((d / "tiny.json").read_text())
    (d / "badjson").mkdir()
    (d / "badjson" / "manifest.json").write_text("{ not json")
    (d / "emptypool").mkdir()
    (d / "emptypool" / "manifest.json").write_text("")
    (d / "truncpool").mkdir()
    for f in (d / "pool").iterdir():
        (d / "truncpool" / f.name).write_bytes(f.read_bytes())
    shard = next((d / "truncpool").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:64])
    (d / "afile.txt").write_text("hello")
    return w


def _cases():
    # (argv built from the world dict, expected fragment of the message)
    return {
        # missing paths
        "invert: missing model": (lambda w: ["invert", "--model", "/nope/x.safetensors", *INV, "--out", "{d}/o"],
                                  "not found"),
        "quantize: missing pool": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "/nope/pool",
                                              "--out", "{d}/q"], "does not exist"),
        "eval: missing quantized": (lambda w: ["eval", "--model", w["ckpt"], "--quantized", "/nope/q"], "/nope/q"),
        "distill: missing pool": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", "/nope/p",
                                             "--out", "{d}/k"], "does not exist"),
        "pool info: missing": (lambda w: ["pool", "info", "/nope/p"], "does not exist"),
        "pool verify: missing": (lambda w: ["pool", "verify", "/nope/p"], "does not exist"),
        # a folder where a file is expected, a file where a folder is expected
        "invert: model is a folder": (lambda w: ["invert", "--model", "{d}/pool", *INV, "--out", "{d}/o"],
                                      "is a folder"),
        "invert: out is a file": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--out", "{d}/afile.txt"],
                                  "is a file"),
        "pool info: a file": (lambda w: ["pool", "info", "{d}/afile.txt"], "is a file"),
        "distill: out is a file": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"],
                                              "--out", "{d}/afile.txt", "--eval-data", "none"], "is a file"),
        # empty and truncated files
        "eval: empty weights": (lambda w: ["eval", "--model", "{d}/empty.safetensors"], "unreadable"),
        "invert: truncated weights": (lambda w: ["invert", "--model", "{d}/trunc.safetensors", *INV,
                                                 "--out", "{d}/o"], "unreadable"),
        "pool info: empty manifest": (lambda w: ["pool", "info", "{d}/emptypool"], "not valid JSON"),
        "pool info: wrong JSON": (lambda w: ["pool", "info", "{d}/badjson"], "not valid JSON"),
        "quantize: truncated shard": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "{d}/truncpool",
                                                 "--calib-images", "2", "--out", "{d}/q"], "checksum mismatch"),
        "distill: truncated shard": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", "{d}/truncpool",
                                                "--out", "{d}/k", "--eval-data", "none"], "checksum mismatch"),
        # a pool from another teacher
        "quantize: other teacher's pool": (lambda w: ["quantize", "--model", w["other"], "--calib", w["pool"],
                                                      "--calib-images", "2", "--out", "{d}/q"], "another teacher"),
        "distill: other teacher's pool": (lambda w: ["distill", "--teacher", w["other"], "--pool", w["pool"],
                                                     "--out", "{d}/k", "--eval-data", "none"], "another teacher"),
        # numbers out of range
        "invert: zero iterations": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--iterations", "0",
                                               "--out", "{d}/o"], "iterations"),
        "invert: zero batch": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--batch-size", "0",
                                          "--out", "{d}/o"], "--batch-size must be >= 1, got 0"),
        "quantize: 9-bit weights": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise", "--w-bits", "9",
                                               "--out", "{d}/q"], "w-bits"),
        "quantize: 1-bit activations": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                   "--a-bits", "1", "--out", "{d}/q"], "a-bits"),
        "quantize: zero images": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                             "--calib-images", "0", "--out", "{d}/q"], "--calib-images"),
        "eval: zero limit": (lambda w: ["eval", "--model", w["ckpt"], "--data", "imagefolder:{d}", "--limit", "0"],
                             "--limit"),
        "distill: zero epochs": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"], "--epochs", "0",
                                            "--out", "{d}/k"], "--epochs"),
        "distill: negative temperature": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"],
                                                     "--temperature", "-1", "--out", "{d}/k"], "--temperature"),
        "train-teacher: zero epochs": (lambda w: ["train-teacher", "--epochs", "0", "--out", "{d}/t"], "epochs"),
        "invert: not a number": (lambda w: ["invert", "--model", w["ckpt"], "--num-images", "many",
                                            "--out", "{d}/o"], "invalid int value"),
        # unknown names
        "invert: unknown method": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--method", "magic",
                                              "--out", "{d}/o"], "unknown method"),
        "quantize: unknown quantizer": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                   "--quantizer", "magic", "--out", "{d}/q"], "magic"),
        "eval: unknown data": (lambda w: ["eval", "--model", w["ckpt"], "--data", "mnist-ish"],
                               "is not a known dataset"),
        "distill: unknown student": (lambda w: ["distill", "--teacher", w["ckpt"], "--student", "resnet1000",
                                                "--pool", w["pool"], "--out", "{d}/k"], "unknown student"),
        "eval: unknown model": (lambda w: ["eval", "--model", "deit_tiny_patch16_22"], "did you mean"),
        "unknown subcommand": (lambda w: ["compress"], "invalid choice"),
        "pool: unknown action": (lambda w: ["pool", "fix", "{d}/pool"], "invalid choice"),
        "demo: unknown device": (lambda w: ["demo", "--device", "tpu:0", "--out", "{d}/demo"], "not a torch device"),
        "demo: iterations within the schedule": (lambda w: ["demo", "--iterations", "200", "--out", "{d}/demo"],
                                                 "--iterations must exceed the last stop iteration (300)"),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(case, world, capsys):
    build, needle = CASES[case]
    argv = [a.replace("{d}", str(world["dir"])) for a in build(world)]
    before = {p: p.stat().st_mtime_ns for p in world["dir"].rglob("*") if p.is_file()}
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside main
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    last = err[-1]
    assert "error:" in last and needle in last, last
    assert not any("Traceback" in line for line in err)
    after = {p: p.stat().st_mtime_ns for p in world["dir"].rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before} == before  # nothing that existed was touched


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_checkpoint(world, capsys, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, "locked")
    ckpt.chmod(0)
    assert main(["eval", "--model", str(ckpt)]) == 2
    assert "smi: error:" in capsys.readouterr().err


def test_manifest_of_another_format_is_refused(world, capsys, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else/9"}))
    assert main(["pool", "verify", str(tmp_path)]) == 2
    assert "not an smi pool manifest" in capsys.readouterr().err
