"""Batch diversity (after CMI, IJCAI 2021, within one batch): the teacher's features of the images differ."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smi.inversion.terms._base import TERMS, Step, Term

__all__ = ["BatchDiversity", "mean_pairwise_cosine"]


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the B(B-1) ordered pairs of distinct rows of ``features`` (B, D)."""
    z = F.normalize(features.flatten(1), dim=1)
    sim = z @ z.T  # (B, B)
    B = sim.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / max(1, B * (B - 1))


@TERMS.register("diversity")
class BatchDiversity(Term):
    """Mean cosine similarity of the teacher's features (the head's input) between images of the batch."""

    captures = frozenset({"features"})

    def __call__(self, step: Step) -> torch.Tensor:
        return mean_pairwise_cosine(step.captured.features)
