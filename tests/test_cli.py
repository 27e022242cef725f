import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from smi.cli import main
from smi.data.pool import load_pool
from tests.helpers import write_tiny_checkpoint

FAST = ["--num-images", "4", "--batch-size", "2", "--iterations", "6"]


@pytest.fixture
def ckpt(tmp_path):
    return str(write_tiny_checkpoint(tmp_path))


def test_invert_smoke(ckpt, tmp_path, capsys):
    out = tmp_path / "pool"
    assert main(["invert", "--model", ckpt, *FAST, "--sparsity", "2:0.5,4:0.5", "--out", str(out)]) == 0
    assert "pool:" in capsys.readouterr().out
    pool = load_pool(out)
    assert len(pool) == 4 and pool.masks.sum(1).tolist() == [4] * 4
    assert (out / "grid.png").is_file()
    assert json.loads((out / "config.json").read_text())["sparsity"] == "2:0.5,4:0.5"
    # the same command again resumes (nothing to do) and succeeds
    assert main(["invert", "--model", ckpt, *FAST, "--sparsity", "2:0.5,4:0.5", "--out", str(out)]) == 0


def test_invert_bf16_is_recorded_in_the_pool_and_a_resume_with_fp32_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "pool"
    argv = ["invert", "--model", ckpt, *FAST, "--sparsity", "dense", "--out", str(out)]
    assert main([*argv, "--precision", "bf16"]) == 0
    assert json.loads((out / "manifest.json").read_text())["identity"]["config"]["precision"] == "bf16"
    assert main(argv) == 2  # other settings: no resume, nothing changed
    assert "error:" in capsys.readouterr().err
    assert len(load_pool(out)) == 4


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--num-images", "--batch-size", "--iterations", "--sparsity", "--seed", "--device",
                "--out", "--overwrite", "deepinversion"):
        assert opt in text
    assert "(default: 4000; psaq" in text and "(default: default)" not in text and "(default: None)" not in text
    assert "SYNTH_BATCH_SIZE" not in text and "SYNTH_LR" not in text  # no internal names
    for method in ("psaq", "sardfq", "mimiq", "ris", "qimera-mix", "e2h"):
        assert f"\n  {method} " in text  # one line per method


def _nan_checkpoint(tmp_path):
    path = write_tiny_checkpoint(tmp_path, name="nan")
    state = load_file(str(path))
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    save_file(state, str(path))
    return str(path)


BAD = {
    "unknown model": (["--model", "deit_tiny_patch16_22"], "did you mean deit_tiny_patch16_224"),
    "ratio out of range": (["--sparsity", "2:1.5"], "[0, 1)"),
    "unsorted stops": (["--sparsity", "4:0.3,2:0.3"], "increasing"),
    "stop beyond iterations": (["--sparsity", "2:0.3,9:0.3"], "--iterations must exceed the last stop iteration (9)"),
    "zero images": (["--num-images", "0"], "--num-images must be positive"),
    "negative images": (["--num-images", "-3"], "--num-images must be positive"),
    "missing checkpoint": (["--model", "/nonexistent/x.safetensors"], "not found"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_nonzero(case, ckpt, tmp_path, capsys):
    extra, needle = BAD[case]
    args = ["invert", "--model", ckpt, *FAST, "--sparsity", "2:0.5", "--out", str(tmp_path / "o")]
    # later flags win in argparse
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smi: error:") and needle in err and "\n" not in err


def test_shape_mismatch_in_cli(ckpt, tmp_path, capsys):
    meta_path = tmp_path / "tiny.json"
    meta = json.loads(meta_path.read_text())
    meta["model_kwargs"]["depth"] = 3
    meta_path.write_text(json.dumps(meta))
    assert main(["invert", "--model", ckpt, *FAST, "--sparsity", "2:0.5", "--out", str(tmp_path / "o")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_nan_loss_names_the_learning_rate(tmp_path, capsys):
    nan = _nan_checkpoint(tmp_path)
    assert main(["invert", "--model", nan, *FAST, "--sparsity", "2:0.5", "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("smi: error:") and "learning rate" in last


def test_other_config_folder_is_refused_and_kept(ckpt, tmp_path, capsys):
    out = str(tmp_path / "pool")
    assert main(["invert", "--model", ckpt, *FAST, "--sparsity", "2:0.5", "--out", out]) == 0
    shards = sorted(p.read_bytes() for p in (tmp_path / "pool").glob("shard-*"))
    assert main(["invert", "--model", ckpt, *FAST, "--sparsity", "dense", "--out", out]) == 2
    assert "another config" in capsys.readouterr().err
    assert sorted(p.read_bytes() for p in (tmp_path / "pool").glob("shard-*")) == shards


def test_real_process_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "smi", "invert", "--model", "vit_tiny_patch16_2244", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_help_reads_every_registry(capsys):
    """Adding a method, term, sampler, curriculum, preset or dataset shows up in --help with no CLI edit."""
    from smi.data.datasets import DATASETS
    from smi.inversion import CURRICULA, LABELS, METHODS, TERMS
    from smi.quant import PRESETS

    for command, registries in (("invert", (METHODS, TERMS, LABELS, CURRICULA)), ("quantize", (PRESETS,)),
                                ("eval", (DATASETS,))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for registry in registries:
            for name in registry.names():
                assert name in text, (command, registry.what, name)


def test_settings_that_are_almost_surely_wrong_warn_in_one_line(ckpt, tmp_path, capsys):
    assert main(["invert", "--model", ckpt, *FAST, "--batch-size", "4", "--sparsity", "dense", "--lr", "1e6",
                 "--out", str(tmp_path / "p")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "smi: warning:" in line]
    assert len(warnings) == 1 and "learning rate 1e+06 is probably too high" in warnings[0]
    assert main(["invert", "--model", ckpt, *FAST, "--sparsity", "dense", "--out", str(tmp_path / "q")]) == 0
    assert "warning" not in capsys.readouterr().err  # the default learning rate does not saturate
    assert main(["distill", "--teacher", "fmnist_vit_tiny", "--student", "vit_tiny_patch16_224", "--noise",
                 "--epochs", "1", "--online-steps", "1", "--eval-data", "none", "--out", str(tmp_path / "kd")]) == 0
    assert "smi: warning: student vit_tiny_patch16_224 cuts the teacher's 28x28 images into 1x1 patches" \
        in capsys.readouterr().err


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import smi.cli

    def broken(args):
        raise RuntimeError("an smi bug")

    monkeypatch.setattr(smi.cli, "_cmd_pool_info", broken)
    assert main(["pool", "info", "somewhere"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an smi bug" in err and "please report" in err


def test_torch_uses_the_cpus_this_process_may_run_on(monkeypatch):
    import os

    from smi.utils import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SMI_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
        monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # a container allowed 1.5 CPUs
        assert threads.usable_cpus() == 2 and threads.configure_threads() == (2, "usable CPUs")
        monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
        assert threads.usable_cpus() == 6
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.configure_threads() == (1, "OMP_NUM_THREADS") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
