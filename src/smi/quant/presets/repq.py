"""After RepQ-ViT (ICCV 2023): reparameterized post-LayerNorm scales, log-sqrt(2) softmax quantizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from smi.quant.config import PRESETS, QuantConfig, QuantHandler, register_handler
from smi.quant.modules import QuantLinear
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer

__all__ = ["RepQConfig", "ln_linear_pairs", "reparameterize_"]


@PRESETS.register("repq")
@dataclass(frozen=True)
class RepQConfig(QuantConfig):
    """After RepQ-ViT: per-channel scales for post-LayerNorm activations folded into the LayerNorm affine and the
    next Linear (inference stays per-tensor), log-sqrt(2) softmax quantizer, per-head scales for the attention
    operands, MSE scale search for weights and activations.

    >>> RepQConfig(w_bits=4, a_bits=4).to_dict()
    {'preset': 'repq', 'version': 1, 'w_bits': 4, 'a_bits': 4}
    """

    name = "repq"


def ln_linear_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, QuantLinear]]:
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
    for norm, lin in ln_linear_pairs(model):
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


@register_handler(RepQConfig)
class RepQHandler(QuantHandler):
    weight_search = "mse"

    def act_quantizer(self, config: QuantConfig, role: str) -> nn.Module:
        if role == "softmax":
            return LogSqrt2Quantizer(config.a_bits)
        granularity = {"ln_out": "channel", "qk": "head", "v": "head"}.get(role, "tensor")
        return ActQuantizer(config.a_bits, granularity=granularity, search="mse")

    def before_convert(self, model: nn.Module, config: QuantConfig) -> None:
        reparameterize_(model)  # the weights are reparameterized before their scales are chosen

    def rebuild(self, model: nn.Module, config: QuantConfig) -> None:
        for _, lin in ln_linear_pairs(model):
            lin.input_quant = ActQuantizer(config.a_bits, granularity="tensor", search="mse")
            lin.role = "ln_out_reparameterized"
