"""torchrun: K processes make the same pool as one, and a run killed mid-way resumes."""

import os
import subprocess
import sys

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
