"""Data-free post-training quantization of timm ViTs (fake-quantized simulation)."""

from smi.quant.api import calibrate, convert, default_filter, prepare, quantize_
from smi.quant.config import QUANTIZERS, QuantConfig

__all__ = ["QUANTIZERS", "QuantConfig", "calibrate", "convert", "default_filter", "prepare", "quantize_"]
