"""The synthetic data pool: a folder of safetensors shards plus a JSON manifest.

Layout::

    POOL/
      manifest.json          format, config, teacher identity, seed, shards (file, count, sha256,
                             seconds, classes), timings, package versions
      config.json            the resolved inversion config (also inside the manifest)
      shard-00000.safetensors
      ...

Each shard holds ``images`` (float32, normalized model inputs, stopped patches zeroed: stored
exactly, 4 bytes per value), ``mask`` (bool, patches optimized to the end), ``targets`` (int64),
``loss`` (float32, final cross-entropy per image) and ``index`` (int64, image index in the pool).
Every file is written to a temporary name and renamed, so a crash leaves either no shard or a
whole one; the manifest is rewritten (atomically) after each shard.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Dataset

from smi.errors import SmiError
from smi.utils.io import atomic_save_tensors, atomic_write_json, read_format_json, sha256_file

__all__ = ["POOL_FORMAT", "PoolWriter", "SyntheticPool", "load_pool", "read_manifest"]

POOL_FORMAT = "smi-pool/1"
MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    import numpy
    import safetensors
    import timm

    import smi

    return {"smi": smi.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.exists():
        raise SmiError(f"pool folder {folder} does not exist")
    if not folder.is_dir():
        raise SmiError(f"{folder} is a file, not a pool folder")
    if not path.is_file():
        raise SmiError(f"{folder} holds no pool ({MANIFEST} missing)")
    return read_format_json(path, POOL_FORMAT, "pool manifest")


class PoolWriter:
    """Writes shards into a pool folder and keeps its manifest true after every shard.

    Opening a folder that already holds a pool resumes it if ``identity`` (the config, teacher,
    seed and size) is the same, and refuses otherwise unless ``overwrite`` is set.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], overwrite: bool = False) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise SmiError(f"--out {self.folder} is a file, not a folder")
        self.identity = json.loads(json.dumps(identity))  # normalize tuples -> lists for comparison
        self.shards: dict[int, dict[str, Any]] = {}
        self.seconds_total = 0.0
        if (self.folder / MANIFEST).exists():
            old = read_manifest(self.folder)
            if old.get("identity") != self.identity:
                if not overwrite:
                    diff = sorted(k for k in set(old.get("identity", {})) | set(self.identity)
                                  if old.get("identity", {}).get(k) != self.identity.get(k))
                    raise SmiError(f"{self.folder} holds a pool made with another config (differs in: "
                                   f"{', '.join(diff)}); use another --out or pass --overwrite")
                self._clear()
            else:
                self.seconds_total = float(old.get("seconds_total", 0.0))
                for s in old.get("shards", []):
                    if (self.folder / s["file"]).is_file() and sha256_file(self.folder / s["file"]) == s["sha256"]:
                        self.shards[int(s["index"])] = s
        elif overwrite and self.folder.exists():
            self._clear()
        self.folder.mkdir(parents=True, exist_ok=True)

    def _clear(self) -> None:
        for p in self.folder.glob("shard-*.safetensors"):
            p.unlink()
        for name in (MANIFEST, "config.json", "grid.png"):
            (self.folder / name).unlink(missing_ok=True)

    def done(self, index: int) -> bool:
        return index in self.shards

    def write(self, index: int, tensors: dict[str, torch.Tensor], seconds: float, extra: dict[str, Any]) -> None:
        name = f"shard-{index:05d}.safetensors"
        digest = atomic_save_tensors(self.folder / name, tensors)
        self.shards[index] = {"index": index, "file": name, "count": int(tensors["targets"].numel()),
                              "sha256": digest, "seconds": round(seconds, 3), **extra}
        self._write_manifest(seconds)

    def _write_manifest(self, seconds: float = 0.0) -> None:
        self.seconds_total += seconds
        shards = [self.shards[i] for i in sorted(self.shards)]
        atomic_write_json(self.folder / MANIFEST, {
            "format": POOL_FORMAT,
            "identity": self.identity,
            "num_images_done": sum(s["count"] for s in shards),
            "seconds_total": round(self.seconds_total, 3),
            "versions": _versions(),
            "shards": shards,
        })

    def finish(self) -> None:
        self._write_manifest()


@dataclass
class SyntheticPool(Dataset):
    """A loaded pool: ``pool[i] -> (image, mask, label)``; image is a normalized model input."""

    images: torch.Tensor  # (N, C, H, W)
    masks: torch.Tensor  # (N, num_patches) bool
    labels: torch.Tensor  # (N,)
    losses: torch.Tensor  # (N,)
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[i], self.masks[i], self.labels[i]

    @property
    def teacher(self) -> dict[str, Any]:
        return self.manifest["identity"]["teacher"]


def load_pool(folder: str | Path, verify: bool = True) -> SyntheticPool:
    """Load every shard of a pool (checking each shard's sha256 against the manifest).

    >>> pool = load_pool("out/pool")
    >>> image, mask, label = pool[0]
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    parts: dict[str, list[torch.Tensor]] = {"images": [], "mask": [], "targets": [], "loss": []}
    for s in manifest.get("shards", []):
        path = folder / s["file"]
        if not path.is_file():
            raise SmiError(f"{path}: shard listed in the manifest is missing")
        if verify and sha256_file(path) != s["sha256"]:
            raise SmiError(f"{path}: checksum mismatch, the shard is corrupt")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise SmiError(f"{path}: unreadable shard ({e})") from None
        for k in parts:
            parts[k].append(t[k])
    if not parts["targets"]:
        raise SmiError(f"pool {folder} is empty")
    return SyntheticPool(torch.cat(parts["images"]), torch.cat(parts["mask"]), torch.cat(parts["targets"]),
                         torch.cat(parts["loss"]), manifest)


