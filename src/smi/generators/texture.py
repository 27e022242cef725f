"""TexQ's texture prior (Chen et al., NeurIPS 2023): Laws' texture energy, per-class calibration centres.

Laws' masks are the 16 outer products of four 5-tap vectors: level L5 = (1, 4, 6, 4, 1), edge
E5 = (-1, -2, 0, 2, 1), spot S5 = (-1, 0, 2, 0, -1) and ripple R5 = (1, -4, 6, -4, 1). An image's
texture energy for a mask is the mean absolute response of the (channel-averaged) image to it,
normalized by the L5L5 (local level) energy so that contrast does not count as texture; each
symmetric pair (E5L5 and L5E5, ...) is averaged, which leaves 9 rotation-insensitive features
(TexQ's paper says "Laws' texture energy"; this standard reduction is smi's choice).

TexQ inverts calibration images with the BN prior and takes each class's mean texture vector as its
*texture calibration centre*; its generator is then pulled toward the centre of each image's class.
Here the calibration images are any synthetic pool of the same teacher (``smi invert``, e.g. dense
DeepInversion on a CNN teacher), and the pull is the squared distance of each generated image's
features to its class centre (the weighted centre for class weights).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["LAWS_VECTORS", "laws_features", "texture_centres", "texture_loss"]

LAWS_VECTORS = {
    "L5": (1.0, 4.0, 6.0, 4.0, 1.0),
    "E5": (-1.0, -2.0, 0.0, 2.0, 1.0),
    "S5": (-1.0, 0.0, 2.0, 0.0, -1.0),
    "R5": (1.0, -4.0, 6.0, -4.0, 1.0),
}


def _masks(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    v = {k: torch.tensor(t, device=device, dtype=dtype) for k, t in LAWS_VECTORS.items()}
    return torch.stack([torch.outer(v[a], v[b]) for a, b in itertools.product(v, v)])[:, None]  # (16, 1, 5, 5)


def laws_features(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B, 9) Laws texture energies: pair-averaged, relative to the L5L5 energy."""
    grey = x.mean(1, keepdim=True)
    energy = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="reflect"), _masks(x.device, x.dtype)).abs().mean((2, 3))
    e = energy.view(-1, 4, 4)  # e[:, i, j]: vectors i (rows) and j (columns)
    level = e[:, 0, 0:1].clamp_min(1e-6)
    pairs = [(e[:, i, j] + e[:, j, i]) / 2 for i in range(4) for j in range(i, 4) if (i, j) != (0, 0)]
    return torch.stack(pairs, 1) / level  # (B, 9)


@torch.no_grad()
def texture_centres(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, 9) mean Laws features of each class's images; a class without images gets the overall mean."""
    feats = torch.cat([laws_features(images[i:i + 256]) for i in range(0, len(images), 256)])
    overall = feats.mean(0)
    return torch.stack([feats[labels == c].mean(0) if (labels == c).any() else overall for c in range(num_classes)])


def texture_loss(x: torch.Tensor, y: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each image's Laws features to its class centre (labels, or class weights)."""
    target = centres[y] if y.ndim == 1 else y.to(centres.dtype) @ centres
    return ((laws_features(x) - target) ** 2).sum(1).mean()
