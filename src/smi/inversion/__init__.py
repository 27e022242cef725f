"""Model inversion: configs, the dense/sparse loop, and pool synthesis."""

from smi.inversion.config import METHODS, InversionConfig, SparsityConfig
from smi.inversion.engine import Batch, StepInfo, invert
from smi.inversion.synthesis import SynthesisResult, synthesize

__all__ = ["METHODS", "Batch", "InversionConfig", "SparsityConfig", "StepInfo", "SynthesisResult", "invert",
           "synthesize"]
