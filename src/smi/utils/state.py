"""Optimizer state <-> safetensors, so training checkpoints need no pickle."""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["optimizer_to_tensors", "optimizer_from_tensors"]

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
