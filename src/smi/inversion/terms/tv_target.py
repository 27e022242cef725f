"""PSAQ-ViT's total-variation target: keep TV near a sampled level instead of minimizing it."""

from __future__ import annotations

import math

import torch

from smi.inversion.terms._base import TERMS, Context, Step, Term

__all__ = ["TVTarget", "tv_target"]


def tv_target(tv: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """|TV(x) - v|."""
    return (tv - target).abs()


@TERMS.register("tv_target")
class TVTarget(Term):
    """|TV_l2(x) - v|, v ~ U(tv_target_low, tv_target_high) scaled to the batch and image size."""

    segmentation = True

    options = {"tv_target_low": 2500.0, "tv_target_high": 3000.0}  # PSAQ-ViT's, for batch 32 at 3x224x224

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        lo, hi = ctx.option("tv_target_low"), ctx.option("tv_target_high")
        self.level = lo + (hi - lo) * torch.rand((), generator=ctx.generator).item()

    def __call__(self, step: Step) -> torch.Tensor:
        # tv_l2 is a Frobenius norm, which grows as the square root of the number of values, so
        # PSAQ-ViT's level (batch 32 at 3x224x224) is scaled by sqrt(values / 32*3*224*224)
        scale = math.sqrt(step.images.numel() / (32 * 3 * 224 * 224))
        return tv_target(step.tv()[1], self.level * scale)
