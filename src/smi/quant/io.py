"""Save and load a quantized model: quantization state in safetensors, config and teacher in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from smi.errors import SmiError
from smi.models.loading import Teacher
from smi.quant.api import convert, prepare
from smi.quant.config import QuantConfig
from smi.quant.modules import WeightQuantMixin
from smi.quant.quantizers import ActQuantizer
from smi.utils.io import atomic_save_tensors, atomic_write_json, read_format_json

__all__ = ["QUANT_FORMAT", "save_quantized", "load_quantized"]

QUANT_FORMAT = "smi-quantized/1"
WEIGHTS, META = "quantized.safetensors", "quantized.json"


def _quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            for b in ("scale", "zero_point", "min_val", "max_val"):
                state[f"{name}.{b}"] = getattr(m, b)
        elif isinstance(m, WeightQuantMixin):
            state[f"{name}.weight_scale"] = m.weight_scale
            state[f"{name}.weight_int"] = m.int_weight()
    return state


def save_quantized(model: nn.Module, folder: str | Path, teacher: Teacher, extra: dict[str, Any] | None = None) -> Path:
    """Write ``quantized.safetensors`` (scales, zero points, integer weight codes) and ``quantized.json``."""
    config: QuantConfig = model.smi_quant_config
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SmiError(f"--out {folder} is a file, not a folder")
    atomic_save_tensors(folder / WEIGHTS, _quant_state(model))
    atomic_write_json(folder / META, {"format": QUANT_FORMAT, "config": config.to_dict(),
                                      "teacher": teacher.identity(), **(extra or {})})
    return folder


def load_quantized(folder: str | Path, teacher: Teacher) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``teacher.model`` in place with the state saved in ``folder``; returns (model, metadata)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmiError(f"quantized folder {folder} does not exist" if not folder.exists()
                       else f"{folder} is a file; give the folder `smi quantize --out` wrote")
    meta = read_format_json(folder / META, QUANT_FORMAT, "quantized model")
    if meta["teacher"].get("fingerprint") != teacher.fingerprint:
        raise SmiError(f"{folder} was quantized from {meta['teacher'].get('spec')}, not from {teacher.spec} "
                       "(teacher fingerprints differ)")
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise SmiError(f"{folder / WEIGHTS}: unreadable ({e})") from None
    model = prepare(teacher.model, QuantConfig.from_dict(meta["config"]))
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            for b in ("min_val", "max_val"):
                setattr(m, b, state[f"{name}.{b}"])
    convert(model)
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantMixin) and not torch.equal(m.int_weight(), state[f"{name}.weight_int"]):
            raise SmiError(f"{folder}: weight codes of {name} do not match the teacher's weights")
    return model, json.loads(json.dumps(meta))
