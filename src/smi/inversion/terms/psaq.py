"""PSAQ-ViT's patch-similarity prior (ECCV 2022): diverse patch-to-patch similarities in every block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smi.inversion.terms._base import TERMS, Step, Term

__all__ = ["PatchSimilarityEntropy", "kde_entropy", "patch_similarity_entropy"]


def kde_entropy(samples: torch.Tensor, bandwidth: float = 0.01, points: int = 10, eps: float = 1e-4,
                span: tuple[float, float] | None = None) -> torch.Tensor:
    """Differential entropy of each row of ``samples`` (R, n) from a Gaussian kernel density.

    The density is evaluated at ``points`` evenly spaced values over ``span`` (default: the
    smallest and largest value of all rows); the entropy -∫ p log(p + eps) is integrated with the
    trapezoid rule (PSAQ-ViT's estimator). The evaluation points are constants: no gradient flows
    through the span, so the entropy can only rise by spreading the samples inside it, not by
    moving its ends. Returns (R,).
    """
    # the default span stays on the device: no host sync per step on an accelerator
    lo, hi = span if span is not None else (samples.detach().min(), samples.detach().max())
    t = lo + (hi - lo) * torch.linspace(0, 1, points, device=samples.device, dtype=samples.dtype)  # (P,)
    z = (t[None, :, None] - samples[:, None, :]) / bandwidth  # (R, P, n)
    p = torch.exp(-0.5 * z * z).mean(2) / (bandwidth * math.sqrt(2 * math.pi))  # (R, P)
    f = -p * torch.log(p + eps)
    return torch.trapezoid(f, t, dim=1)


def patch_similarity_entropy(attn_out: torch.Tensor, num_prefix: int, **kde: float) -> torch.Tensor:
    """PSAQ-ViT's prior for one block: entropy of the patch-to-patch cosine similarities.

    ``attn_out`` is the attention output before the projection, (B, T, heads, head_dim). It is
    averaged over heads, the prefix tokens are dropped, and the cosine similarity of every pair
    of patch tokens (diagonal excluded) forms each image's sample; the densities of the batch are
    evaluated on one grid between the batch's smallest and largest similarity. Returns (B,).

    The similarity matrix is symmetric, so each unordered pair is read once (the strict upper
    triangle): the density, a mean over the sample, is the same as over both orders, at half the
    cost of the kernel evaluations that dominate this prior.
    """
    x = attn_out.mean(2)[:, num_prefix:]  # (B, N, d)
    x = F.normalize(x, dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    i, j = torch.triu_indices(sim.shape[1], sim.shape[1], offset=1, device=sim.device)
    return kde_entropy(sim[:, i, j], **kde)


@TERMS.register("psaq")
class PatchSimilarityEntropy(Term):
    """Minus the KDE entropy of patch-to-patch cosine similarities of each block's attention output."""

    segmentation = True

    captures = frozenset({"attn_out"})
    options = {"kde_bandwidth": 0.01, "kde_points": 10}

    def __call__(self, step: Step) -> torch.Tensor:
        kde = {"bandwidth": self.ctx.option("kde_bandwidth"), "points": int(self.ctx.option("kde_points"))}
        return -sum(patch_similarity_entropy(a, self.ctx.num_prefix, **kde).mean() for a in step.captured.attn_out)
