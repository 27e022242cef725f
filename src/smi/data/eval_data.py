"""Labelled real data for evaluation, as registered datasets: ``--data NAME[:PATH]``.

Each dataset is one decorated function ``(path, model) -> Dataset`` in :data:`EVAL_DATASETS`,
returning the test split transformed the way the model reads images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset, TensorDataset

from smi.data.fashion_mnist import load_fashion_mnist, normalize_uint8
from smi.data.sources import ModelSpec
from smi.errors import SmiError
from smi.registry import Registry

__all__ = ["DATA_HELP", "EVAL_DATASETS", "data_help", "eval_dataset"]

EVAL_DATASETS: Registry[Any] = Registry("dataset")


def _timm_transform(model: ModelSpec):
    import timm.data

    cfg = timm.data.resolve_model_data_config(model.model)  # type: ignore[attr-defined]
    cfg.update(input_size=model.input_size, mean=model.mean, std=model.std)
    return timm.data.create_transform(**cfg, is_training=False)


def _folder(path: str, spec: str) -> Path:
    if not path:
        raise SmiError(f"{spec} needs a path: {spec}:PATH", param="data")
    root = Path(path)
    if not root.is_dir():
        raise SmiError(f"{spec}:{path}: folder {root} does not exist" if not root.exists()
                       else f"{spec}:{path}: {root} is not a folder", param="data")
    return root


@EVAL_DATASETS.register("fashion-mnist")
def fashion_mnist(path: str, model: ModelSpec) -> Dataset:
    """The 10,000 Fashion-MNIST test images (1x28x28)."""
    if tuple(model.input_size) != (1, 28, 28):
        raise SmiError(f"fashion-mnist is 1x28x28 but {model.spec} expects {tuple(model.input_size)}", param="data")
    x, y = load_fashion_mnist("test")
    return TensorDataset(normalize_uint8(x, model.mean, model.std), y)


@EVAL_DATASETS.register("imagefolder")
def image_folder(path: str, model: ModelSpec) -> Dataset:
    """imagefolder:PATH, one sub-folder per class (torchvision ImageFolder), timm's eval transform."""
    import torchvision.datasets as tvd

    return tvd.ImageFolder(str(_folder(path, "imagefolder")), transform=_timm_transform(model))


def _cifar(kind: str, path: str, model: ModelSpec) -> Dataset:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    return cls(str(_folder(path, kind)), train=False, download=False, transform=_timm_transform(model))


@EVAL_DATASETS.register("cifar10")
def cifar10(path: str, model: ModelSpec) -> Dataset:
    """cifar10:PATH, the test batch of torchvision's CIFAR-10 folder."""
    return _cifar("cifar10", path, model)


@EVAL_DATASETS.register("cifar100")
def cifar100(path: str, model: ModelSpec) -> Dataset:
    """cifar100:PATH, the test split of torchvision's CIFAR-100 folder."""
    return _cifar("cifar100", path, model)


def data_help() -> str:
    return " | ".join(n if n == "fashion-mnist" else f"{n}:PATH" for n in EVAL_DATASETS.names())


DATA_HELP = data_help()


def eval_dataset(spec: str, model: ModelSpec, limit: int | None = None) -> Dataset:
    """The evaluation split named by ``spec`` (``NAME`` or ``NAME:PATH``), transformed for ``model``."""
    if limit is not None and limit < 1:
        raise SmiError(f"must be positive, got {limit}", param="limit")
    kind, _, path = spec.partition(":")
    if kind not in EVAL_DATASETS:
        raise SmiError(f"{spec!r} is not a known dataset; use {data_help()}", param="data")
    try:
        ds = EVAL_DATASETS.get(kind)(path, model)
    except (FileNotFoundError, RuntimeError) as e:
        raise SmiError(f"{spec}: {e}", param="data") from None
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    return ds
