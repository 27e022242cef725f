"""Loss terms of the synthesis methods: one file per term, each registered in :data:`TERMS`.

Every module of this package is imported here, so a new term is one new file (plus its test)
and nothing else: the CLI's ``--term`` choices, ``--option`` knobs and the tests read the registry.
"""

import importlib
import pkgutil

from smi.inversion.terms._base import CAPTURE_KINDS, TERMS, Captured, Captures, Context, Step, Term

__all__ = ["CAPTURE_KINDS", "TERMS", "Captured", "Captures", "Context", "Step", "Term"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
