"""RIS's weight robustness (AAAI 2024): predictions stay put under Gaussian noise on the teacher's weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from smi.inversion.augment import apply_jitter
from smi.inversion.terms._base import TERMS, Step, Term

__all__ = ["WeightRobustness", "with_weight_noise"]


class _Call(nn.Module):
    """Holds the teacher as a submodule so torch.func.functional_call can swap its weights for one call."""

    def __init__(self, model: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, view: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.fn(view, keep)


def with_weight_noise(model: nn.Module, forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                      rel: float, generator: torch.Generator, view: torch.Tensor,
                      keep: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``forward`` with Gaussian noise of ``rel`` x each weight matrix's std added (out of place:
    the teacher's own tensors, which the clean step's graph holds, are never modified)."""
    noisy = {f"model.{n}": p + torch.randn(p.shape, generator=generator).to(p.device) * (rel * p.std())
             for n, p in model.named_parameters() if p.ndim > 1}
    return torch.func.functional_call(_Call(model, forward), noisy, (view, keep), strict=False)


@TERMS.register("ris_weight")
class WeightRobustness(Term):
    """L1 distance of the teacher's predictions under Gaussian weight noise."""

    options = {"ris_weight_noise": 0.05}

    def __call__(self, step: Step) -> torch.Tensor:
        clean = F.softmax(step.logits, dim=1)
        # the view is rolled again from the iterate rather than taken from step.view: the same values, and the
        # gradient accumulates in the same order as in the pools made before the terms were registered
        view = apply_jitter(step.images, step.jitter)
        noisy = with_weight_noise(self.ctx.model, lambda v, k: step.forward(v, k)[0],
                                  self.ctx.option("ris_weight_noise"), step.generator, view, step.keep)
        return (F.softmax(noisy, dim=1) - clean).abs().sum(1).mean()
