"""One LightningModule per task; ``TASKS[name]`` maps a registry task name to its module."""
from .base import ZooTask, build_net, freeze_backbone_of
from .classification import ClassificationTask
from .mil import MILTask
from .segmentation import SegmentationTask

TASKS: dict[str, type[ZooTask]] = {
    "classification": ClassificationTask,
    "segmentation": SegmentationTask,
    "mil": MILTask,
}

__all__ = ["TASKS", "ZooTask", "ClassificationTask", "SegmentationTask", "MILTask", "build_net", "freeze_backbone_of"]
