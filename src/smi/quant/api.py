"""``quantize_(model, config, calibration)``: prepare -> calibrate -> convert, in place, on a timm model."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from timm.layers import Attention

from smi.errors import SmiError
from smi.models.sparse import mask_to_indices, sparse_forward
from smi.quant.config import QuantConfig, handler_for
from smi.quant.modules import QuantAttention, QuantConv2d, QuantLinear, QuantModule, WeightQuantMixin
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer

__all__ = ["prepare", "calibrate", "convert", "quantize_", "config_of", "calibration_forward", "calibration_logits",
           "batch_images", "split_batch", "default_filter", "cnn_filter", "edge_layers"]

FilterFn = Callable[[nn.Module, str], bool]
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]  # images, or (images, kept-patch masks)


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers in the blocks, the patch embedding's convolutions, the head, and attention."""
    if isinstance(module, Attention):
        return True
    if isinstance(module, nn.Linear):
        return name.startswith("blocks.") or name in ("head", "head_dist")
    if isinstance(module, nn.Conv2d):
        return name.startswith("patch_embed.")
    return False


def cnn_filter(module: nn.Module, name: str) -> bool:
    """For models without transformer blocks (timm CNNs): every convolution and Linear layer.

    The baseline and repq presets leave BatchNorm in float after the convolution (the weights are
    quantized as trained, activations only where a convolution or Linear reads them); the ``integer``
    preset folds it first and quantizes every tensor an integer runtime stores.
    """
    return isinstance(module, (nn.Conv2d, nn.Linear))


def edge_layers(model: nn.Module) -> set[str]:
    """The first layer and the classifier head (``QuantConfig.edge_bits``): a ViT's patch-embedding convolutions
    and ``head``/``head_dist``; otherwise timm's ``first_conv`` and ``classifier`` (by default, the first
    convolution or Linear and the last Linear)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if hasattr(model, "blocks"):
        return {n for n, _ in layers if n.startswith("patch_embed.") or n in ("head", "head_dist")}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = {n for n, _ in layers}
    first = cfg.get("first_conv") if cfg.get("first_conv") in names else (layers[0][0] if layers else None)
    linear = [n for n, m in layers if isinstance(m, nn.Linear)]
    head = cfg.get("classifier") if cfg.get("classifier") in names else (linear[-1] if linear else None)
    return {n for n in (first, head) if n is not None}


def _swap(model: nn.Module, filter_fn: FilterFn, config: QuantConfig) -> None:
    edges = edge_layers(model) if config.edge_bits is not None else set()
    for name, child in list(model.named_modules()):
        for cname, grandchild in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(grandchild, QuantModule) or not filter_fn(grandchild, full):
                continue
            if isinstance(grandchild, Attention):
                setattr(child, cname, QuantAttention(grandchild, config))
            elif isinstance(grandchild, nn.Linear):
                role = "ln_out" if full.endswith("mlp.fc1") else "input"  # fc1 reads norm2's output
                setattr(child, cname, QuantLinear(grandchild, config, role=role, edge=full in edges))
            elif isinstance(grandchild, nn.Conv2d):
                setattr(child, cname, QuantConv2d(grandchild, config, edge=full in edges))


def config_of(model: nn.Module) -> QuantConfig:
    """The config ``model`` was prepared with (kept in its quantized modules)."""
    configs = {m.quant_config for m in model.modules() if isinstance(m, QuantModule)}
    if len(configs) != 1:
        raise SmiError("the model is not quantized" if not configs else
                       f"the model mixes quantization configs: {sorted(map(repr, configs))}", param="model")
    return configs.pop()


def prepare(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the selected modules for quantized wrappers; observers start in ``observe`` mode.

    Without ``filter_fn``: :func:`default_filter` for ViTs, :func:`cnn_filter` for models without blocks. With
    ``config.rotate`` the float model is rotated first (:func:`~smi.quant.rotate.rotate_`).
    """
    handler = handler_for(config)  # an unregistered config type fails here, before any change
    if config.rotate:
        from smi.quant.rotate import rotate_

        rotate_(model)  # the float function is unchanged; a rotated model (or its copy) is not rotated again
    handler.before_prepare(model, config)
    if filter_fn is None:
        filter_fn = default_filter if hasattr(model, "blocks") else cnn_filter
    _swap(model, filter_fn, config)
    for m in model.modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)):
            m.mode = "observe"
    return model


def split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A calibration batch as ``(images, kept-patch masks or None)``."""
    return batch if isinstance(batch, tuple) else (batch, None)


def batch_images(batch: Batch) -> torch.Tensor:
    """The images of a calibration batch (without its masks, if any)."""
    return split_batch(batch)[0]


def calibration_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The logits of one calibration batch; sparse pool images (a batch with masks) feed only their kept patches."""
    images, masks = split_batch(batch)
    device = next(model.parameters()).device
    images = images.to(device)
    if masks is None:
        return model(images)
    return sparse_forward(model, images, mask_to_indices(masks).to(device)).logits


@torch.no_grad()
def calibration_forward(model: nn.Module, batch: Batch) -> int:
    """Forward one calibration batch (:func:`calibration_logits`); returns its number of images."""
    calibration_logits(model, batch)
    return batch_images(batch).shape[0]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Batch], forward: Callable[[nn.Module, Batch], int] | None = None
              ) -> int:
    """Run calibration batches through a prepared model; returns the number of images seen."""
    forward = forward or calibration_forward
    return sum(forward(model, batch) for batch in batches)


def convert(model: nn.Module) -> nn.Module:
    """Freeze activation ranges and weight scales: the model now fake-quantizes.

    The preset's handler runs first (``repq`` folds its post-LayerNorm scales into the LayerNorm
    and the next Linear), then the weights (already reparameterized) get their scales.
    """
    config = config_of(model)
    handler_for(config).before_convert(model, config)
    for m in model.modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)) and m.mode == "observe":
            m.freeze()
        elif isinstance(m, WeightQuantMixin):
            m.convert_weight()
    return model


def quantize_(
    model: nn.Module, config: QuantConfig, calibration: Iterable[Batch],
    *, forward: Callable[[nn.Module, Batch], int] | None = None, filter_fn: FilterFn | None = None,
    progress: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place: prepare, calibrate on ``calibration``, convert.

    ``calibration`` yields image batches, or ``(images, masks)`` pairs whose masks (N, patches)
    say which patches of a sparse pool image reach the model (:class:`~smi.quant.calibration.CalibrationSet`
    yields those).

    >>> quantize_(teacher.model, RepQConfig(w_bits=4, a_bits=4), calibration_set(teacher, PoolSource("pool/")))
    """
    from tqdm.auto import tqdm

    prepare(model, config, filter_fn)
    batches = tqdm(calibration, desc="calibrate", unit="batch", leave=False, disable=not progress)
    if calibrate(model, batches, forward) == 0:
        raise SmiError("no calibration images", param="calibration")
    return convert(model)
