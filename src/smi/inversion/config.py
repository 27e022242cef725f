"""Configs for model inversion: dataclasses validated on construction, round-tripped to JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from smi.errors import SmiError

__all__ = ["SparsityConfig", "InversionConfig", "METHODS"]

METHODS: dict[str, str] = {
    "deepinversion": "cross-entropy on sampled classes + total variation, jitter and flip (Yin et al. 2020)",
}


@dataclass(frozen=True)
class SparsityConfig:
    """When to stop optimizing patches, and how many.

    ``stops`` is a sorted tuple of ``(iteration, ratio)``: at the end of ``iteration`` the
    ``ratio`` fraction of the patches still being optimized (ranked per image by the teacher's
    attention) is stopped for good. No stops means dense inversion.

    >>> SparsityConfig.parse("50:0.3,100:0.3").kept_counts(196)
    [196, 137, 96]
    """

    stops: tuple[tuple[int, float], ...] = ((50, 0.3), (100, 0.3), (200, 0.3), (300, 0.3))

    def __post_init__(self) -> None:
        its = [it for it, _ in self.stops]
        for it, ratio in self.stops:
            if not isinstance(it, int) or it < 1:
                raise SmiError(f"stop iteration must be a positive integer, got {it!r}")
            if not (0.0 <= ratio < 1.0):
                raise SmiError(f"stop ratio must be in [0, 1), got {ratio} at iteration {it}")
        if its != sorted(set(its)):
            raise SmiError(f"stop iterations must be strictly increasing, got {its}")

    @classmethod
    def parse(cls, spec: str) -> SparsityConfig:
        """``default`` | ``dense`` | ``"50:0.3,100:0.3,200:0.3,300:0.3"``."""
        spec = spec.strip()
        if spec == "default":
            return cls()
        if spec in ("dense", "none", ""):
            return cls(stops=())
        stops = []
        for part in spec.split(","):
            try:
                it, ratio = part.split(":")
                stops.append((int(it), float(ratio)))
            except ValueError:
                raise SmiError(f"bad sparsity {spec!r}: use 'default', 'dense' or 'ITER:RATIO,...' "
                               "such as '50:0.3,100:0.3'") from None
        return cls(stops=tuple(stops))

    @property
    def dense(self) -> bool:
        return not self.stops

    def check_iterations(self, iterations: int) -> None:
        if self.stops and self.stops[-1][0] >= iterations:
            raise SmiError(f"stop iteration {self.stops[-1][0]} must be smaller than iterations ({iterations})")

    def kept_counts(self, num_patches: int) -> list[int]:
        """Patches optimized in each phase: before the first stop, after each stop."""
        counts = [num_patches]
        for _, ratio in self.stops:
            counts.append(max(1, math.floor(counts[-1] * (1.0 - ratio) + 1e-9)))
        return counts

    def scaled(self, factor: float) -> SparsityConfig:
        """Stop iterations multiplied by ``factor`` (for runs with proportionally fewer iterations)."""
        return SparsityConfig(tuple((max(1, round(it * factor)), r) for it, r in self.stops))

    def spec(self) -> str:
        return ",".join(f"{it}:{r:g}" for it, r in self.stops) or "dense"


@dataclass
class InversionConfig:
    """Model inversion as in DeepInversion / SMI; defaults are the SMI paper's.

    Images are optimized in the model's normalized input space and clamped to the range a
    real image can take after each step. ``jitter`` is the largest shift as a fraction of the
    image side; with ``jitter_unit="patch"`` the shift is rounded to whole patches so that a
    kept patch is still exactly one token after the shift (required for sparse inversion).
    """

    method: str = "deepinversion"
    iterations: int = 4000
    batch_size: int = 32
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.99)
    ce_weight: float = 1.0
    tv_l2: float = 1e-4
    tv_l1: float = 0.0
    l2: float = 0.0
    jitter: float = 0.125
    jitter_unit: Literal["patch", "pixel"] = "patch"
    flip: bool = True
    importance_block: int = -1
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, dict):
            self.sparsity = SparsityConfig(stops=tuple((int(a), float(b)) for a, b in self.sparsity["stops"]))
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.method not in METHODS:
            raise SmiError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.iterations < 1:
            raise SmiError(f"iterations must be >= 1, got {self.iterations}")
        if self.batch_size < 1:
            raise SmiError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SmiError(f"learning rate must be positive, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise SmiError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("ce_weight", "tv_l2", "tv_l1", "l2"):
            if getattr(self, name) < 0:
                raise SmiError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.jitter < 1):
            raise SmiError(f"jitter must be a fraction of the side in [0, 1), got {self.jitter}")
        if self.jitter_unit not in ("patch", "pixel"):
            raise SmiError(f"jitter_unit must be 'patch' or 'pixel', got {self.jitter_unit!r}")
        if self.jitter_unit == "pixel" and not self.sparsity.dense and self.jitter > 0:
            raise SmiError("pixel jitter moves patches off the token grid; sparse inversion needs jitter_unit='patch'")
        self.sparsity.check_iterations(self.iterations)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["sparsity"] = {"stops": [list(s) for s in self.sparsity.stops]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InversionConfig:
        return cls(**d)
