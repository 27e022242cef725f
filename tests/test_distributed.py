"""torchrun: K processes make the same pool as one, and a run killed mid-way resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from smi.cli import main
from smi.data.pool import load_pool, verify_pool
from tests.helpers import write_tiny_checkpoint

ARGS = ["--num-images", "10", "--batch-size", "2", "--iterations", "6", "--sparsity", "2:0.5,4:0.5", "--no-grid"]


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "smi", "invert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _check_pool(folder, n: int, classes: int) -> None:
    pool = load_pool(folder)
    assert len(pool) == n
    index = torch.cat([t for t in _indices(folder)])
    assert sorted(index.tolist()) == list(range(n))  # every image once: no duplicate (target, seed)
    counts = torch.bincount(pool.labels, minlength=classes)
    assert counts.max() - counts.min() <= 1  # class balance
    assert verify_pool(folder) == []  # every shard readable, checksums match
    assert not list(folder.glob("manifest.*.json")) and not list(folder.glob(".*.tmp"))


def _indices(folder):
    from safetensors.torch import load_file

    return [load_file(str(p))["index"] for p in sorted(folder.glob("shard-*.safetensors"))]


def test_two_processes_make_the_pool_one_process_makes(tmp_path):
    ckpt = str(write_tiny_checkpoint(tmp_path))
    r = _torchrun(2, "--model", ckpt, *ARGS, "--out", str(tmp_path / "dist"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes" in r.stdout
    _check_pool(tmp_path / "dist", 10, 5)
    assert main(["invert", "--model", ckpt, *ARGS, "--out", str(tmp_path / "single")]) == 0
    a, b = load_pool(tmp_path / "dist"), load_pool(tmp_path / "single")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-4)  # thread counts differ: reduction order
    # each rank wrote its own shards: batches 0, 2, 4 on rank 0 and 1, 3 on rank 1
    assert [s["index"] for s in load_pool(tmp_path / "dist").manifest["shards"]] == [0, 1, 2, 3, 4]


@pytest.mark.slow  # end to end, 15-30 s: make test-all (CI) runs it
def test_rerun_with_another_process_count_resumes(tmp_path):
    """A pool started by 2 processes (killed before the merge) is finished by 1 process, then by 3."""
    ckpt = str(write_tiny_checkpoint(tmp_path))
    out = tmp_path / "p"
    r = _torchrun(2, "--model", ckpt, *ARGS, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    first = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    # lose the merged manifest's record of two shards, as if the merge had not happened
    (out / "shard-00003.safetensors").unlink()
    (out / "shard-00004.safetensors").unlink()
    assert main(["invert", "--model", ckpt, *ARGS, "--out", str(out)]) == 0
    _check_pool(out, 10, 5)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")}.keys() == first.keys()
    r = _torchrun(3, "--model", ckpt, *ARGS, "--out", str(out))  # nothing left to do
    assert r.returncode == 0, r.stderr[-2000:]
    _check_pool(out, 10, 5)


def _torchrun_cmd(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "smi", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow  # end to end, 15-30 s: make test-all (CI) runs it
def test_two_process_training_equals_one_process(tmp_path):
    """smi qat and smi distill under torchrun (gloo, data parallel): the same model as one process."""
    from safetensors.torch import load_file

    ckpt = str(write_tiny_checkpoint(tmp_path))
    assert main(["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "8", "--w-bits", "4",
                 "--a-bits", "4", "--out", str(tmp_path / "q")]) == 0
    qat_args = ["qat", "--model", ckpt, "--quantized", str(tmp_path / "q"), "--noise", "--train-images", "8",
                "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--eval-data", "none"]
    kd_args = ["distill", "--teacher", ckpt, "--student", "vit_tiny_patch16_224", "--noise", "--train-images", "8",
               "--batch-size", "4", "--epochs", "2", "--eval-data", "none"]
    for name, args, weights in (("qat", qat_args, "quantized.safetensors"), ("kd", kd_args, "student.safetensors")):
        r = _torchrun_cmd(2, *args, "--out", str(tmp_path / f"{name}2"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert main([*args, "--out", str(tmp_path / f"{name}1")]) == 0
        a = load_file(str(tmp_path / f"{name}2" / weights))
        b = load_file(str(tmp_path / f"{name}1" / weights))
        assert a.keys() == b.keys()
        for k in a:
            if a[k].dtype == torch.int8:  # integer codes: a rounding boundary may flip a code or two
                assert (a[k].int() - b[k].int()).abs().le(1).all() and (a[k] != b[k]).float().mean() < 0.01, k
            else:  # Adam turns float-rounding differences of near-zero gradients into steps of up to lr
                torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-4, msg=k)
        logs = [[json.loads(line)["loss"] for line in (tmp_path / f"{name}{n}" / "log.jsonl").read_text().splitlines()]
                for n in (1, 2)]
        assert logs[0] == pytest.approx(logs[1], rel=1e-3)  # the loss of the whole batch, averaged over processes
