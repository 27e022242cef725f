"""Image priors for inversion, restricted to the pixels still being optimized."""

from __future__ import annotations

import torch

__all__ = ["total_variation", "image_l2", "blur_"]


def _pairs(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Neighbour pairs in four directions (right, down, two diagonals), as (a, b) slices."""
    return [
        (x[..., :, :-1], x[..., :, 1:]),
        (x[..., :-1, :], x[..., 1:, :]),
        (x[..., 1:, :-1], x[..., :-1, 1:]),
        (x[..., :-1, :-1], x[..., 1:, 1:]),
    ]


def total_variation(x: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepInversion's total variation in four directions: ``(tv_l1, tv_l2)``.

    tv_l2 is the sum over directions of the Frobenius norm of the neighbour differences over the
    whole batch; tv_l1 the sum over directions of their mean absolute value. With ``pixel_mask``
    (B, 1, H, W) only pairs whose two pixels are both still optimized count, so a stopped patch
    gets no TV gradient and does not pull on its kept neighbours.
    """
    l1 = x.new_zeros(())
    l2 = x.new_zeros(())
    m_pairs = _pairs(pixel_mask) if pixel_mask is not None else None
    for i, (a, b) in enumerate(_pairs(x)):
        d = a - b
        if m_pairs is not None:
            ma, mb = m_pairs[i]
            w = ma * mb
            d = d * w
            l1 = l1 + d.abs().sum() / (w.sum() * x.shape[1]).clamp_min(1)
        else:
            l1 = l1 + d.abs().mean()
        l2 = l2 + torch.linalg.vector_norm(d)
    return l1, l2


def image_l2(x: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of each image's L2 norm (only the optimized pixels)."""
    if pixel_mask is not None:
        x = x * pixel_mask
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


@torch.no_grad()
def blur_(x: torch.Tensor, amount: float) -> torch.Tensor:
    """In place: ``x <- (1 - amount) x + amount * blur(x)``, blur a 3x3 binomial filter per channel.

    Yosinski et al.'s (2015) smoothing step for activation maximisation: applied after every
    optimiser step it damps the high-frequency patterns an unregularised inversion settles into.
    """
    c = x.shape[1]
    k1 = x.new_tensor([1.0, 2.0, 1.0]) / 4
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    return x.lerp_(smooth, amount)
