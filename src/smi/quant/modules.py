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

from smi.quant.config import QuantConfig
from smi.quant.quantizers import ActQuantizer, fake_quantize, weight_qparams_per_channel

__all__ = ["QuantLinear", "QuantConv2d", "QuantAttention", "WeightQuantMixin"]


class WeightQuantMixin(nn.Module):
    """Per-output-channel symmetric fake quantization of ``self.weight``, cached at convert."""

    weight: nn.Parameter
    w_bits: int
    w_quant: bool

    def _init_weight_quant(self, bits: int) -> None:
        self.w_bits = bits
        self.w_quant = False
        scale, self.w_qmin, self.w_qmax = weight_qparams_per_channel(self.weight, bits)
        self.register_buffer("weight_scale", scale)

    def convert_weight(self) -> None:
        """Freeze the weight scales and cache the fake-quantized weight (weights are static after this)."""
        self.weight_scale, self.w_qmin, self.w_qmax = weight_qparams_per_channel(self.weight, self.w_bits)
        with torch.no_grad():
            zero = torch.zeros_like(self.weight_scale)
            self.register_buffer("weight_fq", fake_quantize(self.weight, self.weight_scale, zero, self.w_qmin,
                                                            self.w_qmax), persistent=False)
        self.w_quant = True

    def qweight(self) -> torch.Tensor:
        return self.weight_fq if self.w_quant else self.weight

    def int_weight(self) -> torch.Tensor:
        """The integer weight codes (int8 storage for any width 2..8)."""
        return torch.clamp(torch.round(self.weight / self.weight_scale), self.w_qmin, self.w_qmax).to(torch.int8)


class QuantLinear(WeightQuantMixin):
    def __init__(self, linear: nn.Linear, config: QuantConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.input_quant = ActQuantizer(config.a_bits)
        self._init_weight_quant(config.w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.qweight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}"


class QuantConv2d(WeightQuantMixin):
    def __init__(self, conv: nn.Conv2d, config: QuantConfig) -> None:
        super().__init__()
        self.conv = conv  # keeps stride/padding/groups; its weight is the one quantized
        self.weight, self.bias = conv.weight, conv.bias
        self.input_quant = ActQuantizer(config.a_bits)
        self._init_weight_quant(config.w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(self.input_quant(x), self.qweight(), self.bias)


class QuantAttention(nn.Module):
    """timm ``Attention`` with quantized qkv/proj and quantized matmul operands."""

    def __init__(self, attn: Attention, config: QuantConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.fused_attn = False  # read by AttentionCapture; this module always takes the explicit path
        self.qkv = QuantLinear(attn.qkv, config)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.gate = getattr(attn, "gate", None)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.proj = QuantLinear(attn.proj, config)
        self.q_quant, self.k_quant = ActQuantizer(config.a_bits), ActQuantizer(config.a_bits)
        self.attn_quant, self.v_quant = ActQuantizer(config.a_bits), ActQuantizer(config.a_bits)

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
