"""SIGKILL at random moments, then the same command again: the pool ends exactly as if never killed.

Slow (each trial starts Python, torch and timm): run by ``make test-all``, which CI runs.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from smi.data.pool import load_pool, verify_pool
from tests.helpers import write_tiny_checkpoint
from tests.test_distributed import _check_pool

pytestmark = pytest.mark.slow

ARGS = ["--num-images", "12", "--batch-size", "2", "--iterations", "150", "--sparsity", "20:0.5,40:0.5",
        "--no-grid"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True)


def _assert_consistent(folder):
    """Whatever the moment of the kill: the manifest lists only whole shards whose checksums match."""
    if (folder / "manifest.json").exists():
        assert verify_pool(folder) == []


def _shards(folder):
    return len(list(folder.glob("shard-*.safetensors"))) if folder.exists() else 0


def _kill_after(p, folder, n_shards, delay, timeout=120.0):
    """SIGKILL ``p`` ``delay`` seconds after ``folder`` holds ``n_shards`` shards (0: after start).

    Moments are tied to progress, not wall time, so a fast machine cannot finish the pool before
    any kill lands (CI once did, with sleeps of 2-7 s). Returns whether the kill happened.
    """
    deadline = time.monotonic() + timeout
    while p.poll() is None and _shards(folder) < n_shards and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if p.poll() is not None:
        return False
    p.send_signal(signal.SIGKILL)
    return True


def test_sigkill_at_random_moments_then_rerun(tmp_path):
    ckpt = str(write_tiny_checkpoint(tmp_path))
    cmd = [sys.executable, "-m", "smi", "invert", "--model", ckpt, *ARGS]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref")], env=ENV, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    rng = random.Random(1234)
    out = tmp_path / "killed"
    kills, shards_at_kill = 0, []
    # first trial: a kill during start-up (imports, model load, before any shard); then each trial
    # lets 1-2 more shards land and kills at a random moment of the next batch (mid-optimisation or mid-write)
    plan = [(0, rng.uniform(0.5, 3.0))] + [(None, rng.uniform(0.0, 0.6)) for _ in range(5)]
    for n_shards, delay in plan:
        before = _shards(out)
        target = n_shards if n_shards is not None else min(before + rng.randint(1, 2), 5)
        p = _start(cmd + ["--out", str(out)])
        kills += _kill_after(p, out, target, delay)
        p.wait()
        _assert_consistent(out)
        shards_at_kill.append(_shards(out))
    assert kills >= 3, "the runs finished before being killed; make them longer"
    assert any(0 < n < 6 for n in shards_at_kill), f"no kill landed mid-pool: {shards_at_kill}"
    done = subprocess.run(cmd + ["--out", str(out)], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_pool(out, 12, 5)
    a, b = load_pool(tmp_path / "ref"), load_pool(out)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)


def test_sigkill_one_rank_of_a_distributed_run_then_rerun(tmp_path):
    ckpt = str(write_tiny_checkpoint(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "smi",
           "invert", "--model", ckpt, *ARGS, "--out", str(tmp_path / "p")]
    rng = random.Random(99)
    kills = 0
    for _ in range(3):
        agent = _start(cmd)
        folder = tmp_path / "p"
        target = min(_shards(folder) + rng.randint(1, 2), 5)
        deadline = time.monotonic() + 120
        while agent.poll() is None and _shards(folder) < target \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        if agent.poll() is None and ranks:
            os.kill(int(rng.choice(ranks)), signal.SIGKILL)
            kills += 1
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert kills >= 1
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_pool(tmp_path / "p", 12, 5)
