"""smi: compress pretrained Vision Transformers without their training data.

>>> import smi, torch
>>> teacher = smi.load_teacher("fmnist_vit_tiny")
>>> batch = smi.invert(teacher, smi.InversionConfig(iterations=400), torch.arange(10))
>>> run = smi.distill(teacher, smi.build_student("fmnist_vit_mini", teacher), smi.PoolSource("pool/"), "runs/kd")
"""

from smi.data.pool import load_pool
from smi.data.sources import NoiseSource, PoolSource, RealSource
from smi.errors import SmiError
from smi.generators import GeneratorSource, OnlineGeneratorSource  # registers the generator data sources
from smi.inversion import InversionConfig, SparsityConfig, invert, synthesize
from smi.models import Teacher, load_teacher
from smi.transfer import DistillConfig, build_student, distill

__version__ = "0.1.0"
__all__ = ["DistillConfig", "GeneratorSource", "InversionConfig", "NoiseSource", "OnlineGeneratorSource", "PoolSource",
           "RealSource", "SmiError",
           "SparsityConfig", "Teacher", "__version__", "build_student", "distill", "invert", "load_pool",
           "load_teacher", "synthesize"]
