"""Calibration sets: a fixed draw of images from a data source (pool, real images or noise)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from smi.data.sources import DataSource, ModelSpec, parse_source
from smi.errors import SmiError

__all__ = ["CalibrationSet", "calibration_set"]


@dataclass
class CalibrationSet:
    """Images to calibrate on; iterating yields ``(images, masks)`` batches that :func:`smi.quant.quantize_` reads."""

    source: str  # 'real', 'noise' or the pool folder
    images: torch.Tensor  # (N, C, H, W) normalized model inputs
    masks: torch.Tensor | None  # (N, num_patches) bool for sparse pool images, else None
    batch_size: int = 32

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        bs = batch_size or self.batch_size
        for i in range(0, len(self.images), bs):
            m = None if self.masks is None else self.masks[i:i + bs]
            yield self.images[i:i + bs], m

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self.batches()

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.images) // self.batch_size)


def calibration_set(model: ModelSpec, source: DataSource | str, num_images: int = 32, seed: int = 0,
                    batch_size: int = 32) -> CalibrationSet:
    """``num_images`` images from ``source`` (a :class:`~smi.data.sources.DataSource`, or its CLI spelling).

    From a pool, the first ``num_images`` images (a pool's order is already seeded; images whose
    patches were all kept come without masks); from real images a seeded random draw; noise is
    drawn from the seed.
    """
    if num_images < 1:
        raise SmiError(f"must be positive, got {num_images}", param="num_images")
    if batch_size < 1:
        raise SmiError(f"must be positive, got {batch_size}", param="batch_size")
    source = parse_source(source) if isinstance(source, str) else source
    if source.grows:
        raise SmiError(f"{source.describe()} feeds training loops; calibrate from a pool (or a trained generator) "
                       "instead", param="source")
    images, masks = source.open(model).take(num_images, torch.Generator().manual_seed(seed))
    return CalibrationSet(source.describe(), images, masks, batch_size)
