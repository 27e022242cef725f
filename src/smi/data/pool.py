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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Dataset

from smi.errors import SmiError
from smi.utils.io import atomic_save_tensors, atomic_write_json, claim_folder, read_format_json, sha256_file

__all__ = [
    "POOL_FORMAT", "PoolWriter", "SyntheticPool", "check_pool_teacher", "clear_pool", "load_pool", "pool_info",
    "read_manifest", "verify_pool",
]

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
    manifest = read_format_json(path, POOL_FORMAT, "pool manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise SmiError(f"{path}: malformed pool manifest: {problem} (was it edited by hand? `smi invert` "
                       "with --overwrite remakes the pool)")
    return manifest


_SHARD_FIELDS: dict[str, type | tuple[type, ...]] = {"index": int, "file": str, "count": int, "sha256": str,
                                                      "seconds": (int, float)}


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure, or None: every field a reader relies on, typed and consistent."""
    if not isinstance(m.get("identity"), dict):
        return "'identity' is not an object"
    for where, key in (("identity", "config"), ("identity", "teacher"), (None, "versions")):
        value = (m["identity"] if where else m).get(key, {})
        if not isinstance(value, dict):
            return f"'{where + '.' if where else ''}{key}' is not an object"
    if not isinstance(m["identity"].get("teacher", {}).get("fingerprint"), str):
        return "'identity.teacher' names no teacher fingerprint"
    shards = m.get("shards")
    if not isinstance(shards, list):
        return "'shards' is not a list"
    seen: set[int] = set()
    for n, s in enumerate(shards):
        if not isinstance(s, dict):
            return f"shard record {n} is not an object"
        for key, kind in _SHARD_FIELDS.items():
            if not isinstance(s.get(key), kind) or isinstance(s.get(key), bool):
                return f"shard record {n} has no valid {key!r}"
        if s["index"] < 0 or s["index"] in seen or s["count"] < 0:
            return f"shard record {n} has a negative or repeated index or count"
        seen.add(s["index"])
        if not s["file"].startswith("shard-") or "/" in s["file"] or "\\" in s["file"]:
            return f"shard record {n} names {s['file']!r}, not a shard file of this folder"
        classes = s.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, int) and c >= 0 for c in classes):
            return f"shard record {n} has a malformed 'classes'"
        kept = s.get("kept")
        if kept is not None and (not isinstance(kept, int) or isinstance(kept, bool) or kept < 0):
            return f"shard record {n} has a malformed 'kept'"
    done = m.get("num_images_done", 0)
    if not isinstance(done, int) or done != sum(s["count"] for s in shards):
        return f"'num_images_done' ({done!r}) is not the sum of the shards' counts"
    if not isinstance(m.get("seconds_total", 0.0), (int, float)):
        return "'seconds_total' is not a number"
    return None


class PoolWriter:
    """Writes shards into a pool folder and keeps its manifest true after every shard.

    Opening a folder that already holds a pool resumes it if ``identity`` (the config, teacher,
    seed and size) is the same, and refuses otherwise unless ``overwrite`` is set. Shards found
    on disk count as done only if their sha256 matches a manifest's record.

    With ``part`` set (one writer per process of a distributed run), shards are recorded in
    ``manifest.PART.json`` instead, so that processes never write the same file; :meth:`merge`
    (on one process, after the others finished) folds the parts into ``manifest.json``.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], overwrite: bool = False,
                 part: str | None = None, normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.folder = claim_folder(folder, (MANIFEST, "manifest.*.json"), "pool", POOL_FORMAT)
        self._normalize = normalize or (lambda ident: ident)  # e.g. fill fields added since the pool was made
        self.identity = json.loads(json.dumps(identity))  # normalize tuples -> lists for comparison
        self.part = part
        self.shards: dict[int, dict[str, Any]] = {}
        self.seconds_total = 0.0
        if (self.folder / MANIFEST).exists():
            old = read_manifest(self.folder)
            old["identity"] = self._normalize(old.get("identity", {}))
            if old.get("identity") != self.identity:
                if not overwrite:
                    diff = sorted(k for k in set(old.get("identity", {})) | set(self.identity)
                                  if old.get("identity", {}).get(k) != self.identity.get(k))
                    raise SmiError(f"{self.folder} holds a pool made with another config (differs in: "
                                   f"{', '.join(diff)}); use another --out or pass --overwrite")
                self._clear()
            else:
                self._adopt(old.get("shards", []))
        elif overwrite and self.folder.exists():
            self._clear()
        for extra in self._part_manifests():  # shards of an interrupted distributed run
            self._adopt(extra.get("shards", []))
        self.seconds_total = sum(float(s.get("seconds", 0.0)) for s in self.shards.values())
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / (MANIFEST if part is None else f"manifest.{part}.json")).exists():
            self._write_manifest()  # first: the marker that makes this folder smi's
    def _adopt(self, shards: list[dict[str, Any]]) -> None:
        for s in shards:
            path = self.folder / s["file"]
            if int(s["index"]) not in self.shards and path.is_file() and sha256_file(path) == s["sha256"]:
                self.shards[int(s["index"])] = s

    def _part_manifests(self) -> list[dict[str, Any]]:
        parts = []
        for path in sorted(self.folder.glob("manifest.*.json")):
            try:
                obj = read_format_json(path, POOL_FORMAT, "pool manifest part")
            except SmiError:
                continue  # a part is only a cache of shard records; the shards are checked anyway
            if self._normalize(obj.get("identity", {})) == self.identity:
                parts.append(obj)
        return parts

    def _clear(self) -> None:
        clear_pool(self.folder)

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed process left; only safe while no other process writes here."""
        for p in self.folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def done(self, index: int) -> bool:
        return index in self.shards

    def write(self, index: int, tensors: dict[str, torch.Tensor], seconds: float, extra: dict[str, Any]) -> None:
        name = f"shard-{index:05d}.safetensors"
        digest = atomic_save_tensors(self.folder / name, tensors)
        self.shards[index] = {"index": index, "file": name, "count": int(tensors["targets"].numel()),
                              "sha256": digest, "seconds": round(seconds, 3), **extra}
        self.seconds_total += seconds
        self._write_manifest()

    def _write_manifest(self) -> None:
        shards = [self.shards[i] for i in sorted(self.shards)]
        name = MANIFEST if self.part is None else f"manifest.{self.part}.json"
        atomic_write_json(self.folder / name, {
            "format": POOL_FORMAT,
            "identity": self.identity,
            "num_images_done": sum(s["count"] for s in shards),
            "seconds_total": round(self.seconds_total, 3),
            "versions": _versions(),
            "shards": shards,
        })

    def merge(self) -> None:
        """Fold every part manifest into ``manifest.json`` and delete the parts (one process only)."""
        for extra in self._part_manifests():
            self._adopt(extra.get("shards", []))
        self.seconds_total = sum(float(s.get("seconds", 0.0)) for s in self.shards.values())
        self.part = None
        self._write_manifest()
        for p in self.folder.glob("manifest.*.json"):
            p.unlink()

    def finish(self) -> None:
        self._write_manifest()


def clear_pool(folder: str | Path) -> None:
    """Delete what smi recorded in a pool folder: the shards its manifests list, the manifests, and the
    config.json and grid.png beside a manifest. Anything else (a user's own files) stays; so does the
    folder unless it is left empty."""
    folder = Path(folder)
    manifests = [p for p in (folder / MANIFEST, *sorted(folder.glob("manifest.*.json"))) if p.is_file()]
    if not manifests:
        return  # nothing here was recorded by smi
    for path in manifests:
        try:
            shards = json.loads(path.read_text()).get("shards", [])
        except (OSError, ValueError, AttributeError):
            shards = []
        for s in shards:
            name = str(s.get("file", "")) if isinstance(s, dict) else ""
            if name.startswith("shard-") and "/" not in name:
                (folder / name).unlink(missing_ok=True)
    for path in manifests:
        path.unlink(missing_ok=True)
    for name in ("config.json", "grid.png"):
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


@dataclass
class SyntheticPool(Dataset):
    """A loaded pool: ``pool[i] -> (image, mask, label)``; image is a normalized model input."""

    images: torch.Tensor  # (N, C, H, W)
    masks: torch.Tensor  # (N, num_patches) bool
    labels: torch.Tensor  # (N,)
    losses: torch.Tensor  # (N,)
    manifest: dict[str, Any]
    maps: torch.Tensor | None = None  # (N, H, W) uint8 per-pixel target classes, in a segmenter's pool

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
    maps: list[torch.Tensor | None] = []  # a segmenter's pool: per-pixel targets
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
        missing = sorted(set(parts) - set(t))
        if missing or len(t["targets"]) != s["count"]:
            raise SmiError(f"{path}: shard lacks {missing} or holds another count than its manifest record")
        for k in parts:
            parts[k].append(t[k])
        maps.append(t.get("maps"))
    if not parts["targets"]:
        raise SmiError(f"pool {folder} is empty")
    return SyntheticPool(torch.cat(parts["images"]), torch.cat(parts["mask"]), torch.cat(parts["targets"]),
                         torch.cat(parts["loss"]), manifest,
                         torch.cat(maps) if all(m is not None for m in maps) else None)




def check_pool_teacher(pool: SyntheticPool, fingerprint: str, spec: str, source: str | Path) -> None:
    """Refuse a pool that another teacher (other weights) made."""
    ident = pool.teacher
    if ident.get("fingerprint") != fingerprint:
        raise SmiError(f"pool {source} was made from another teacher ({ident.get('spec')}, "
                       f"{str(ident.get('fingerprint', '?'))[:20]}...), not {spec}")


def verify_pool(folder: str | Path) -> list[tuple[str, str]]:
    """Check every shard the manifest lists: present, checksum, readable, the stated image count.

    Returns ``(file, problem)`` pairs; empty when the pool is sound.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[tuple[str, str]] = []
    for s in manifest.get("shards", []):
        path = folder / s["file"]
        if not path.is_file():
            problems.append((s["file"], "missing"))
            continue
        if sha256_file(path) != s["sha256"]:
            problems.append((s["file"], "checksum mismatch (corrupt or changed)"))
            continue
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            problems.append((s["file"], f"unreadable ({e})"))
            continue
        n = {k: int(v.shape[0]) for k, v in t.items()}
        if set(n) < {"images", "mask", "targets"} or len(set(n.values())) != 1 or n["targets"] != s["count"]:
            problems.append((s["file"], f"holds {n}, manifest says {s['count']} images"))
    return problems


def pool_info(folder: str | Path) -> dict[str, Any]:
    """What a pool holds, from its manifest: teacher, method, schedule, counts per class, time spent."""
    manifest = read_manifest(folder)
    ident = manifest.get("identity", {})
    shards = manifest.get("shards", [])
    absent = [s["file"] for s in shards if not (Path(folder) / s["file"]).is_file()]
    if absent:
        raise SmiError(f"{folder}: the manifest lists shards that are not there ({', '.join(absent[:3])}); "
                       "`smi pool verify` checks every shard")
    classes: list[int] = []
    for s in shards:
        for i, c in enumerate(s.get("classes", [])):
            classes.extend([0] * (i + 1 - len(classes)))
            classes[i] += int(c)
    cfg = ident.get("config", {})
    return {
        "folder": str(folder), "teacher": ident.get("teacher", {}), "method": ident.get("method"),
        "sparsity": ident.get("sparsity"), "iterations": cfg.get("iterations"), "batch_size": cfg.get("batch_size"),
        "seed": ident.get("seed"), "images_requested": ident.get("num_images"),
        "images_done": manifest.get("num_images_done", 0), "shards": len(shards), "per_class": classes,
        "kept_patches": sorted({s.get("kept") for s in shards if s.get("kept") is not None}),
        "seconds_total": manifest.get("seconds_total", 0.0), "versions": manifest.get("versions", {}),
    }
