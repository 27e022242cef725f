"""Fashion-MNIST scenes: one item at a random place and size on a cluttered background, with its mask.

The shipped Fashion-MNIST teachers see items that fill the frame, unlike the images sparse
inversion was made for (most ImageNet patches are background). A scene is a ``SIDE x SIDE``
canvas (56 x 56: DeiT's 14 x 14 token grid at 4-pixel patches) holding one item of the split,
scaled to a side of ``U(SCALE)`` pixels (its 28 x 28 box covers 15-37 % of the canvas; the
item's own pixels about half of that) at a uniform position, over class-independent clutter:

- a linear gradient (level and slope random, dark on average, as Fashion-MNIST's black is);
- smoothed texture noise of random strength;
- ``FRAGMENTS`` faint fragments of other items of the *same split* (random class, scale,
  rotation and place, partly off the canvas, at 12-30 % of their brightness), so that no
  background patch says which class the object is, and train scenes hold only train items.

The item's pixels (above ``ITEM_THRESHOLD``, dark ones included) are drawn opaque over the
background, composited with their resampled coverage as alpha; the mask is coverage > 0.5.
Scene ``i`` shows item ``i`` of the split, so its label is the item's. Everything random comes
from a generator seeded by (``seed``, split, chunk of ``CHUNK`` scenes), so a scene does not
depend on how many others are made or in what order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK", "FRAGMENTS", "ITEM_THRESHOLD", "SCALE", "SCENES_MEAN", "SCENES_STD", "SEGMENT_CLASSES", "SIDE",
    "make_scenes",
]

SIDE = 56
SCALE = (22.0, 34.0)  # side of the item's 28 x 28 box on the canvas, pixels
FRAGMENTS = 3
CHUNK = 1000
ITEM_THRESHOLD = 8  # item pixels above this (of 255) are the object, dark ones included
SPLIT_SEED = {"train": 1, "test": 2}
# pixel mean and std of the 60,000 training scenes (seed 0), in [0, 1]; a test re-measures them
SCENES_MEAN, SCENES_STD = (0.2029,), (0.1848,)
SEGMENT_CLASSES = ("background", "object")  # a segmenter's labels: mask False, True


def _warp(items: torch.Tensor, side: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, angle: torch.Tensor,
          out: int) -> torch.Tensor:
    """Items (N, C, h, w) in [0, 1] drawn on an ``out`` x ``out`` canvas: box side ``side`` px centred at
    (cx, cy) px, rotated by ``angle`` radians; zero outside the box."""
    k = out / side  # canvas units per item unit, in normalized coordinates
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = cx / out * 2 - 1, cy / out * 2 - 1  # box centre in normalized canvas coordinates
    theta = torch.stack([torch.stack([k * cos, k * sin, -k * (cos * u + sin * v)], 1),
                         torch.stack([-k * sin, k * cos, -k * (-sin * u + cos * v)], 1)], 1)
    grid = F.affine_grid(theta, [items.shape[0], items.shape[1], out, out], align_corners=False)
    return F.grid_sample(items, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _chunk(items: torch.Tensor, start: int, stop: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, S = stop - start, SIDE
    x = items[start:stop].float() / 255
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # background: gradient + smoothed texture + faint fragments of other items of the split
    angle = u(n) * 2 * math.pi
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    ramp = torch.cos(angle)[:, None, None] * xs + torch.sin(angle)[:, None, None] * ys
    bg = (u(n, 1, 1) * 0.25 + u(n, 1, 1) * 0.15 * ramp)[:, None]
    noise = F.avg_pool2d(torch.randn(n, 1, S + 2, S + 2, generator=gen), 3, stride=1)
    bg = bg + noise * (u(n, 1, 1, 1) * 0.12)
    for _ in range(FRAGMENTS):
        other = torch.randint(0, len(items), (n,), generator=gen)
        frag = _warp(items[other].float() / 255, SIDE * (0.4 + 0.6 * u(n)), u(n) * S, u(n) * S,
                     u(n) * 2 * math.pi, S)
        bg = torch.maximum(bg, frag * (0.12 + 0.18 * u(n, 1, 1, 1)))
    # the object
    side = SCALE[0] + (SCALE[1] - SCALE[0]) * u(n)
    cx = side / 2 + u(n) * (S - side)
    cy = side / 2 + u(n) * (S - side)
    shape = (x > ITEM_THRESHOLD / 255).float()  # the item's pixels: Fashion-MNIST's background is black
    both = _warp(torch.cat([x, shape], 1), side, cx, cy, torch.zeros(n), S)
    obj, alpha = both[:, :1], both[:, 1:]  # premultiplied: obj is zero wherever alpha is
    scene = obj + (1 - alpha) * bg.clamp(0, 1)
    return (scene * 255).round().clamp(0, 255).to(torch.uint8), (alpha > 0.5)[:, 0]


def make_scenes(items: torch.Tensor, split: str, seed: int = 0, limit: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 items (N, 1, 28, 28) of one split -> uint8 scenes (n, 1, SIDE, SIDE) and bool object masks
    (n, SIDE, SIDE), n = ``limit`` or N; scene i shows item i, its fragments come from ``items`` alone."""
    n = len(items) if limit is None else min(limit, len(items))
    scenes, masks = [], []
    for start in range(0, n, CHUNK):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + SPLIT_SEED[split] * 10_007 + start // CHUNK)
        s, m = _chunk(items, start, min(start + CHUNK, len(items)), gen)
        scenes.append(s)
        masks.append(m)
    return torch.cat(scenes)[:n], torch.cat(masks)[:n]
