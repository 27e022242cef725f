"""smi: compress pretrained Vision Transformers without their training data.

>>> import smi, torch
>>> teacher = smi.load_teacher("fmnist_vit_tiny")
>>> batch = smi.invert(teacher, smi.InversionConfig(iterations=400), torch.arange(10))
"""

from smi.data.pool import load_pool
from smi.errors import SmiError
from smi.inversion import InversionConfig, SparsityConfig, invert, synthesize
from smi.models import Teacher, load_teacher

__version__ = "0.1.0"
__all__ = ["InversionConfig", "SmiError", "SparsityConfig", "Teacher", "__version__", "invert", "load_pool",
           "load_teacher", "synthesize"]
