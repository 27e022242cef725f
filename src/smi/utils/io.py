"""Crash-safe file writes and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_tensors", "claim_folder", "read_format_json",
           "sha256_file"]


def claim_folder(folder: str | os.PathLike, markers: tuple[str, ...], what: str, fmt: str) -> Path:
    """The ownership rule of every folder smi writes: it must be missing, empty, or one smi made.

    smi made it when one of ``markers`` (glob patterns of the JSON file its writer creates first)
    is there and says ``"format": fmt``. Anything else is refused before a byte is written, so a
    user's folder is never written into, let alone overwritten. Hidden files (``.DS_Store``, smi's
    own temporaries) do not count. Nothing is created here.
    """
    from smi.errors import SmiError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SmiError(f"{folder} is a file, not a folder", param="out")
    if not folder.is_dir():
        return folder
    found = [p for m in markers for p in sorted(folder.glob(m))]
    for path in found:
        try:
            ours = json.loads(path.read_text()).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise SmiError(f"{folder} holds a {path.name} that smi did not write (not a {what}'s); give a new or "
                           f"empty folder for the {what}", param="out")
    theirs = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if not found and theirs:
        raise SmiError(f"{folder} holds files smi did not write ({', '.join(theirs[:3])}"
                       f"{', ...' if len(theirs) > 3 else ''}) and no {markers[0]}; give a new or empty folder "
                       f"for the {what}", param="out")
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are meant to be shared like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_format_json(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """Read a JSON object whose ``format`` field must be ``fmt``; one clear SmiError otherwise."""
    from smi.errors import SmiError

    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmiError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise SmiError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise SmiError(f"{path}: not an smi {what} (expected format {fmt!r})")
    return obj
