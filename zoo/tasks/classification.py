"""Image classification: top-1, top-5 (with at least 5 classes) and macro-F1."""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from ..contract import capabilities
from .base import ZooTask


class ClassificationTask(ZooTask):
    """``optim.mixup_alpha`` / ``optim.cutmix_alpha`` > 0 turn on timm's Mixup (DeiT recipe: 0.8 / 1.0):
    targets become soft (label smoothing folded in) and the loss is soft-target cross-entropy. An odd
    batch loses its last sample (Mixup pairs samples). Models with their own objective receive the soft
    targets only when they declare the ``soft_targets`` capability."""

    task = "classification"
    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.optim
        self.mixup = None
        if float(o["mixup_alpha"]) > 0 or float(o["cutmix_alpha"]) > 0:
            caps = capabilities(self.net)
            if caps.own_objective and not caps.soft_targets:
                raise ValueError(
                    f"{type(self.net).__name__} trains with its own forward_train(x, y) on hard labels; "
                    "set optim.mixup_alpha=0 optim.cutmix_alpha=0 for it"
                )
            self.mixup = Mixup(mixup_alpha=float(o["mixup_alpha"]), cutmix_alpha=float(o["cutmix_alpha"]),
                               prob=float(o["mixup_prob"]), switch_prob=float(o["mixup_switch_prob"]),
                               label_smoothing=float(o["label_smoothing"]), num_classes=self.hparams.num_classes)
            self.soft_ce = SoftTargetCrossEntropy()
        # test split only: confusion_matrix.png (zoo.plots) from the same pass as the test metrics
        self.metrics["test"].add_metrics({"confusion_matrix": MulticlassConfusionMatrix(self.hparams.num_classes)})

    figure_keys = ("confusion_matrix",)

    def test_figures(self) -> dict[str, tuple]:
        cm = getattr(self, "test_figure_values", {}).get("confusion_matrix")
        return {} if cm is None else {"confusion_matrix": (cm.cpu(), self.class_names)}

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None or x.shape[0] < 2:
            return x, y
        if x.shape[0] % 2:
            x, y = x[:-1], y[:-1]
        return self.mixup(x, y)

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():  # soft targets from mixup/cutmix
            return self.soft_ce(logits, y)
        return super().criterion(logits, y)

    def make_metrics(self) -> MetricCollection:
        c = self.hparams.num_classes
        metrics = {"acc": MulticlassAccuracy(c, average="micro"), "f1": MulticlassF1Score(c, average="macro")}
        if c >= 5:
            metrics["acc5"] = MulticlassAccuracy(c, top_k=5, average="micro")
        # compute groups off: torchmetrics merges metrics whose states match after the first batch, so a
        # perfect first batch made macro-F1 share top-5 accuracy's states (and report its value)
        return MetricCollection(metrics, compute_groups=False)
