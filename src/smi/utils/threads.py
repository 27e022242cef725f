"""How many CPU threads torch should use: the CPUs this process may actually run on.

torch starts one OpenMP thread per core it sees, even when a cgroup quota (a container) or an
affinity mask (``taskset``) allows fewer; the extra threads then spin against each other and a
2-core machine shared with another job can run 10x slower. ``OMP_NUM_THREADS`` (or
``SMI_THREADS``), when set, is the user's choice and wins.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["configure_threads", "usable_cpus"]


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` or v1 CFS quota, or None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, int(-(-quota // 1))))
    return max(1, n)


def configure_threads() -> tuple[int, str]:
    """Set torch's intra-op threads; returns (threads, where the number came from)."""
    import torch

    for var in ("SMI_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            torch.set_num_threads(int(value))
            return int(value), var
    n = usable_cpus()
    torch.set_num_threads(n)
    return n, "usable CPUs"
