"""Importing this package registers every architecture (one file each)."""
from . import abmil, fpn, halonet  # noqa: F401
