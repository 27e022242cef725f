"""``quantize_``: prepare -> calibrate -> convert, in place, on a timm ViT."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from timm.layers import Attention

from smi.quant.config import QuantConfig
from smi.quant.modules import QuantAttention, QuantConv2d, QuantLinear, WeightQuantMixin
from smi.quant.quantizers import ActQuantizer

__all__ = ["prepare", "calibrate", "convert", "quantize_", "default_filter"]

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers in the blocks, the patch embedding's convolutions, the head, and attention."""
    if isinstance(module, Attention):
        return True
    if isinstance(module, nn.Linear):
        return name.startswith("blocks.") or name in ("head", "head_dist")
    if isinstance(module, nn.Conv2d):
        return name.startswith("patch_embed.")
    return False


def _swap(model: nn.Module, filter_fn: FilterFn, config: QuantConfig) -> None:
    for name, child in list(model.named_modules()):
        for cname, grandchild in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(grandchild, (QuantLinear, QuantConv2d, QuantAttention)) or not filter_fn(grandchild, full):
                continue
            if isinstance(grandchild, Attention):
                setattr(child, cname, QuantAttention(grandchild, config))
            elif isinstance(grandchild, nn.Linear):
                setattr(child, cname, QuantLinear(grandchild, config))
            elif isinstance(grandchild, nn.Conv2d):
                setattr(child, cname, QuantConv2d(grandchild, config))


def prepare(model: nn.Module, config: QuantConfig, filter_fn: FilterFn = default_filter) -> nn.Module:
    """Swap the selected modules for quantized wrappers; observers start in ``observe`` mode."""
    _swap(model, filter_fn, config)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "observe"
    model.smi_quant_config = config  # type: ignore[assignment]
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor | tuple], forward: Callable | None = None) -> int:
    """Run calibration batches through a prepared model; returns the number of images seen."""
    seen = 0
    for batch in batches:
        if forward is None:
            model(batch)
            seen += batch.shape[0]
        else:
            seen += forward(model, batch)
    return seen


def convert(model: nn.Module) -> nn.Module:
    """Freeze activation ranges and weight scales: the model now fake-quantizes."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.freeze()
        elif isinstance(m, WeightQuantMixin):
            m.convert_weight()
    return model




def quantize_(
    model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor | tuple],
    *, forward: Callable | None = None, filter_fn: FilterFn = default_filter,
) -> nn.Module:
    """Quantize ``model`` in place: prepare, calibrate on ``calibration``, convert.

    >>> quantize_(teacher.model, QuantConfig(w_bits=4, a_bits=8), [calib_images])
    """
    prepare(model, config, filter_fn)
    calibrate(model, calibration, forward)
    return convert(model)
