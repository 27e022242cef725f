"""Fashion-MNIST, read from the Debian package, a local folder or a torchvision download.

The files are the original gzipped IDX files; reading them takes a few lines of numpy, so the
tests and the demo never touch the network when the Debian package
``dataset-fashion-mnist`` is installed (``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from smi.errors import SmiError

__all__ = ["FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "find_fashion_mnist", "load_fashion_mnist", "normalize_uint8"]

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _cache_dir() -> Path:
    return Path(os.environ.get("SMI_CACHE", Path.home() / ".cache" / "smi"))


def _candidates() -> Iterable[Path]:
    if "SMI_FASHION_MNIST" in os.environ:
        yield Path(os.environ["SMI_FASHION_MNIST"])
    yield DEBIAN_DIR
    yield _cache_dir() / "FashionMNIST" / "raw"  # where torchvision puts its download


def find_fashion_mnist(download: bool = True) -> Path:
    """Return the folder holding the four gzipped IDX files, downloading them as a last resort."""
    for folder in _candidates():
        if all((folder / f).is_file() for pair in _FILES.values() for f in pair):
            return folder
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(_cache_dir()), train=True, download=True)
            FashionMNIST(str(_cache_dir()), train=False, download=True)
        except Exception as e:  # network errors come in many types
            raise SmiError(_how_to_get(f"download failed: {e}")) from None
        return _cache_dir() / "FashionMNIST" / "raw"
    raise SmiError(_how_to_get("not found"))


def _how_to_get(why: str) -> str:
    return (
        f"Fashion-MNIST {why}; install it with `apt-get install -y dataset-fashion-mnist` "
        f"(files in {DEBIAN_DIR}) or point SMI_FASHION_MNIST at a folder holding the four IDX .gz files"
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise SmiError(f"{path}: not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def normalize_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> normalized float model inputs."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def load_fashion_mnist(
    split: Literal["train", "test"], download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    >>> x, y = load_fashion_mnist("test")
    >>> x.shape, y.shape
    (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
    """
    if split not in _FILES:
        raise SmiError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = find_fashion_mnist(download)
    images, labels = (_read_idx(folder / f) for f in _FILES[split])
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
