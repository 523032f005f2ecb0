"""Importing this package registers every architecture (one file each).

Every module in this folder is imported, so a new architecture file registers itself
without touching this file (and parallel work never collides on an import list).
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
