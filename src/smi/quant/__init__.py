"""Data-free post-training quantization of timm ViTs (fake-quantized simulation).

>>> quantize_(teacher.model, RepQConfig(w_bits=4, a_bits=4), calibration_set(teacher, PoolSource("pool/")))
"""

from smi.quant import presets as _presets  # noqa: F401  (registers every preset and its handler)
from smi.quant.api import calibrate, config_of, convert, default_filter, prepare, quantize_
from smi.quant.calibration import CalibrationSet, calibration_set
from smi.quant.config import PRESETS, QuantConfig, QuantHandler, handler_for, register_handler
from smi.quant.presets.baseline import BaselineConfig
from smi.quant.presets.repq import RepQConfig

__all__ = ["PRESETS", "BaselineConfig", "CalibrationSet", "QuantConfig", "QuantHandler", "RepQConfig", "calibrate",
           "calibration_set", "config_of", "convert", "default_filter", "handler_for", "prepare", "quantize_",
           "register_handler"]
