"""The SMI / PSAQ-ViT reference quantizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from smi.quant.config import PRESETS, QuantConfig, QuantHandler, register_handler
from smi.quant.quantizers import ActQuantizer

__all__ = ["BaselineConfig"]


@PRESETS.register("baseline")
@dataclass(frozen=True)
class BaselineConfig(QuantConfig):
    """Weights symmetric per output channel (min-max); activations asymmetric per tensor (running min-max over
    the calibration set); LayerNorm, softmax and GELU in float (the SMI/PSAQ-ViT reference).

    >>> BaselineConfig(w_bits=4, a_bits=8)
    BaselineConfig(w_bits=4, a_bits=8)
    """

    name = "baseline"


@register_handler(BaselineConfig)
class BaselineHandler(QuantHandler):
    weight_search = "minmax"

    def act_quantizer(self, config: QuantConfig, role: str) -> nn.Module:
        return ActQuantizer(config.a_bits)  # per tensor, running min-max everywhere
