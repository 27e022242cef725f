"""Quantized wrappers built from timm's own modules (no copy of the ViT).

Each wrapper keeps the wrapped module's parameters (shared, not copied) and adds quantizers:
``QuantLinear`` / ``QuantConv2d`` quantize their weight per output channel and their input per
tensor; ``QuantAttention`` computes exactly timm ``Attention``'s function through its explicit
(unfused) path and quantizes both operands of both matmuls (q and k; softmax output and v).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from smi.quant.config import QuantConfig, handler_for
from smi.quant.quantizers import (
    fake_quantize,
    mse_weight_scale,
    weight_qparams_per_channel,
)

__all__ = ["QuantLinear", "QuantConv2d", "QuantAttention", "WeightQuantMixin", "QuantModule", "act_quantizer"]

Role = str  # "input" | "ln_out" | "qk" | "v" | "softmax"


def act_quantizer(config: QuantConfig, role: Role) -> nn.Module:
    """The activation quantizer the config's preset uses at ``role``."""
    return handler_for(config).act_quantizer(config, role)


class WeightQuantMixin(nn.Module):
    """Per-output-channel symmetric fake quantization of ``self.weight``, cached at convert."""

    weight: nn.Parameter
    w_bits: int
    w_quant: bool

    def _init_weight_quant(self, bits: int, search: str = "minmax") -> None:
        self.w_bits = bits
        self.w_search = search
        self.w_quant = False
        scale, self.w_qmin, self.w_qmax = weight_qparams_per_channel(self.weight, bits)
        self.register_buffer("weight_scale", scale)

    def convert_weight(self) -> None:
        """Choose the weight scales (min-max or MSE search) and cache the fake-quantized weight."""
        find = mse_weight_scale if self.w_search == "mse" else weight_qparams_per_channel
        self.weight_scale, self.w_qmin, self.w_qmax = find(self.weight, self.w_bits)
        self.cache_weight()

    def cache_weight(self) -> None:
        """Cache the fake-quantized weight for the frozen ``weight_scale`` (weights are static after this)."""
        self.w_qmax = 2 ** (self.w_bits - 1) - 1
        self.w_qmin = -self.w_qmax
        with torch.no_grad():
            zero = torch.zeros_like(self.weight_scale)
            self.register_buffer("weight_fq", fake_quantize(self.weight, self.weight_scale, zero, self.w_qmin,
                                                            self.w_qmax), persistent=False)
        self.w_quant = True

    def qweight(self) -> torch.Tensor:
        rounding = getattr(self, "weight_rounding", None)
        if rounding is not None:  # AdaRound during reconstruction
            return rounding(self.weight, self.weight_scale, self.w_qmin, self.w_qmax)
        if isinstance(self.weight_scale, nn.Parameter):  # learnable weight step sizes (LSQ)
            from smi.quant.learn import lsq_fake_quantize, lsq_grad_factor

            factor = lsq_grad_factor(self.weight[0].numel(), self.w_qmax)
            return lsq_fake_quantize(self.weight, self.weight_scale, torch.zeros_like(self.weight_scale),
                                     self.w_qmin, self.w_qmax, factor)
        return self.weight_fq if self.w_quant else self.weight

    def start_rounding(self) -> None:
        """Learn this weight's rounding (AdaRound) for its frozen scale; :meth:`finish_rounding` fixes it."""
        from smi.quant.learn import AdaRound

        self.weight_rounding = AdaRound(self.weight, self.weight_scale)

    @torch.no_grad()
    def finish_rounding(self) -> None:
        """Set the weight to its quantized value at the learned rounding (on the grid), drop the rounding state."""
        rounding = getattr(self, "weight_rounding", None)
        if rounding is None:
            return
        self.weight.copy_(rounding.hard_weight(self.weight, self.weight_scale, self.w_qmin, self.w_qmax))
        del self.weight_rounding
        self.cache_weight()

    def learnable_weight_scale_(self, learnable: bool = True) -> None:
        """Train the per-channel weight step sizes (LSQ), or freeze them and re-cache the quantized weight."""
        from smi.quant.learn import set_learnable_

        set_learnable_(self, ("weight_scale",), learnable)
        if not learnable:
            self.weight_scale.clamp_(min=1e-8)
            self.cache_weight()

    def int_weight(self) -> torch.Tensor:
        """The integer weight codes (int8 storage for any width 2..8)."""
        return torch.clamp(torch.round(self.weight / self.weight_scale), self.w_qmin, self.w_qmax).to(torch.int8)


def _weight_search(config: QuantConfig) -> str:
    return handler_for(config).weight_search


class QuantModule(nn.Module):
    """A wrapper that knows the config it was prepared with (``quant_config``; not part of the state dict)."""

    quant_config: QuantConfig


class QuantLinear(WeightQuantMixin, QuantModule):
    def __init__(self, linear: nn.Linear, config: QuantConfig, role: Role = "input", edge: bool = False) -> None:
        super().__init__()
        self.quant_config = config  # the model's config; an edge layer (edge=True) takes config.at_edge()'s bits
        bits = config.at_edge() if edge else config
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.role = role
        self.input_quant = act_quantizer(bits, role)
        self._init_weight_quant(bits.w_bits, _weight_search(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.qweight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}"


class QuantConv2d(WeightQuantMixin, QuantModule):
    def __init__(self, conv: nn.Conv2d, config: QuantConfig, edge: bool = False) -> None:
        super().__init__()
        self.quant_config = config  # as QuantLinear's
        bits = config.at_edge() if edge else config
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports zero padding only, got {conv.padding_mode!r}")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight, self.bias = conv.weight, conv.bias
        self.input_quant = act_quantizer(bits, "input")
        self._init_weight_quant(bits.w_bits, _weight_search(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quant(x), self.qweight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class QuantAttention(QuantModule):
    """timm ``Attention`` with quantized qkv/proj and quantized matmul operands."""

    def __init__(self, attn: Attention, config: QuantConfig) -> None:
        super().__init__()
        self.quant_config = config
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.fused_attn = False  # read by AttentionCapture; this module always takes the explicit path
        self.qkv = QuantLinear(attn.qkv, config, role="ln_out")  # its input is norm1's output
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.gate = getattr(attn, "gate", None)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.proj = QuantLinear(attn.proj, config)
        self.q_quant, self.k_quant = act_quantizer(config, "qk"), act_quantizer(config, "qk")
        self.attn_quant, self.v_quant = act_quantizer(config, "softmax"), act_quantizer(config, "v")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.q_quant(q * self.scale) @ self.k_quant(k).transpose(-2, -1)  # (B, heads, N, N)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.attn_quant(attn) @ self.v_quant(v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
