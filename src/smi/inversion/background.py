"""A sparse pool shown whole: its stopped patches filled with a random background (a data source).

Sparse inversion leaves every image's background patches at zero (the mean colour), and a
:class:`~smi.data.sources.PoolSource` shows a model the kept patches alone. For a teacher whose
images hold an object on a background (the scene teacher), the model being quantized or trained
then never sees a background token. :class:`FilledPoolSource` shows it the whole image instead,
the stopped patches filled by :func:`~smi.inversion.augment.fill_background`: a flat level
anywhere in the valid pixel range plus Gaussian noise of standard deviation up to ``background``
of the range. Every model sees every patch, so the teacher labels what the student sees. The
pool's sparsity is what makes this possible: it says which patches are the object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from smi.data.sources import SOURCES, ImageSet, ModelSpec, PoolSource
from smi.errors import SmiError
from smi.inversion.augment import BACKGROUND_NOISE, fill_background
from smi.inversion.engine import valid_range
from smi.models.sparse import mask_to_indices

__all__ = ["FilledPoolSource"]

Fill = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@SOURCES.register("filled-pool")
@dataclass(frozen=True)
class FilledPoolSource(PoolSource):
    """A pool folder whose sparse images are shown whole, each stopped patch filled with a random background.

    ``background``: the largest texture std, a fraction of the pixel range (0: a flat level). ``level``: the
    background's level as a fraction of the valid range for every image (0: black; None: a random level per
    image and channel). The fill is seeded,
    the same at every open; with ``refill``, training batches get a fresh fill every time they draw an image (from
    the batch's generator), while a fixed draw (calibration, reconstruction, ``train_images``' set) keeps the
    seeded one. A dense pool has nothing stopped and is shown as it is.
    """

    background: float = BACKGROUND_NOISE
    refill: bool = False
    level: float | None = None
    kind: ClassVar[str] = "filled-pool"

    def __post_init__(self) -> None:
        _check_fraction(self.background, "pool_background")
        if self.level is not None:
            _check_fraction(self.level, "pool_level")

    def open(self, model: ModelSpec, **context: Any) -> ImageSet:
        sparse = super().open(model, **context)
        images, masks = sparse.images, sparse.masks
        if masks is None or masks.all():
            return sparse
        h, w = images.shape[-2:]
        patch = math.isqrt(h * w // masks.shape[1])
        lo, hi = valid_range(model.mean, model.std, "cpu")

        def fill(x: torch.Tensor, m: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return fill_background(x, mask_to_indices(m), (h // patch, w // patch), patch, lo, hi, self.background,
                                   generator, self.level)

        filled = fill(images, masks, torch.Generator().manual_seed(0))
        identity = {**sparse.identity, "background": self.background, **({"refill": True} if self.refill else {}),
                    **({"level": self.level} if self.level is not None else {})}
        if self.refill:
            return _Refilled(filled, ImageSet(images, masks), fill, identity=identity, seconds=sparse.seconds)
        return ImageSet(filled, None, ordered=True, identity=identity, seconds=sparse.seconds)

    def describe(self) -> str:
        level = f", level {self.level:g}" if self.level is not None else ""
        return f"{self.path} (shown whole, background {self.background:g}{level}{', refilled' if self.refill else ''})"


def _check_fraction(value: object, param: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
        raise SmiError(f"must be a fraction of the pixel range in [0, 1], got {value!r}", param=param)


class _Refilled(ImageSet):
    """A sparse pool shown whole: a fixed draw takes the seeded fill, training batches a fresh one per draw."""

    def __init__(self, filled: torch.Tensor, sparse: ImageSet, fill: Fill, **kwargs: Any) -> None:
        super().__init__(filled, None, ordered=True, **kwargs)
        self.sparse, self.fill = sparse, fill

    def subset(self, n: int, generator: torch.Generator) -> ImageSet:
        fixed = super().subset(n, generator)  # ordered: the first n, as the sparse images below
        return _Refilled(fixed.images, ImageSet(self.sparse.images[:n], self.sparse.masks[:n]), self.fill,
                         identity=fixed.identity, seconds=fixed.seconds)

    def batches(self, steps: int, batch_size: int, generator: torch.Generator
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for x, masks in self.sparse.batches(steps, batch_size, generator):
            yield (x if masks is None else self.fill(x, masks, generator)), None
