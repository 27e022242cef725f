"""Quantization config: bit widths and the quantizer preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from smi.errors import SmiError

__all__ = ["QuantConfig", "QUANTIZERS"]

QUANTIZERS: dict[str, str] = {
    "baseline": "weights symmetric per output channel (min-max); activations asymmetric per tensor (running "
    "min-max over the calibration set); LayerNorm, softmax and GELU in float (the SMI/PSAQ-ViT reference)",
    "repq": "after RepQ-ViT: per-channel scales for post-LayerNorm activations folded into the LayerNorm affine "
    "and the next Linear (inference stays per-tensor), log-sqrt(2) softmax quantizer, per-head scales for the "
    "attention operands, MSE scale search for weights and activations",
}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    >>> QuantConfig(w_bits=4, a_bits=8)
    QuantConfig(w_bits=4, a_bits=8, quantizer='baseline')
    """

    w_bits: int = 8
    a_bits: int = 8
    quantizer: Literal["baseline", "repq"] = "baseline"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise SmiError(f"{name.replace('_', '-')} must be an integer from 2 to 8, got {bits!r}")
        if self.quantizer not in QUANTIZERS:
            raise SmiError(f"unknown quantizer {self.quantizer!r}; choose from {', '.join(QUANTIZERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        return cls(**d)
