"""Calibration sources: a synthetic pool (kept patches only), real training images, or Gaussian noise."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from smi.data.pool import check_pool_teacher, load_pool
from smi.errors import SmiError
from smi.models.loading import Teacher
from smi.models.sparse import mask_to_indices, sparse_forward

__all__ = ["CalibrationSet", "calibration_set", "calibration_forward"]


@dataclass
class CalibrationSet:
    source: str  # 'real', 'noise' or the pool folder
    images: torch.Tensor  # (N, C, H, W) normalized model inputs
    masks: torch.Tensor | None  # (N, num_patches) bool for sparse pool images, else None

    def batches(self, batch_size: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for i in range(0, len(self.images), batch_size):
            m = None if self.masks is None else self.masks[i:i + batch_size]
            yield self.images[i:i + batch_size], m


def calibration_set(teacher: Teacher, source: str, num_images: int = 32, seed: int = 0) -> CalibrationSet:
    """``source`` is ``real`` (random training images), ``noise`` (N(0, 1) in input space) or a pool folder.

    From a pool, the first ``num_images`` images are used (a pool's order is already seeded);
    pool images whose patches were all kept are passed as dense images.
    """
    if num_images < 1:
        raise SmiError(f"--calib-images must be positive, got {num_images}")
    gen = torch.Generator().manual_seed(seed)
    if source == "noise":
        return CalibrationSet("noise", torch.randn(num_images, *teacher.input_size, generator=gen), None)
    if source == "real":
        return CalibrationSet("real", _real_images(teacher, num_images, gen), None)
    pool = load_pool(Path(source))
    check_pool_teacher(pool, teacher.fingerprint, teacher.spec, source)
    if num_images > len(pool):
        raise SmiError(f"--calib-images {num_images} is larger than the pool ({len(pool)} images in {source})")
    masks = pool.masks[:num_images]
    return CalibrationSet(str(source), pool.images[:num_images], None if masks.all() else masks)


def _real_images(teacher: Teacher, n: int, gen: torch.Generator) -> torch.Tensor:
    from smi.data.eval_data import real_training_images
    from smi.data.fashion_mnist import normalize_uint8

    x, _ = real_training_images(teacher)
    idx = torch.randperm(len(x), generator=gen)[:n]
    return normalize_uint8(x[idx], teacher.mean, teacher.std)


@torch.no_grad()
def calibration_forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    """Forward one calibration batch: sparse pool images feed only their kept patches."""
    images, masks = batch
    device = next(model.parameters()).device
    images = images.to(device)
    if masks is None:
        model(images)
    else:
        sparse_forward(model, images, mask_to_indices(masks).to(device))
    return images.shape[0]
