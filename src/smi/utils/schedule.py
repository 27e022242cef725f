"""The learning-rate schedule every loop uses: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["Schedule", "scheduled_lr", "warmup_cosine"]

Schedule = Literal["cosine", "constant"]


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` down to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def scheduled_lr(schedule: Schedule, step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` of ``total``: warm-up, then ``lr`` (constant) or cosine to ``min_lr``.

    >>> scheduled_lr("constant", 5, 10, 2, 0.1), round(scheduled_lr("cosine", 10, 10, 2, 0.1), 6)
    (0.1, 0.0)
    """
    if schedule == "constant" and step >= warmup:
        return lr
    return warmup_cosine(step, total, warmup, lr, min_lr)
