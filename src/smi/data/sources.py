"""Data sources as types: where calibration and training images come from.

A source is a frozen dataclass registered in :data:`SOURCES`: a synthetic pool folder
(:class:`PoolSource`), the real training images (:class:`RealSource`, the upper bound), Gaussian
noise (:class:`NoiseSource`, the lower bound), or images synthesized while a loop trains
(``OnlineSource``, registered by :mod:`smi.inversion.synthesis`). ``source.open(model)`` gives an
:class:`ImageSet` that calibration draws a fixed set from (:meth:`ImageSet.take`) and training
loops draw batches from (:meth:`ImageSet.batches`).

A folder called ``real`` is a pool like any other: ``PoolSource("real")``; the CLI reads the words
``real`` and ``noise`` as sources and anything else as a pool folder (``pool:PATH`` when a folder
has one of those names).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from smi.data.datasets import DATASETS, ModelSpec, data_help, load_split, model_dataset, model_input, open_dataset
from smi.data.fashion_mnist import normalize_uint8
from smi.data.pool import check_pool_teacher, load_pool
from smi.errors import SmiError
from smi.registry import Registry

__all__ = ["SOURCES", "DataSource", "ImageSet", "ModelSpec", "NoiseSource", "PoolSource", "RealSource",
           "parse_source", "source_help"]


class ImageSet:
    """Images in the model's normalized input space, with kept-patch masks for sparse pool images.

    ``images`` are either normalized floats or uint8 with ``norm=(mean, std)``; ``noise_shape``
    makes an endless set of fresh N(0, 1) images instead. ``ordered`` sets are taken from the
    front (a pool is already in a seeded order); others are drawn at random.
    """

    def __init__(self, images: torch.Tensor | None = None, masks: torch.Tensor | None = None, *,
                 norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 noise_shape: tuple[int, ...] | None = None, ordered: bool = False,
                 identity: dict[str, Any] | None = None, seconds: float = 0.0) -> None:
        self.images, self.masks, self.norm, self.noise_shape = images, masks, norm, noise_shape
        self.ordered = ordered
        self.identity = identity or {}  # what the images are, for resume checks and saved configs
        self._seconds = seconds

    @property
    def seconds(self) -> float:
        """What making the images cost (the synthesis time of a pool)."""
        return self._seconds

    @property
    def endless(self) -> bool:
        """True when there is no natural epoch (noise; online synthesis)."""
        return self.noise_shape is not None

    @property
    def fresh(self) -> bool:
        """True when every draw is new images (noise, a generator): nothing is held to count."""
        return self.noise_shape is not None

    @property
    def paired(self) -> bool:
        """True when batches hold pairs (i, i + B/2) of one class in two styles (a Causal-DFQ generator)."""
        return False

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def append(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images = images if self.images is None else torch.cat([self.images, images])
        self.masks = masks if self.masks is None else torch.cat([self.masks, masks])

    def before_epoch(self, epoch: int, progress: bool = True) -> None:
        """Hook for sources that grow while a loop trains (online synthesis)."""

    def finish(self) -> None:
        """Hook called once the loop is done (online synthesis writes its pool's grid)."""

    def _normalized(self, idx: torch.Tensor | slice) -> torch.Tensor:
        x = self.images[idx]
        return normalize_uint8(x, *self.norm) if self.norm is not None else x

    def take(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` images (and masks, None when every patch is kept) for calibration."""
        if self.noise_shape is not None:
            return torch.randn(n, *self.noise_shape, generator=generator), None
        if n > len(self):
            raise SmiError(f"must be at most the {len(self)} images of the {self.identity.get('kind', 'source')}, "
                           f"got {n}", param="num_images")
        idx = slice(0, n) if self.ordered else torch.randperm(len(self), generator=generator)[:n]
        masks = None if self.masks is None else self.masks[idx]
        return self._normalized(idx), None if masks is None or masks.all() else masks

    def subset(self, n: int, generator: torch.Generator) -> ImageSet:
        """A fixed set of ``n`` images drawn as :meth:`take` draws them (noise: ``n`` fixed noise images)."""
        images, masks = self.take(n, generator)
        return ImageSet(images, masks, identity={**self.identity, "subset": n}, seconds=self.seconds)

    def batches(self, steps: int, batch_size: int, generator: torch.Generator
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``steps`` training batches of (images, kept-patch masks or None): passes over fresh permutations."""
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if self.noise_shape is not None:
                yield torch.randn(batch_size, *self.noise_shape, generator=generator), None
                continue
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(self), generator=generator)])
            idx, order = order[:batch_size], order[batch_size:]
            m = None if self.masks is None else self.masks[idx]
            yield self._normalized(idx), (None if m is None or m.all() else m)


class DataSource:
    """Where images come from. Subclasses are frozen dataclasses registered in :data:`SOURCES`."""

    kind: ClassVar[str] = ""
    grows: ClassVar[bool] = False  # made while a loop trains (online synthesis, an online generator)
    folder: ClassVar[str] = ""  # a growing source's sub-folder of the run folder

    def open(self, model: ModelSpec, **context: Any) -> ImageSet:
        """The images, for ``model``. ``context`` carries what a growing source needs (run folder, seed, ...)."""
        raise NotImplementedError

    def check(self, model: ModelSpec, **context: Any) -> None:
        """Refuse, before a run folder is claimed, what a growing source cannot make for ``model`` (``context``: as
        :meth:`open`'s, e.g. the student). Nothing by default."""

    def describe(self) -> str:
        return self.kind

    def identity(self) -> dict[str, Any]:
        """A growing source's identity, known before any image exists (what a run records and resumes on)."""
        raise NotImplementedError

    @property
    def paired(self) -> bool:
        """A growing source's batches are style pairs (see :attr:`ImageSet.paired`), known before it opens."""
        return False


SOURCES: Registry[type[DataSource]] = Registry("data source")


@SOURCES.register("pool")
@dataclass(frozen=True)
class PoolSource(DataSource):
    """A synthetic pool folder written by `smi invert`; sparse images reach the model as kept patches only."""

    path: str
    kind: ClassVar[str] = "pool"

    def open(self, model: ModelSpec, **context: Any) -> ImageSet:
        pool = load_pool(Path(self.path))
        check_pool_teacher(pool, model.fingerprint, model.spec, self.path)
        identity = {"kind": "pool", "identity": pool.manifest["identity"],
                    "shards": [s["sha256"] for s in pool.manifest["shards"]]}
        return ImageSet(pool.images, pool.masks, ordered=True, identity=identity,
                        seconds=float(pool.manifest.get("seconds_total", 0.0)))

    def describe(self) -> str:
        return str(self.path)


@SOURCES.register("real")
@dataclass(frozen=True)
class RealSource(DataSource):
    """Real training images (an upper bound for data-free methods): a dataset's train split, default the model's own."""

    dataset: str | None = None  # NAME or NAME:PATH from smi.data.DATASETS; None: what the model records
    kind: ClassVar[str] = "real"

    def open(self, model: ModelSpec, **context: Any) -> ImageSet:
        spec = model_dataset(model, self.dataset)
        dataset = open_dataset(spec)
        if not dataset.in_memory:  # files: read only the images a draw or batch needs
            images = dataset.images("train")
            return _ImagesOnDemand(images, model, {"kind": "real", "dataset": spec, "images": len(images)})
        x, _ = load_split(dataset, "train", model)
        return ImageSet(x, norm=(model.mean, model.std), identity={"kind": "real", "dataset": spec, "images": len(x)})

    def describe(self) -> str:
        return self.dataset or "real"


class _ImagesOnDemand(ImageSet):
    """A file dataset's split, each image read and fitted to the model when a draw or a batch takes it."""

    def __init__(self, items: Any, model: ModelSpec, identity: dict[str, Any]) -> None:
        super().__init__(norm=(model.mean, model.std), identity=identity)
        self.items, self.model = items, model

    def __len__(self) -> int:
        return len(self.items)

    def _normalized(self, idx: torch.Tensor | slice) -> torch.Tensor:
        rows = range(len(self))[idx] if isinstance(idx, slice) else idx.tolist()
        return torch.cat([model_input(self.items[i][0][None], self.model) for i in rows])


@SOURCES.register("noise")
@dataclass(frozen=True)
class NoiseSource(DataSource):
    """Fresh Gaussian noise N(0, 1) in the model's input space (a lower bound)."""

    kind: ClassVar[str] = "noise"

    def open(self, model: ModelSpec, **context: Any) -> ImageSet:
        return ImageSet(noise_shape=tuple(model.input_size), identity={"kind": "noise"})


def source_help() -> str:
    return (f"POOL_DIR (pool:PATH), generator:PATH (smi train-generator's folder), real (the model's own dataset), "
            f"{data_help()}, or noise")


def parse_source(spec: str) -> DataSource:
    """How the CLI's ``--calib`` names a source: ``real`` (the model's dataset), ``noise``, a dataset
    (``fashion-mnist``, ``imagefolder:PATH``, ...; its train split), ``generator:PATH`` (a trained generator),
    ``pool:PATH`` or ``PATH`` (a pool folder).

    A bare word that names a source and also an existing folder is ambiguous and refused.
    """
    kind, sep, arg = spec.partition(":")
    if sep and kind == "pool":
        return PoolSource(arg)
    if sep and kind == "generator":
        from smi.generators.train import GeneratorSource  # registers itself; imports torch-heavy terms

        return GeneratorSource(arg)
    if sep and kind in DATASETS:
        return RealSource(spec)
    if spec in ("real", "noise") or spec in DATASETS:
        if Path(spec).is_dir():
            raise SmiError(f"{spec!r} is both a data source and a folder here; write pool:{spec} (or ./{spec}) "
                           f"for the folder, or move out of it for the {spec} source", param="source")
        return RealSource(spec) if spec in DATASETS else SOURCES.get(spec)()
    return PoolSource(spec)
