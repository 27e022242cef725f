"""RIS's input robustness (AAAI 2024): features stay put under another jitter and Gaussian noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smi.inversion.augment import apply_jitter, rejitter, sample_jitter
from smi.inversion.terms._base import TERMS, Step, Term

__all__ = ["InputRobustness"]


@TERMS.register("ris_input")
class InputRobustness(Term):
    """Cosine distance of the teacher's features under a second jitter and Gaussian noise."""

    captures = frozenset({"features"})
    options = {"ris_input_noise": 0.1}

    def __call__(self, step: Step) -> torch.Tensor:
        x, ctx = step.images, self.ctx
        j2 = sample_jitter(step.jitter_limit, step.jitter_unit, ctx.config.flip, step.generator)
        noise = torch.randn(x.shape, generator=step.generator).to(x.device) * ctx.option("ris_input_noise")
        keep2 = None if step.keep is None else rejitter(step.keep, step.jitter, j2, ctx.grid, step.jitter_unit)
        _, captured = step.forward(apply_jitter(x, j2) + noise, keep2)
        return (1 - F.cosine_similarity(step.captured.features, captured.features, dim=1)).mean()
