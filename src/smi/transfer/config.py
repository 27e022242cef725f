"""Distillation settings: a dataclass validated on construction, round-tripped to JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from smi.errors import SmiError

__all__ = ["DistillConfig"]


@dataclass
class DistillConfig:
    """How a student learns from the teacher's outputs (defaults: the SMI reference's KL at T=20).

    ``steps_per_epoch=None`` means one pass over the training images (offline pools, real
    images); online runs and noise have no natural epoch, so they take ``online_steps``.
    Wall time counts synthesis and training, not the per-epoch evaluation.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    temperature: float = 20.0
    ce_weight: float = 0.0  # cross-entropy on the teacher's argmax, added to the KL term
    steps_per_epoch: int | None = None
    online_steps: int = 50
    online_images: int = 32  # images synthesized per epoch in online mode
    augment: bool = True  # random whole-patch shift (up to 1/8 of the side) and horizontal flip
    color_shift: float = 0.0  # random contrast exp(U(-s, s)) and brightness U(-s, s) per image, clamped to range
    background: float = 0.0  # probability that the student sees a sparse batch whole, on random backgrounds
    mixup: float = 0.0  # probability that a batch is replaced by mixtures of its images (the teacher labels them)
    linear_probe: bool = False  # freeze the student's backbone, train a new head
    new_head: bool = False  # fine-tuning a backbone from other data: a new head for the teacher's classes, all trained
    time_budget_s: float | None = None  # stop after the epoch at which synthesis + training exceed this
    eval_images: int | None = None  # first N test images for the per-epoch evaluation (None: all)
    train_images: int | None = None  # train on a fixed set of N images of the source (as calibration draws them)
    style_pairs: float = 0.0  # Causal-DFQ: weight of the student matching the teacher across style pairs
    attention: float = 0.0  # weight of attention transfer: each block's attention rows, KL to the teacher's
    ema: float = 0.0  # decay of a moving average of the student's weights, evaluated and saved instead (0: off)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "online_steps", "online_images"):
            if getattr(self, name) < 1:
                raise SmiError(f"must be >= 1, got {getattr(self, name)}", param=name)
        if not (0 < self.lr < 1) or not (0 <= self.min_lr <= self.lr):
            raise SmiError(f"must be in (0, 1) and at least min_lr ({self.min_lr}), got {self.lr}", param="lr")
        if self.lr_schedule not in ("cosine", "constant"):
            raise SmiError(f"must be cosine or constant, got {self.lr_schedule!r}", param="lr_schedule")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise SmiError(f"must be positive, got {self.temperature}", param="temperature")
        if not 0 <= self.color_shift <= 2:
            raise SmiError(f"must be in [0, 2], got {self.color_shift}", param="color_shift")
        for name in ("mixup", "background"):
            if not 0 <= getattr(self, name) <= 1:
                raise SmiError(f"must be a probability in [0, 1], got {getattr(self, name)}", param=name)
        for name in ("ce_weight", "style_pairs", "attention"):
            if not getattr(self, name) >= 0:
                raise SmiError(f"must be >= 0, got {getattr(self, name)}", param=name)
        for name in ("steps_per_epoch", "eval_images", "train_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SmiError(f"must be positive, got {v}", param=name)
        if not 0 <= self.ema < 1:
            raise SmiError(f"must be a decay in [0, 1) (0: off), got {self.ema}", param="ema")
        if self.attention and self.background:
            raise SmiError("attention transfer compares the teacher's and the student's attention over the same "
                           "tokens; with a background the student sees other tokens than the teacher",
                           param="attention")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise SmiError(f"must be positive seconds, got {self.time_budget_s}", param="time_budget_s")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name, unset in (("train_images", None), ("mixup", 0.0), ("color_shift", 0.0), ("background", 0.0),
                            ("style_pairs", 0.0), ("attention", 0.0), ("ema", 0.0),
                            ("new_head", False)):
            if d[name] == unset:  # runs recorded before the field existed still resume
                del d[name]
        return d
