"""Optimizer state <-> safetensors, so training checkpoints need no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from smi.utils.io import atomic_save_tensors

__all__ = ["optimizer_to_tensors", "optimizer_from_tensors", "save_checkpoint", "load_checkpoint"]

_PREFIX = "optim."


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten ``optimizer.state_dict()`` into tensors plus a JSON string of its param groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{_PREFIX}{idx}.{key}"] = t
    return tensors, json.dumps(sd["param_groups"])


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: str
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith(_PREFIX):
            continue
        idx, key = name[len(_PREFIX):].split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(param_groups)})


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], others: dict[str, torch.nn.Module] | None = None) -> None:
    """Model + optimizer + JSON-able ``meta`` in one safetensors file, written atomically; ``others``: more
    modules saved under their names (an exponential moving average of the model)."""
    tensors, groups = optimizer_to_tensors(optimizer)
    for prefix, module in {"model": model, **(others or {})}.items():
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    atomic_save_tensors(path, tensors, metadata={"meta": json.dumps(meta), "param_groups": groups})


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    others: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer`` and ``others``; returns ``meta``."""
    from smi.errors import SmiError

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["meta"])
        for prefix, module in {"model": model, **(others or {})}.items():
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        optimizer_from_tensors(optimizer, tensors, header["param_groups"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
        raise SmiError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]}); delete it to restart") from None
    return meta
