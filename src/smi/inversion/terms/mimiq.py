"""MimiQ's head-agreement prior (AAAI 2025): the attention maps of different heads look alike."""

from __future__ import annotations

import torch

from smi.inversion.terms._base import TERMS, Step, Term

__all__ = ["HeadAgreement", "head_agreement", "ssim_global"]


def ssim_global(x: torch.Tensor, y: torch.Tensor, c1: float = 0.01**2, c2: float = 0.03**2) -> torch.Tensor:
    """SSIM over the last dimension with global (not windowed) statistics; inputs in [0, 1]."""
    mx, my = x.mean(-1), y.mean(-1)
    vx, vy = x.var(-1, unbiased=False), y.var(-1, unbiased=False)
    cov = ((x - mx[..., None]) * (y - my[..., None])).mean(-1)
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def head_agreement(attn: torch.Tensor) -> torch.Tensor:
    """MimiQ's term for one block: mean over head pairs and query rows of 1 - SSIM² of the rows.

    ``attn`` is (B, heads, T, T); each row is min-max normalized to [0, 1] before the comparison.
    One head has no pair to agree with: the term is zero (not the mean of nothing).
    """
    if attn.shape[1] < 2:
        return attn.new_zeros(())
    lo = attn.amin(-1, keepdim=True)
    hi = attn.amax(-1, keepdim=True)
    a = (attn - lo) / (hi - lo).clamp_min(1e-8)
    H = a.shape[1]
    i, j = torch.triu_indices(H, H, offset=1)
    s = ssim_global(a[:, i], a[:, j])  # (B, pairs, T)
    return (1 - s * s).mean()


@TERMS.register("mimiq")
class HeadAgreement(Term):
    """1 - SSIM^2 between the min-max-normalized attention rows of head pairs, every block."""

    segmentation = True

    captures = frozenset({"attn"})

    def __call__(self, step: Step) -> torch.Tensor:
        attn = step.captured.attn
        return sum(head_agreement(a) for a in attn) / len(attn)
