"""smi: compress pretrained Vision Transformers without their training data."""

from smi.errors import SmiError
from smi.models import Teacher, load_teacher

__version__ = "0.1.0"
__all__ = ["SmiError", "Teacher", "load_teacher", "__version__"]
