"""Teachers: loading by timm name, shipped name or checkpoint, and the token-sparse forward."""

from smi.models import teachers as _teachers  # noqa: F401  (registers shipped teachers with timm)
from smi.models.loading import Teacher, load_teacher, save_teacher

__all__ = ["Teacher", "load_teacher", "save_teacher"]
