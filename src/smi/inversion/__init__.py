"""Model inversion: configs, the dense/sparse loop, its registered pieces, and pool synthesis."""

from smi.inversion.background import FilledPoolSource
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.engine import Batch, StepInfo, invert
from smi.inversion.labels import CURRICULA, LABELS
from smi.inversion.methods import METHODS
from smi.inversion.synthesis import SynthesisResult, synthesize
from smi.inversion.terms import TERMS

__all__ = ["CURRICULA", "LABELS", "METHODS", "TERMS", "Batch", "FilledPoolSource", "InversionConfig", "SparsityConfig",
           "StepInfo", "SynthesisResult", "invert", "synthesize"]
