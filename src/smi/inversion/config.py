"""Configs for model inversion: dataclasses validated on construction, round-tripped to JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from smi.errors import SmiError

__all__ = ["SparsityConfig", "InversionConfig", "METHODS", "METHOD_DEFAULTS", "TERMS", "OPTIONS"]

METHODS: dict[str, str] = {
    "deepinversion": "cross-entropy on the planned classes + total variation, jitter and flip (CVPR 2020)",
    "psaq": "PSAQ-ViT: maximize the KDE entropy of patch similarities in every block + CE + |TV - v|; "
            "two rounds (jitter 15/224 then 30/224 of the side), cosine lr (ECCV 2022)",
    "sardfq": "SARDFQ: align deeper blocks' class-token attention to random Gaussian-mixture maps; "
              "soft labels with the target logit in U(5, 10); TV (ICCV 2025)",
    "mimiq": "MimiQ: make the attention maps of different heads agree (1 - SSIM^2) + CE + TV (AAAI 2025)",
    "ris": "RIS: deepinversion + robustness to input and weight perturbations + diversity-aware soft labels "
           "(AAAI 2024)",
    "qimera-mix": "Qimera: deepinversion with boundary-supporting samples, mixtures of 2 classes with "
                  "probability 0.4 (NeurIPS 2021)",
    "e2h": "DFQ-ViT's easy-to-hard curriculum on deepinversion: later batches ask for less confident "
           "targets, near a boundary with a second class (2025)",
}

# what each method changes in InversionConfig's defaults (any field can still be set explicitly)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepinversion": {},
    "psaq": dict(lr=0.2, betas=(0.5, 0.9), iterations=1000, tv_l2=0.0, rounds=(15 / 224, 30 / 224),
                 lr_schedule="cosine", warmup=100, terms={"psaq": 1.0, "tv_target": 0.05}),
    "sardfq": dict(labels="sardfq", tv_l2=0.0, tv_l1=0.05, terms={"sardfq": 50.0}),
    "mimiq": dict(tv_l2=2.5e-5, terms={"mimiq": 1.0}),
    "ris": dict(labels="ris", terms={"ris_input": 1.0, "ris_weight": 1.0}),
    "qimera-mix": dict(labels="qimera"),
    "e2h": dict(curriculum="e2h"),
}

TERMS: dict[str, str] = {
    "psaq": "minus the KDE entropy of patch-to-patch cosine similarities of each block's attention output",
    "tv_target": "|TV_l2(x) - v|, v ~ U(tv_target_low, tv_target_high) scaled to the batch and image size",
    "sardfq": "depth-weighted MSE of the class token's attention (deeper half) to Gaussian-mixture maps",
    "mimiq": "1 - SSIM^2 between the min-max-normalized attention rows of head pairs, every block",
    "ris_input": "cosine distance of the teacher's features under a second jitter and Gaussian noise",
    "ris_weight": "L1 distance of the teacher's predictions under Gaussian weight noise",
}

OPTIONS: dict[str, float] = {
    "kde_bandwidth": 0.01, "kde_points": 10,
    "tv_target_low": 2500.0, "tv_target_high": 3000.0,  # PSAQ-ViT's, for batch 32 at 3x224x224
    "sardfq_components": 3, "sardfq_sigma_low": 0.5, "sardfq_sigma_high": 2.0,  # in patches
    "sardfq_logit_low": 5.0, "sardfq_logit_high": 10.0,
    "ris_input_noise": 0.1, "ris_weight_noise": 0.05, "ris_label_noise": 0.5,
    "p_mix": 0.4, "mix_k": 2,
    "e2h_min_confidence": 0.55,
    "bn_first_weight": 10.0,
}  # fmt: skip


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
    labels: str = "hard"  # label sampler, see smi.inversion.labels.LABEL_SAMPLERS
    curriculum: str = "none"  # or "e2h": batch b of n asks for targets of difficulty b / (n - 1)
    terms: dict[str, float] = field(default_factory=dict)  # extra loss terms and their weights (TERMS)
    options: dict[str, float] = field(default_factory=dict)  # the terms' and samplers' knobs (OPTIONS)
    rounds: tuple[float, ...] = ()  # jitter per round; iterations split evenly; () = one round at `jitter`
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine restarts each round
    warmup: int = 0  # linear warm-up steps at the start of each round
    bn_weight: float = 0.01  # batch-norm statistics prior, used when the teacher has BatchNorm layers

    @classmethod
    def for_method(cls, method: str = "deepinversion", **overrides: Any) -> InversionConfig:
        """The method's defaults (METHOD_DEFAULTS), with ``overrides`` on top."""
        if method not in METHODS:
            raise SmiError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        return cls(method=method, **{**METHOD_DEFAULTS[method], **overrides})

    def option(self, name: str) -> float:
        return self.options.get(name, OPTIONS[name])

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, dict):
            self.sparsity = SparsityConfig(stops=tuple((int(a), float(b)) for a, b in self.sparsity["stops"]))
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.rounds = tuple(float(r) for r in self.rounds)  # type: ignore[assignment]
        self.terms, self.options = dict(self.terms), dict(self.options)
        if self.method not in METHODS:
            raise SmiError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        from smi.inversion.labels import LABEL_SAMPLERS

        if self.labels not in LABEL_SAMPLERS:
            raise SmiError(f"unknown label sampler {self.labels!r}; choose from {', '.join(LABEL_SAMPLERS)}")
        if self.curriculum not in ("none", "e2h"):
            raise SmiError(f"unknown curriculum {self.curriculum!r}; use none or e2h")
        for name, w in self.terms.items():
            if name not in TERMS:
                raise SmiError(f"unknown loss term {name!r}; choose from {', '.join(TERMS)}")
            if not (w >= 0 and math.isfinite(w)):
                raise SmiError(f"weight of {name} must be >= 0, got {w}")
        for name, v in self.options.items():
            if name not in OPTIONS:
                raise SmiError(f"unknown option {name!r}; choose from {', '.join(OPTIONS)}")
            if not math.isfinite(v):
                raise SmiError(f"option {name} must be finite, got {v}")
        if not 0 < self.option("p_mix") <= 1 or self.option("mix_k") < 2:
            raise SmiError("p_mix must be in (0, 1] and mix_k >= 2")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SmiError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.warmup < 0 or self.bn_weight < 0:
            raise SmiError("warmup and bn_weight must be >= 0")
        if self.rounds and (self.iterations % len(self.rounds) or not all(0 <= r < 1 for r in self.rounds)):
            raise SmiError(f"{len(self.rounds)} rounds need iterations divisible by it and jitters in [0, 1)")
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
        d["rounds"] = list(self.rounds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InversionConfig:
        return cls(**d)
