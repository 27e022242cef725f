"""Label samplers: what each synthetic image is optimized to be (a class, or a distribution over classes).

Every sampler starts from the class-balanced planned targets, so a pool's class counts do not
depend on the sampler; ``Labels.hard`` is what the pool stores as the image's label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LABEL_SAMPLERS", "Labels", "sample_labels", "easy_to_hard"]

LABEL_SAMPLERS = {
    "hard": "the planned class, cross-entropy",
    "sardfq": "softmax of logits that are 0 except the planned class's, drawn from U(sardfq_logit_low, _high)",
    "ris": "diversity-aware soft labels: logits ris_label_noise * N(0, 1), planned class's from U(4, 8)",
    "qimera": "with probability p_mix, a superposition of mix_k classes (the planned one and random others) "
              "weighted by softmax(N(0, 1)); else the planned class",
}


@dataclass
class Labels:
    hard: torch.Tensor  # (B,) the class the pool records
    soft: torch.Tensor | None  # (B, num_classes) target distribution, or None for plain cross-entropy


def sample_labels(kind: str, targets: torch.Tensor, num_classes: int, generator: torch.Generator,
                  options: dict[str, float]) -> Labels:
    B = targets.shape[0]
    if kind == "hard":
        return Labels(targets, None)
    if kind == "sardfq":
        z = torch.zeros(B, num_classes)
        lo, hi = options["sardfq_logit_low"], options["sardfq_logit_high"]
        z[torch.arange(B), targets] = lo + (hi - lo) * torch.rand(B, generator=generator)
        return Labels(targets, F.softmax(z, dim=1))
    if kind == "ris":
        z = options["ris_label_noise"] * torch.randn(B, num_classes, generator=generator)
        z[torch.arange(B), targets] = 4 + 4 * torch.rand(B, generator=generator)
        return Labels(targets, F.softmax(z, dim=1))
    if kind == "qimera":
        k = min(int(options["mix_k"]), num_classes)
        soft = F.one_hot(targets, num_classes).float()
        mixed = torch.rand(B, generator=generator) < options["p_mix"]
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
    raise ValueError(f"unknown label sampler {kind!r}")


def easy_to_hard(labels: Labels, num_classes: int, difficulty: float, min_confidence: float,
                 generator: torch.Generator) -> Labels:
    """The e2h curriculum: at difficulty 0 the targets are unchanged (easy, far from any boundary);
    at difficulty 1 only ``min_confidence`` of the target mass stays, the rest goes to one random
    other class, so the image is asked to sit near the boundary between the two.
    """
    keep = 1.0 - difficulty * (1.0 - min_confidence)
    base = labels.soft if labels.soft is not None else F.one_hot(labels.hard, num_classes).float()
    B = base.shape[0]
    other = torch.randint(0, num_classes - 1, (B,), generator=generator)
    other = other + (other >= labels.hard).long()
    soft = keep * base + (1 - keep) * F.one_hot(other, num_classes).float()
    return Labels(labels.hard, soft)
