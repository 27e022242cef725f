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
from smi.quant.api import config_of, prepare
from smi.quant.config import QuantConfig, handler_for
from smi.quant.modules import WeightQuantMixin
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer
from smi.utils.io import atomic_save_tensors, atomic_write_json, claim_folder, read_format_json

__all__ = ["QUANT_FORMAT", "apply_quant_state", "check_quantized_folder", "quant_state", "quantized_meta",
           "save_quantized", "load_quantized", "write_quantized"]

QUANT_FORMAT = "smi-quantized/1"
WEIGHTS, META = "quantized.safetensors", "quantized.json"
RECON_STATE, RECON_LOG = "reconstruct.safetensors", "reconstruct.json"  # per-unit checkpoint and log of --reconstruct


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that defines the quantized model: its state dict (reparameterized weights, scales,
    zero points, observed ranges) plus the integer weight codes."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantMixin):
            state[f"{name}.weight_int"] = m.int_weight()
    return state


def quantized_meta(config: QuantConfig, teacher: Teacher, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``quantized.json`` records: format, config, teacher identity, and ``extra`` (the calibration)."""
    return {"format": QUANT_FORMAT, "config": config.to_dict(), "teacher": teacher.identity(), **(extra or {})}


def check_quantized_folder(folder: str | Path, meta: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse to replace a quantized model made with other settings (``overwrite`` allows it), or a non-folder."""
    folder = claim_folder(folder, (META, RECON_LOG), "quantized model", QUANT_FORMAT)
    if (folder / META).exists() and not overwrite:
        old = read_format_json(folder / META, QUANT_FORMAT, "quantized model")
        new = json.loads(json.dumps(meta))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise SmiError(f"{folder} holds a quantized model made with other settings (differs in: "
                           f"{', '.join(diff)}); use another folder or overwrite it", param="out")


def save_quantized(model: nn.Module, folder: str | Path, teacher: Teacher, extra: dict[str, Any] | None = None,
                   *, overwrite: bool = False) -> Path:
    """Write ``quantized.safetensors`` (state, scales, zero points, integer weight codes) and ``quantized.json``.

    A folder already holding a quantized model with other settings is refused unless ``overwrite``.
    """
    check_quantized_folder(folder, quantized_meta(config_of(model), teacher, extra), overwrite)
    return write_quantized(model, folder, teacher, extra)


def write_quantized(model: nn.Module, folder: str | Path, teacher: Teacher, extra: dict[str, Any] | None = None
                    ) -> Path:
    """Write the two files of a quantized model into ``folder``, which the caller has claimed (a quantized folder
    checked by :func:`check_quantized_folder`, or a QAT run folder)."""
    folder = Path(folder)
    atomic_save_tensors(folder / WEIGHTS, quant_state(model))
    atomic_write_json(folder / META, quantized_meta(config_of(model), teacher, extra))
    return folder


def _rebuild(teacher: Teacher, config: QuantConfig) -> nn.Module:
    """The converted model's structure: prepared, with reparameterized quantizers already per tensor."""
    model = prepare(teacher.model, config)
    handler_for(config).rebuild(model, config)
    return model


@torch.no_grad()
def load_quantized(folder: str | Path, teacher: Teacher) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``teacher.model`` in place with the state saved in ``folder``; returns (model, metadata)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmiError(f"quantized folder {folder} does not exist" if not folder.exists()
                       else f"{folder} is a file; give the folder `smi quantize --out` wrote")
    meta = read_format_json(folder / META, QUANT_FORMAT, "quantized model")
    if meta.get("teacher", {}).get("fingerprint") != teacher.fingerprint:
        raise SmiError(f"{folder} was quantized from {meta.get('teacher', {}).get('spec')}, not from "
                       f"{teacher.spec} (teacher fingerprints differ)")
    try:
        state = load_file(str(folder / WEIGHTS))
        config = QuantConfig.from_dict(meta["config"])
    except (SafetensorError, OSError) as e:
        raise SmiError(f"{folder / WEIGHTS}: unreadable ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise SmiError(f"{folder / META}: malformed config ({e})") from None
    model = _rebuild(teacher, config)
    apply_quant_state(model, state, folder / WEIGHTS)
    return model, json.loads(json.dumps(meta))


@torch.no_grad()
def apply_quant_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a converted model's state (:func:`quant_state`: parameters, scales, zero points, integer codes) into
    ``model``, a model of the same converted structure; the integer codes must agree with the saved scales."""
    modules = dict(model.named_modules())
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise SmiError(f"{source}: missing {missing[0]} (made by another smi version or model?)")
    for key in expected:
        mod_name, _, attr = key.rpartition(".")
        mod = modules[mod_name]
        if attr in mod._parameters:
            if mod._parameters[attr].shape != state[key].shape:
                raise SmiError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected "
                               f"{tuple(mod._parameters[attr].shape)}")
            mod._parameters[attr].copy_(state[key])
        else:
            setattr(mod, attr, state[key].to(getattr(mod, attr).device))
    for name, m in model.named_modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)):
            m.mode = "quant"
        elif isinstance(m, WeightQuantMixin):
            m.cache_weight()
            m.w_quant = True
            if not torch.equal(m.int_weight(), state.get(f"{name}.weight_int", torch.empty(0))):
                raise SmiError(f"{source}: integer weight codes of {name} do not match the saved scales")
