"""Datamodules, one per task, and the datasets they read. Knows nothing of models.

>>> dm = ClassificationDataModule(dataset="digits", batch_size=64)
>>> dm.configure_for_model(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
>>> dm.setup(); images, labels = next(iter(dm.train_dataloader()))
"""
from .bags import FeatureBagDataset, collate_bags
from .classification import ClassificationDataModule
from .common import UnknownDatasetError, ZooDataModule
from .mil import MILDataModule
from .reid import ReIDDataModule
from .segmentation import IGNORE_INDEX, SegmentationDataModule

DATAMODULES = {dm.task: dm for dm in (ClassificationDataModule, SegmentationDataModule, MILDataModule,
                                        ReIDDataModule)}

__all__ = [
    "ClassificationDataModule", "SegmentationDataModule", "MILDataModule", "ReIDDataModule", "ZooDataModule",
    "DATAMODULES", "FeatureBagDataset", "collate_bags", "IGNORE_INDEX", "UnknownDatasetError",
]
