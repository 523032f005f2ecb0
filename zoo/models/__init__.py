"""Importing this package registers every architecture (one file each)."""
from . import acmil, biformer, dependency_vit, fpn, halonet  # noqa: F401
from . import ulsam  # noqa: F401
from . import sparsifiner  # noqa: F401
