"""Jitter (wrap-around roll) and horizontal flip, for images and for patch indices alike; colour shift; random crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Jitter", "sample_jitter", "apply_jitter", "jitter_indices", "rejitter", "pixel_mask_from_indices",
           "color_shift", "sample_crops", "crop_resize", "fill_background", "BACKGROUND_NOISE"]

BACKGROUND_NOISE = 0.25  # default largest texture std of a filled background, as a fraction of the pixel range


@dataclass(frozen=True)
class Jitter:
    dy: int  # shift down, in pixels (a multiple of the patch size in patch mode)
    dx: int  # shift right, in pixels
    flip: bool  # horizontal flip after the shift


def sample_jitter(limit: int, unit: int, flip: bool, generator: torch.Generator) -> Jitter:
    """Draw a shift in [-limit, limit] units (of ``unit`` pixels each) and a coin for the flip."""
    dy, dx = (torch.randint(-limit, limit + 1, (2,), generator=generator) * unit).tolist()
    do_flip = bool(torch.rand((), generator=generator) < 0.5) if flip else False
    return Jitter(dy, dx, do_flip)


def apply_jitter(x: torch.Tensor, j: Jitter) -> torch.Tensor:
    """(B, C, H, W) -> rolled (with wrap-around) then optionally flipped left-right."""
    if j.dy or j.dx:
        x = torch.roll(x, shifts=(j.dy, j.dx), dims=(2, 3))
    return x.flip(3) if j.flip else x


def jitter_indices(idx: torch.Tensor, grid: tuple[int, int], patch: int, j: Jitter) -> torch.Tensor:
    """Where each patch index lands after :func:`apply_jitter` (shifts must be whole patches)."""
    if j.dy % patch or j.dx % patch:
        raise ValueError(f"shift ({j.dy}, {j.dx}) is not a whole number of {patch}-pixel patches")
    gh, gw = grid
    r = torch.div(idx, gw, rounding_mode="floor")
    c = idx % gw
    r = (r + j.dy // patch) % gh
    c = (c + j.dx // patch) % gw
    if j.flip:
        c = gw - 1 - c
    return r * gw + c


def rejitter(idx: torch.Tensor, old: Jitter, new: Jitter, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Indices of patches in the ``old`` view -> the same patches in the ``new`` view (via the canonical frame)."""
    gh, gw = grid
    r, c = torch.div(idx, gw, rounding_mode="floor"), idx % gw
    if old.flip:
        c = gw - 1 - c
    r, c = (r - old.dy // patch) % gh, (c - old.dx // patch) % gw
    return jitter_indices(r * gw + c, grid, patch, new)


def pixel_mask_from_indices(idx: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Kept indices (B, K) -> float pixel mask (B, 1, H, W) with 1 on kept patches."""
    gh, gw = grid
    m = torch.zeros(idx.shape[0], gh * gw, device=idx.device)
    m.scatter_(1, idx, 1.0)
    m = m.view(-1, 1, gh, 1, gw, 1).expand(-1, -1, -1, patch, -1, patch)
    return m.reshape(idx.shape[0], 1, gh * patch, gw * patch)


def color_shift(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Plug-In Inversion's ColorShift: ``x * exp(u) + v`` with u, v ~ U(-strength, strength) per image and channel.

    Applied to the view the teacher sees (in its normalized space), it asks the images to be
    classified whatever their brightness and contrast, so they cannot rely on exact pixel levels
    (the high-contrast, saturated patterns a ViT otherwise inverts to). Pixelwise, so a kept
    patch is still exactly its token.
    """
    b, c = x.shape[:2]
    u, v = ((torch.rand(2, b, c, 1, 1, generator=generator) * 2 - 1) * strength).to(x.device, x.dtype)
    return x * u.exp() + v


def sample_crops(batch: int, cut: float, generator: torch.Generator) -> torch.Tensor:
    """One box per image for :func:`crop_resize`: (B, 4) rows ``(cx, cy, w, h)`` in the image's [-1, 1] frame.

    The box covers ``U(1 - cut, 1)`` of the image's area at an aspect ratio ``exp(U(log 3/4, log 4/3))``
    (torchvision's ``RandomResizedCrop`` ranges), each side at most the image's, anywhere it fits.
    """
    u = torch.rand(4, batch, generator=generator, dtype=torch.float64)
    area = 1 - cut * u[0]
    ratio = torch.exp((2 * u[1] - 1) * math.log(4 / 3))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # half-sides in the [-1, 1] frame
    return torch.stack([(1 - w) * (2 * u[2] - 1), (1 - h) * (2 * u[3] - 1), w, h], dim=1).float()


def crop_resize(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box (:func:`sample_crops`) resized back to the full (H, W), bilinear; differentiable in ``x``.

    IntraQ's local object reinforcement: the teacher must find the class in any large part of the image,
    so the object grows to fill it instead of hiding in a corner. Dense inversion only: a resized view
    moves pixels off the patch grid.
    """
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    boxes = boxes.to(x.device, x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = boxes[:, 2], boxes[:, 0], boxes[:, 3], boxes[:, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fill_background(x: torch.Tensor, idx: torch.Tensor, grid: tuple[int, int], patch: int, lo: torch.Tensor,
                    hi: torch.Tensor, noise: float, generator: torch.Generator, level: float | None = None
                    ) -> torch.Tensor:
    """Replace the patches sparse inversion stopped (all but the kept ``idx``) with a random background.

    Per image and channel a level ~ U(lo, hi) over the valid range (or ``lo + level * (hi - lo)`` for every
    image when ``level`` is given: 0 is black), plus Gaussian noise whose standard deviation is U(0, ``noise``)
    times the range per image, clamped to the range. A sparse image carries its class in the kept patches;
    its stopped patches are a flat fill (zero in a pool), which few real images look like. Shown filled this
    way while the teacher labels the kept patches, a student meets the object on backgrounds from flat black
    to textured. ``lo``/``hi``: (1, C, 1, 1).
    """
    b, c = x.shape[:2]
    u = torch.rand(b, c, 1, 1, generator=generator).to(x.device, x.dtype)
    if level is not None:  # the draw above still runs, so a fixed level leaves the texture's draws as they were
        u = torch.full_like(u, level)
    base = lo + u * (hi - lo)
    sd = torch.rand(b, 1, 1, 1, generator=generator).to(x.device, x.dtype) * noise * (hi - lo)
    texture = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * sd
    background = (base + texture).clamp(lo, hi)
    kept = pixel_mask_from_indices(idx, grid, patch).to(x.dtype)
    return kept * x + (1 - kept) * background
