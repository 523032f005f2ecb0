"""Semantic segmentation: dataset-level mIoU, per-class IoU, pixel accuracy, mean foreground Dice.

All come from one confusion matrix accumulated over the whole split (dataset-level, not a mean of
per-image scores); label 255 is ignored. Foreground = every class but 0; a class that appears
neither in the labels nor the predictions is left out of the means.
"""
from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from .base import ZooTask


def scores_from_confusion(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    cm = cm.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    iou = tp / (tp + fp + fn)  # nan where the class never occurs
    dice = 2 * tp / (2 * tp + fp + fn)
    return {"iou": iou, "dice": dice, "acc": tp.sum() / cm.sum().clamp_min(1)}


class SegmentationTask(ZooTask):
    task = "segmentation"
    monitor = "val/miou"
    monitor_mode = "max"

    def make_metrics(self) -> MulticlassConfusionMatrix:
        return MulticlassConfusionMatrix(self.hparams.num_classes, ignore_index=255)

    def update_metrics(self, metrics, logits, y) -> None:
        metrics.update(logits.argmax(1), y)

    def compute_metrics(self, metrics) -> dict[str, torch.Tensor]:
        s = scores_from_confusion(metrics.compute())
        out = {
            "miou": s["iou"].nanmean(),
            "acc": s["acc"],
            "dice": s["dice"][1:].nanmean() if len(s["dice"]) > 1 else s["dice"].nanmean(),
        }
        out.update({f"iou_{n}": v for n, v in zip(self.class_names, s["iou"])})
        return {k: torch.nan_to_num(v.float(), nan=0.0) for k, v in out.items()}
