"""``quantize_``: prepare -> calibrate -> convert, in place, on a timm ViT."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from timm.layers import Attention

from smi.quant.config import QuantConfig
from smi.quant.modules import QuantAttention, QuantConv2d, QuantLinear, WeightQuantMixin
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer

__all__ = ["prepare", "calibrate", "convert", "quantize_", "default_filter", "cnn_filter", "reparameterize_"]

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


def cnn_filter(module: nn.Module, name: str) -> bool:
    """For models without transformer blocks (timm CNNs): every convolution and Linear layer.

    BatchNorm is not folded into the preceding convolution first (a simplification: the weights
    are quantized as trained, BN stays in float).
    """
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _swap(model: nn.Module, filter_fn: FilterFn, config: QuantConfig) -> None:
    for name, child in list(model.named_modules()):
        for cname, grandchild in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(grandchild, (QuantLinear, QuantConv2d, QuantAttention)) or not filter_fn(grandchild, full):
                continue
            if isinstance(grandchild, Attention):
                setattr(child, cname, QuantAttention(grandchild, config))
            elif isinstance(grandchild, nn.Linear):
                role = "ln_out" if full.endswith("mlp.fc1") else "input"  # fc1 reads norm2's output
                setattr(child, cname, QuantLinear(grandchild, config, role=role))
            elif isinstance(grandchild, nn.Conv2d):
                setattr(child, cname, QuantConv2d(grandchild, config))


def prepare(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the selected modules for quantized wrappers; observers start in ``observe`` mode.

    Without ``filter_fn``: :func:`default_filter` for ViTs, :func:`cnn_filter` for models without blocks.
    """
    if filter_fn is None:
        filter_fn = default_filter if hasattr(model, "blocks") else cnn_filter
    _swap(model, filter_fn, config)
    for m in model.modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)):
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


def _ln_linear_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, QuantLinear]]:
    """(LayerNorm, the quantized Linear that reads its output) in each timm block."""
    pairs = []
    for blk in getattr(model, "blocks", []):
        for norm, lin in ((getattr(blk, "norm1", None), getattr(getattr(blk, "attn", None), "qkv", None)),
                          (getattr(blk, "norm2", None), getattr(getattr(blk, "mlp", None), "fc1", None))):
            if (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
                    and isinstance(lin, QuantLinear) and lin.role.startswith("ln_out")):
                pairs.append((norm, lin))
    return pairs


@torch.no_grad()
def reparameterize_(model: nn.Module) -> nn.Module:
    """Fold per-channel post-LayerNorm quantization into per-tensor quantization (RepQ-ViT).

    With per-channel params (s, z) of the LayerNorm output x, per-tensor s~ = mean(s),
    z~ = round(mean(z)), r1 = s / s~ and r2 = z - z~: the LayerNorm outputs x~ = x / r1 + s~ r2
    (gamma' = gamma / r1, beta' = beta / r1 + s~ r2) whose per-tensor quantization has the same
    integers as x's per-channel one, and the Linear undoes the change
    (W' = W diag(r1), b' = b - W' s~ r2), so the float function is unchanged.
    """
    for norm, lin in _ln_linear_pairs(model):
        aq = lin.input_quant
        if not (isinstance(aq, ActQuantizer) and aq.granularity == "channel"):
            continue
        s, z = aq.calculate_qparams()  # (C,), (C,)
        s_t = s.mean()
        z_t = torch.round(z.mean()).clamp(0, aq.qmax)
        r1, r2 = s / s_t, z - z_t
        norm.weight.div_(r1)
        norm.bias.copy_(norm.bias / r1 + s_t * r2)
        lin.weight.mul_(r1)  # (O, C) * (C,)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device))
        lin.bias.sub_(lin.weight @ (s_t * r2))
        per_tensor = ActQuantizer(aq.bits, granularity="tensor", search=aq.search).to(s.device)
        per_tensor.min_val, per_tensor.max_val = aq.min_val.min(), aq.max_val.max()
        per_tensor.scale, per_tensor.zero_point = s_t, z_t
        per_tensor.mode = "quant"
        lin.input_quant = per_tensor
        lin.role = "ln_out_reparameterized"
    return model


def convert(model: nn.Module) -> nn.Module:
    """Freeze activation ranges and weight scales: the model now fake-quantizes.

    For the ``repq`` preset the post-LayerNorm quantizers are first folded into the LayerNorm and
    the next Linear (:func:`reparameterize_`), then the weights (already reparameterized) get
    their scales.
    """
    config = getattr(model, "smi_quant_config", None)
    if config is not None and config.quantizer == "repq":
        reparameterize_(model)
    for m in model.modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)) and m.mode == "observe":
            m.freeze()
        elif isinstance(m, WeightQuantMixin):
            m.convert_weight()
    return model




def quantize_(
    model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor | tuple],
    *, forward: Callable | None = None, filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Quantize ``model`` in place: prepare, calibrate on ``calibration``, convert.

    >>> quantize_(teacher.model, QuantConfig(w_bits=4, a_bits=8), [calib_images])
    """
    prepare(model, config, filter_fn)
    calibrate(model, calibration, forward)
    return convert(model)
