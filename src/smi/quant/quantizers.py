"""Uniform fake quantization: weight quantizers and activation observers/quantizers.

An :class:`ActQuantizer` is a module with a lifecycle: in ``observe`` mode its forward records
the running min and max of what passes through and returns the input unchanged; after
:meth:`ActQuantizer.freeze` (convert) it fake-quantizes with the frozen scale and zero point.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

__all__ = ["fake_quantize", "weight_qparams_per_channel", "quantize_weight", "ActQuantizer"]


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """round(x / scale) + zero_point, clamped to [qmin, qmax], mapped back to floats."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def weight_qparams_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, int, int]:
    """Symmetric min-max scale per output channel (dim 0): returns (scale (O, 1, ...), qmin, qmax)."""
    qmax = 2 ** (bits - 1) - 1  # symmetric: [-qmax, qmax], zero exactly representable
    amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)  # (O,)
    scale = (amax / qmax).view(-1, *([1] * (w.ndim - 1)))
    return scale, -qmax, qmax


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    scale, qmin, qmax = weight_qparams_per_channel(w, bits)
    return fake_quantize(w, scale, torch.zeros_like(scale), qmin, qmax)


class ActQuantizer(nn.Module):
    """Asymmetric per-tensor activation quantizer calibrated by running min/max."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.mode: Literal["off", "observe", "quant"] = "off"
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.min_val = torch.minimum(self.min_val, x.detach().min())
            self.max_val = torch.maximum(self.max_val, x.detach().max())
            return x
        if self.mode == "quant":
            return fake_quantize(x, self.scale, self.zero_point, 0, self.qmax)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.isfinite(self.min_val) or not torch.isfinite(self.max_val):
            raise RuntimeError("activation quantizer saw no data; run calibration images through the model first")
        lo = torch.clamp(self.min_val, max=0.0)  # the range always contains 0 so that zero padding stays exact
        hi = torch.clamp(self.max_val, min=0.0)
        scale = ((hi - lo) / self.qmax).clamp_min(1e-8)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, self.qmax)
        return scale, zero_point

    def freeze(self) -> None:
        self.scale, self.zero_point = self.calculate_qparams()
        self.mode = "quant"

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"
