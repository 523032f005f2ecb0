"""Attention Zoo: attention-based vision architectures behind one registry.

>>> import zoo
>>> net = zoo.create_model("halonet_tiny", num_classes=10)
>>> zoo.list_models("halo*")
"""
from .errors import (
    DatasetNotFoundError,
    DataFormatError,
    DuplicateModelError,
    InputSizeError,
    ModelArgumentError,
    TaskMismatchError,
    UnknownModelError,
    WeightsError,
    ZooError,
)
from .contract import Capabilities, ZooModel, capabilities
from .registry import ModelSpec, create_model, get_spec, list_models, model_info, register_model
from .spec import Metric, Reference, RunInput, Weights
from .hub import save_pretrained

__all__ = [
    "create_model", "list_models", "model_info", "register_model", "get_spec", "ModelSpec",
    "Weights", "Reference", "Metric", "RunInput", "ZooModel", "Capabilities", "capabilities",
    "ZooError", "UnknownModelError", "DuplicateModelError", "InputSizeError", "TaskMismatchError",
    "DatasetNotFoundError", "DataFormatError", "WeightsError", "ModelArgumentError", "save_pretrained",
]
__version__ = "0.1.0"

from .registry import _ensure_models_imported  # noqa: E402

_ensure_models_imported()  # timm.create_model("<zoo name>" / "local-dir:DIR") works after a bare `import zoo`
