"""Loss terms ("priors") of the synthesis methods, as functions of what one teacher step exposes.

Each function takes plain tensors (the attention maps, attention outputs, features or
batch-norm inputs a step captured) so that it can be checked on a tiny input whose answer can
be worked out by hand. :mod:`smi.inversion.methods` composes them into named methods.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "bn_statistics", "gaussian_mixture_attention", "kde_entropy", "patch_similarity_entropy", "soft_cross_entropy",
    "ssim_global", "head_agreement", "sardfq_attention_alignment", "tv_target",
]  # fmt: skip


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-sum_c target_c log softmax(logits)_c per image, averaged over the batch unless ``reduction="none"``;
    ``target`` rows sum to 1."""
    per_image = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return per_image if reduction == "none" else per_image.mean()


def kde_entropy(samples: torch.Tensor, bandwidth: float = 0.01, points: int = 10, eps: float = 1e-4,
                span: tuple[float, float] | None = None) -> torch.Tensor:
    """Differential entropy of each row of ``samples`` (R, n) from a Gaussian kernel density.

    The density is evaluated at ``points`` evenly spaced values over ``span`` (default: the
    smallest and largest value of all rows); the entropy -∫ p log(p + eps) is integrated with the
    trapezoid rule (PSAQ-ViT's estimator). The evaluation points are constants: no gradient flows
    through the span, so the entropy can only rise by spreading the samples inside it, not by
    moving its ends. Returns (R,).
    """
    if span is None:
        span = (samples.min().item(), samples.max().item())
    t = torch.linspace(span[0], span[1], points, device=samples.device, dtype=samples.dtype)  # (P,)
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
    """
    x = attn_out.mean(2)[:, num_prefix:]  # (B, N, d)
    x = F.normalize(x, dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    N = sim.shape[1]
    off = ~torch.eye(N, dtype=torch.bool, device=sim.device)
    return kde_entropy(sim[:, off], **kde)


def tv_target(tv: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's |TV(x) - v|: keeps the total variation near a sampled level instead of minimizing it."""
    return (tv - target).abs()


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


def ssim_global(x: torch.Tensor, y: torch.Tensor, c1: float = 0.01**2, c2: float = 0.03**2) -> torch.Tensor:
    """SSIM over the last dimension with global (not windowed) statistics; inputs in [0, 1]."""
    mx, my = x.mean(-1), y.mean(-1)
    vx, vy = x.var(-1, unbiased=False), y.var(-1, unbiased=False)
    cov = ((x - mx[..., None]) * (y - my[..., None])).mean(-1)
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def head_agreement(attn: torch.Tensor) -> torch.Tensor:
    """MimiQ's term for one block: mean over head pairs and query rows of 1 - SSIM² of the rows.

    ``attn`` is (B, heads, T, T); each row is min-max normalized to [0, 1] before the comparison.
    """
    lo = attn.amin(-1, keepdim=True)
    hi = attn.amax(-1, keepdim=True)
    a = (attn - lo) / (hi - lo).clamp_min(1e-8)
    H = a.shape[1]
    i, j = torch.triu_indices(H, H, offset=1)
    s = ssim_global(a[:, i], a[:, j])  # (B, pairs, T)
    return (1 - s * s).mean()


def bn_statistics(inputs: list[torch.Tensor], running: list[tuple[torch.Tensor, torch.Tensor]],
                  first_weight: float = 10.0) -> torch.Tensor:
    """DeepInversion's batch-norm prior: ||mean - running_mean||_2 + ||var - running_var||_2 per BN layer.

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
