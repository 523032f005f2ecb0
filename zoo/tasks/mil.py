"""Multiple-instance learning: one metric module for every MIL model.

Accuracy, balanced accuracy (macro recall), macro-F1 (really macro: ACMIL's script reports
torchmetrics' default micro F1, which equals accuracy) and macro one-vs-rest AUROC on softmax scores.
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score, MulticlassRecall,
                                         MulticlassROC)

from .base import ZooTask


class MILTask(ZooTask):
    task = "mil"
    monitor = "val/auroc"
    monitor_mode = "max"
    # for a MIL model without its own train_defaults: the WSI-MIL recipe of CLAM and TransMIL (Adam-type,
    # lr 2e-4, weight decay 1e-5, constant lr), no label smoothing; never the image-classification optim/adamw.yaml
    train_defaults = dict(name="adam", lr=2e-4, weight_decay=1e-5, betas=[0.9, 0.999], scheduler="none",
                          warmup_epochs=0.0, min_lr_ratio=0.0, label_smoothing=0.0)

    def make_metrics(self) -> MetricCollection:
        c = self.hparams.num_classes
        return MetricCollection({
            "acc": MulticlassAccuracy(c, average="micro"),
            "balanced_acc": MulticlassRecall(c, average="macro"),
            "f1": MulticlassF1Score(c, average="macro"),
            "auroc": MulticlassAUROC(c, average="macro"),
        }, compute_groups=False)  # no state sharing by coincidence of the first batch (see classification.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # test split only: roc.png (zoo.plots); exact thresholds: MIL test sets are bags, not pixels
        self.metrics["test"].add_metrics({"roc": MulticlassROC(self.hparams.num_classes)})

    figure_keys = ("roc",)

    def test_figures(self) -> dict[str, tuple]:
        roc = getattr(self, "test_figure_values", {}).get("roc")
        if roc is None:
            return {}
        fpr, tpr, _ = roc
        classes = range(1, len(fpr)) if len(fpr) == 2 else range(len(fpr))  # binary: the positive class's curve
        return {"roc": ({self.class_names[c]: (fpr[c].cpu(), tpr[c].cpu()) for c in classes},)}

    def unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        bags, mask, y = batch
        return bags, y, {"mask": mask}

    def update_metrics(self, metrics, logits, y) -> None:
        metrics.update(logits.float().softmax(-1), y)
