"""DeepInversion's batch-norm prior (CVPR 2020): batch statistics match the teacher's running ones.

On by default for teachers with BatchNorm layers, at ``InversionConfig.bn_weight``.
"""

from __future__ import annotations

import torch

from smi.errors import SmiError
from smi.inversion.terms._base import TERMS, Context, Step, Term
from smi.models.loading import batch_norms

__all__ = ["BatchNormStatistics", "bn_statistics"]


def bn_statistics(inputs: list[torch.Tensor], running: list[tuple[torch.Tensor, torch.Tensor]],
                  first_weight: float = 10.0) -> torch.Tensor:
    """||mean - running_mean||_2 + ||var - running_var||_2 per BN layer.

    ``inputs[l]`` is the (B, C, H, W) input of BN layer ``l``; the first layer is weighted by
    ``first_weight``.
    """
    total = inputs[0].new_zeros(())
    for layer, (x, (rm, rv)) in enumerate(zip(inputs, running, strict=True)):
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
        term = torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)
        total = total + (first_weight if layer == 0 else 1.0) * term
    return total


@TERMS.register("bn")
class BatchNormStatistics(Term):
    """Distance of each BatchNorm layer's batch mean and variance to its running statistics (CNN teachers)."""

    segmentation = True

    captures = frozenset({"bn_inputs"})
    options = {"bn_first_weight": 10.0}

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.bns = batch_norms(ctx.model)
        if not self.bns:
            raise SmiError(f"the bn term needs BatchNorm layers; {type(ctx.model).__name__} has none",
                           param="terms")

    def __call__(self, step: Step) -> torch.Tensor:
        running = [(bn.running_mean, bn.running_var) for bn in self.bns]
        return bn_statistics(step.captured.bn_inputs[: len(self.bns)], running, self.ctx.option("bn_first_weight"))
