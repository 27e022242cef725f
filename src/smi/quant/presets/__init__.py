"""Quantizer presets: one file each (config type + handler). Every module here is imported, so a new
preset is one new file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
