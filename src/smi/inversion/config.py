"""Configs for model inversion: dataclasses validated on construction, round-tripped to JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from smi.errors import SmiError
from smi.inversion.labels import CURRICULA, LABELS
from smi.inversion.methods import GENQ_OPTIONS, METHODS
from smi.inversion.segmentation import SEGMENTATION_OPTIONS
from smi.inversion.terms import TERMS

__all__ = ["SparsityConfig", "InversionConfig", "known_options"]


def known_options() -> dict[str, float]:
    """Every knob a registered term, label sampler or curriculum reads, with its default; and a segmenter's
    target maps' (:mod:`smi.inversion.segmentation`) and the diffusion methods' (:mod:`smi.generators.diffusion`)."""
    return {**TERMS.all_options(), **LABELS.all_options(), **CURRICULA.all_options(), **SEGMENTATION_OPTIONS,
            **GENQ_OPTIONS}


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
                raise SmiError(f"stop iterations must be positive integers, got {it!r}", param="sparsity")
            if not (0.0 <= ratio < 1.0):
                raise SmiError(f"stop ratios must be in [0, 1), got {ratio} at iteration {it}", param="sparsity")
        if its != sorted(set(its)):
            raise SmiError(f"stop iterations must be strictly increasing, got {its}", param="sparsity")

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
                raise SmiError(f"{spec!r} is not a schedule: use 'default', 'dense' or 'ITER:RATIO,...' "
                               "such as '50:0.3,100:0.3'", param="sparsity") from None
        return cls(stops=tuple(stops))

    @property
    def dense(self) -> bool:
        return not self.stops

    def check_iterations(self, iterations: int) -> None:
        if self.stops and self.stops[-1][0] >= iterations:
            raise SmiError(f"must exceed the last stop iteration ({self.stops[-1][0]}) of the sparsity schedule, "
                           f"got {iterations}", param="iterations")

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

    method: str = "deepinversion"  # a name in smi.inversion.methods.METHODS
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
    blur: float = 0.0  # after each step, move the images this fraction toward their 3x3-blurred selves (0 = off)
    color_shift: float = 0.0  # Plug-In Inversion's random brightness/contrast of the view: strength (0 = off)
    crop: float = 0.0  # IntraQ's random crops: the view is a box of U(1 - crop, 1) of the area, resized (0 = off)
    importance_block: int = -1
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    labels: str = "hard"  # a name in smi.inversion.labels.LABELS
    curriculum: str = "none"  # a name in smi.inversion.labels.CURRICULA; e2h: batch b of n has difficulty b/(n-1)
    terms: dict[str, float] = field(default_factory=dict)  # extra loss terms (smi.inversion.terms.TERMS): weights
    options: dict[str, float] = field(default_factory=dict)  # the terms', samplers' and curricula's knobs
    rounds: tuple[float, ...] = ()  # jitter per round; iterations split evenly; () = one round at `jitter`
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine restarts each round
    warmup: int = 0  # linear warm-up steps at the start of each round
    bn_weight: float = 0.01  # batch-norm statistics prior, used when the teacher has BatchNorm layers
    # bf16: the teacher's forward and the loss run under torch.autocast(bfloat16) (matrix products in bf16);
    # the images, their gradients and Adam stay float32
    precision: Literal["fp32", "bf16"] = "fp32"

    @classmethod
    def for_method(cls, method: str = "deepinversion", **overrides: Any) -> InversionConfig:
        """The method's defaults (``METHODS[method].defaults``), with ``overrides`` on top; ``options`` are
        merged knob by knob (setting one knob keeps the method's others), every other field is replaced.

        >>> InversionConfig.for_method("psaq", lr=0.1).terms
        {'psaq': 1.0, 'tv_target': 0.05}
        """
        defaults = METHODS.get(method, param="method").defaults
        if "options" in overrides:
            overrides = {**overrides, "options": {**defaults.get("options", {}), **overrides["options"]}}
        return cls(method=method, **{**defaults, **overrides})

    def option(self, name: str) -> float:
        if name in self.options:
            return self.options[name]
        return known_options()[name]

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, dict):
            self.sparsity = SparsityConfig(stops=tuple((int(a), float(b)) for a, b in self.sparsity["stops"]))
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.rounds = tuple(float(r) for r in self.rounds)  # type: ignore[assignment]
        self.terms, self.options = dict(self.terms), dict(self.options)
        METHODS.get(self.method, param="method")
        LABELS.get(self.labels, param="labels")
        CURRICULA.get(self.curriculum, param="curriculum")
        for name, w in self.terms.items():
            TERMS.get(name, param="terms")
            if not (w >= 0 and math.isfinite(w)):
                raise SmiError(f"weight of {name} must be >= 0, got {w}", param="terms")
        known = known_options()
        for name, v in self.options.items():
            if name not in known:
                raise SmiError(f"unknown option {name!r}; choose from {', '.join(known)}", param="options")
            if not math.isfinite(v):
                raise SmiError(f"{name} must be finite, got {v}", param="options")
            if name.endswith("_temperature") and not v > 0:  # a softmax temperature divides
                raise SmiError(f"{name} must be positive, got {v}", param="options")
        layers = self.option("student_bn_layers")
        if layers < 0 or layers != int(layers):
            raise SmiError(f"student_bn_layers must be a whole number >= 0 (0: every layer), got {layers}",
                           param="options")
        if not 0 < self.option("p_mix") <= 1 or self.option("mix_k") < 2:
            raise SmiError("p_mix must be in (0, 1] and mix_k >= 2", param="options")
        if self.precision not in ("fp32", "bf16"):
            raise SmiError(f"must be fp32 or bf16, got {self.precision!r}", param="precision")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SmiError(f"must be constant or cosine, got {self.lr_schedule!r}", param="lr_schedule")
        for name in ("warmup", "bn_weight"):
            if not getattr(self, name) >= 0:
                raise SmiError(f"must be >= 0, got {getattr(self, name)}", param=name)
        if self.rounds and (self.iterations % len(self.rounds) or not all(0 <= r < 1 for r in self.rounds)):
            raise SmiError(f"{len(self.rounds)} rounds need iterations divisible by it and jitters in [0, 1)",
                           param="rounds")
        if self.iterations < 1:
            raise SmiError(f"must be >= 1, got {self.iterations}", param="iterations")
        if self.batch_size < 1:
            raise SmiError(f"must be >= 1, got {self.batch_size}", param="batch_size")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SmiError(f"must be positive, got {self.lr}", param="lr")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise SmiError(f"must be two numbers in [0, 1), got {self.betas}", param="betas")
        for name in ("ce_weight", "tv_l2", "tv_l1", "l2"):
            if not getattr(self, name) >= 0:
                raise SmiError(f"must be >= 0, got {getattr(self, name)}", param=name)
        if not (0 <= self.blur <= 1):
            raise SmiError(f"must be a fraction in [0, 1], got {self.blur}", param="blur")
        if not (0 <= self.color_shift <= 2):
            raise SmiError(f"must be in [0, 2] (log-contrast and shift range), got {self.color_shift}",
                           param="color_shift")
        if not (0 <= self.crop < 1):
            raise SmiError(f"must be a fraction of the area in [0, 1), got {self.crop}", param="crop")
        if self.crop and not self.sparsity.dense:
            raise SmiError("is dense-only: a resized view moves pixels off the token grid of sparse inversion",
                           param="crop")
        if not (0 <= self.jitter < 1):
            raise SmiError(f"must be a fraction of the side in [0, 1), got {self.jitter}", param="jitter")
        if self.jitter_unit not in ("patch", "pixel"):
            raise SmiError(f"must be 'patch' or 'pixel', got {self.jitter_unit!r}", param="jitter_unit")
        if self.jitter_unit == "pixel" and not self.sparsity.dense and self.jitter > 0:
            raise SmiError("must be 'patch' for sparse inversion: pixel jitter moves patches off the token grid",
                           param="jitter_unit")
        self.sparsity.check_iterations(self.iterations)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["sparsity"] = {"stops": [list(s) for s in self.sparsity.stops]}
        d["rounds"] = list(self.rounds)
        for name, unset in (("blur", 0.0), ("color_shift", 0.0), ("crop", 0.0), ("precision", "fp32")):
            if d[name] == unset:  # pools and runs recorded before the field existed still resume
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InversionConfig:
        return cls(**d)
