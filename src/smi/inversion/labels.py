"""Label samplers and curricula: what each synthetic image is optimized to be.

A label sampler turns a batch's planned classes into :class:`Labels` (a class, or a distribution
over classes); a curriculum then adjusts them by the batch's place in the pool. Both are
registries: a new one is one decorated function here.

Every sampler starts from the class-balanced planned targets, so a pool's class counts do not
depend on the sampler; ``Labels.hard`` is what the pool stores as the image's label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smi.registry import Registry

__all__ = ["CURRICULA", "LABELS", "Labels", "easy_to_hard", "sample_labels", "soft_cross_entropy"]


@dataclass
class Labels:
    hard: torch.Tensor  # (B,) the class the pool records
    soft: torch.Tensor | None  # (B, num_classes) target distribution, or None for plain cross-entropy

    def cross_entropy(self, logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Against the hard classes, or the soft target distributions."""
        if self.soft is None:
            return F.cross_entropy(logits, self.hard.to(logits.device), reduction=reduction)
        return soft_cross_entropy(logits, self.soft.to(logits.device), reduction=reduction)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-sum_c target_c log softmax(logits)_c per image, averaged over the batch unless ``reduction="none"``;
    ``target`` rows sum to 1."""
    per_image = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return per_image if reduction == "none" else per_image.mean()


Option = Callable[[str], float]
Sampler = Callable[[torch.Tensor, int, torch.Generator, Option], Labels]  # (targets, classes, generator, option)
Curriculum = Callable[[Labels, int, float, torch.Generator, Option], Labels]  # (labels, classes, difficulty, ...)

LABELS: Registry[Sampler] = Registry("label sampler")
CURRICULA: Registry[Curriculum] = Registry("curriculum")


@LABELS.register("hard")
def hard_labels(targets: torch.Tensor, num_classes: int, generator: torch.Generator, option: Option) -> Labels:
    """The planned class, cross-entropy."""
    return Labels(targets, None)


@LABELS.register("sardfq", options={"sardfq_logit_low": 5.0, "sardfq_logit_high": 10.0})
def sardfq_labels(targets: torch.Tensor, num_classes: int, generator: torch.Generator, option: Option) -> Labels:
    """Softmax of logits that are 0 except the planned class's, drawn from U(sardfq_logit_low, _high)."""
    B = targets.shape[0]
    z = torch.zeros(B, num_classes)
    lo, hi = option("sardfq_logit_low"), option("sardfq_logit_high")
    z[torch.arange(B), targets] = lo + (hi - lo) * torch.rand(B, generator=generator)
    return Labels(targets, F.softmax(z, dim=1))


@LABELS.register("ris", options={"ris_label_noise": 0.5})
def ris_labels(targets: torch.Tensor, num_classes: int, generator: torch.Generator, option: Option) -> Labels:
    """Diversity-aware soft labels: logits ris_label_noise * N(0, 1), planned class's from U(4, 8)."""
    B = targets.shape[0]
    z = option("ris_label_noise") * torch.randn(B, num_classes, generator=generator)
    z[torch.arange(B), targets] = 4 + 4 * torch.rand(B, generator=generator)
    return Labels(targets, F.softmax(z, dim=1))


@LABELS.register("qimera", options={"p_mix": 0.4, "mix_k": 2})
def qimera_labels(targets: torch.Tensor, num_classes: int, generator: torch.Generator, option: Option) -> Labels:
    """With probability p_mix, a superposition of mix_k classes (the planned one and random others) weighted
    by softmax(N(0, 1)); else the planned class."""
    B = targets.shape[0]
    k = min(int(option("mix_k")), num_classes)
    soft = F.one_hot(targets, num_classes).float()
    mixed = torch.rand(B, generator=generator) < option("p_mix")
    hard = targets.clone()
    for b in mixed.nonzero().flatten().tolist():
        others = torch.randperm(num_classes - 1, generator=generator)[: k - 1]
        others = others + (others >= targets[b]).long()  # skip the planned class
        classes = torch.cat([targets[b:b + 1], others])
        w = F.softmax(torch.randn(k, generator=generator), dim=0)
        soft[b] = 0
        soft[b, classes] = w
        hard[b] = classes[w.argmax()]
    return Labels(hard, soft)


def sample_labels(kind: str, targets: torch.Tensor, num_classes: int, generator: torch.Generator,
                  options: dict[str, float] | None = None) -> Labels:
    """Labels from the sampler ``kind``, its knobs from ``options`` or their defaults."""
    defaults = LABELS.all_options()
    return LABELS.get(kind, param="labels")(targets, num_classes, generator,
                                            lambda name: (options or {}).get(name, defaults[name]))


@CURRICULA.register("none")
def no_curriculum(labels: Labels, num_classes: int, difficulty: float, generator: torch.Generator,
                  option: Option) -> Labels:
    """Every batch keeps its sampled labels."""
    return labels


@CURRICULA.register("e2h", options={"e2h_min_confidence": 0.55})
def easy_to_hard_curriculum(labels: Labels, num_classes: int, difficulty: float, generator: torch.Generator,
                            option: Option) -> Labels:
    """DFQ-ViT's easy-to-hard: batch b of n asks for targets of difficulty b / (n - 1), near a second class."""
    return easy_to_hard(labels, num_classes, difficulty, option("e2h_min_confidence"), generator)


def easy_to_hard(labels: Labels, num_classes: int, difficulty: float, min_confidence: float,
                 generator: torch.Generator) -> Labels:
    """At difficulty 0 the targets are unchanged (easy, far from any boundary); at difficulty 1 only
    ``min_confidence`` of the target mass stays, the rest goes to one random other class, so the
    image is asked to sit near the boundary between the two.
    """
    keep = 1.0 - difficulty * (1.0 - min_confidence)
    base = labels.soft if labels.soft is not None else F.one_hot(labels.hard, num_classes).float()
    B = base.shape[0]
    other = torch.randint(0, num_classes - 1, (B,), generator=generator)
    other = other + (other >= labels.hard).long()
    soft = keep * base + (1 - keep) * F.one_hot(other, num_classes).float()
    return Labels(labels.hard, soft)
