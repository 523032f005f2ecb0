"""One LightningModule per task; ``TASKS[name]`` maps a task name to its module (a registry task name, or
``"reid"``: Re-ID data trains a classification net with :class:`ReIDTask`)."""
from .base import ZooTask, build_net, freeze_backbone_of
from .classification import ClassificationTask
from .mil import MILTask
from .reid import ReIDTask
from .segmentation import SegmentationTask

TASKS: dict[str, type[ZooTask]] = {
    "classification": ClassificationTask,
    "segmentation": SegmentationTask,
    "mil": MILTask,
    "reid": ReIDTask,  # a classification net on Re-ID data (zoo.runner.run_task)
}

__all__ = ["TASKS", "ZooTask", "ClassificationTask", "SegmentationTask", "MILTask", "ReIDTask", "build_net", "freeze_backbone_of"]
