"""Image classification: top-1, top-5 (with at least 5 classes) and macro-F1."""
from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .base import ZooTask


class ClassificationTask(ZooTask):
    task = "classification"
    monitor = "val/acc"
    monitor_mode = "max"

    def make_metrics(self) -> MetricCollection:
        c = self.hparams.num_classes
        metrics = {"acc": MulticlassAccuracy(c, average="micro"), "f1": MulticlassF1Score(c, average="macro")}
        if c >= 5:
            metrics["acc5"] = MulticlassAccuracy(c, top_k=5, average="micro")
        return MetricCollection(metrics)
