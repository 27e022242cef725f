"""SARDFQ's attention prior (ICCV 2025): the class token attends to random Gaussian-mixture maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smi.inversion.terms._base import TERMS, Context, Step, Term

__all__ = ["AttentionAlignment", "gaussian_mixture_attention", "sardfq_attention_alignment"]


def gaussian_mixture_attention(grid: tuple[int, int], heads: int, components: int, sigma: tuple[float, float],
                               generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Random attention priors (batch, heads, N): per head a mixture of Gaussian bumps on the patch grid.

    Centres uniform on the grid, widths uniform in ``sigma`` (in patches), equal weights; each
    map sums to 1.
    """
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float32).view(gh, 1).expand(gh, gw).reshape(-1)
    cols = torch.arange(gw, dtype=torch.float32).view(1, gw).expand(gh, gw).reshape(-1)
    cy = torch.rand(batch, heads, components, 1, generator=generator) * (gh - 1)
    cx = torch.rand(batch, heads, components, 1, generator=generator) * (gw - 1)
    s = sigma[0] + torch.rand(batch, heads, components, 1, generator=generator) * (sigma[1] - sigma[0])
    d2 = (rows - cy) ** 2 + (cols - cx) ** 2  # (batch, heads, M, N)
    m = torch.exp(-d2 / (2 * s * s)).sum(2)
    return m / m.sum(-1, keepdim=True)


def sardfq_attention_alignment(cls_attn: list[torch.Tensor], priors: torch.Tensor, keep: torch.Tensor | None,
                               depth: int) -> torch.Tensor:
    """SARDFQ's attention prior: MSE between the class token's attention over patches and a prior map.

    ``cls_attn[i]`` is (B, heads, K) for block ``first + i`` of the deeper half (renormalized over
    the K kept patches); ``priors`` (B, heads, N) are restricted to the kept patches and
    renormalized too. Block ``l`` (0-based) is weighted by (l + 1) / depth, so deeper blocks count
    more; the result is divided by the sum of the weights.
    """
    first = depth - len(cls_attn)
    if keep is not None:
        priors = priors.gather(2, keep[:, None, :].expand(-1, priors.shape[1], -1))
    priors = priors / priors.sum(-1, keepdim=True)
    total, weights = cls_attn[0].new_zeros(()), 0.0
    for i, a in enumerate(cls_attn):
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        w = (first + i + 1) / depth
        total = total + w * F.mse_loss(a, priors)
        weights += w
    return total / weights


@TERMS.register("sardfq")
class AttentionAlignment(Term):
    """Depth-weighted MSE of the class token's attention (deeper half) to Gaussian-mixture maps."""

    captures = frozenset({"attn"})
    options = {"sardfq_components": 3, "sardfq_sigma_low": 0.5, "sardfq_sigma_high": 2.0}  # sigma in patches

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.priors = gaussian_mixture_attention(
            ctx.grid, ctx.blocks[0].attn.num_heads, int(ctx.option("sardfq_components")),
            (ctx.option("sardfq_sigma_low"), ctx.option("sardfq_sigma_high")), ctx.generator,
            batch=ctx.targets.shape[0])  # (B, heads, N)

    def __call__(self, step: Step) -> torch.Tensor:
        depth, prefix = len(self.ctx.blocks), self.ctx.num_prefix
        cls_rows = [a[:, :, 0, prefix:] for a in step.captured.attn[depth // 2:]]  # (B, heads, K) per deep block
        return sardfq_attention_alignment(cls_rows, self.priors.to(step.logits.device), step.keep, depth)
