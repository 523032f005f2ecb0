"""Semantic segmentation: dataset-level mIoU, per-class IoU and Dice, pixel accuracy, mean foreground Dice,
volumetric similarity; on the test split also HD95 and mean symmetric surface distance.

IoU, Dice and VS come from one confusion matrix accumulated over the whole split (dataset-level, not a
mean of per-image scores); label 255 is ignored. Foreground = every class but 0; a class that appears
neither in the labels nor the predictions is left out of the means.

Surface distances (:class:`SurfaceDistances`) are per image and per foreground class, as MONAI's
``HausdorffDistanceMetric(percentile=95)`` and ``SurfaceDistanceMetric(symmetric=True)`` define them:
borders are ``mask XOR binary_erosion(mask)`` (4-connected), distances come from scipy's Euclidean
distance transform with the pixel ``spacing`` (``data_info["spacing"]``, (row, column) or one number;
default 1 = pixels); HD95 = max of the two directed 95th percentiles, MSD = mean of both directions'
distances pooled. A class scores only on images where both the label and the prediction contain it;
its value is the mean over those images (NaN if there are none). Ignored pixels belong to neither mask.
A three-number spacing ``[dz, dy, dx]`` gives these 2-D distances its last two.

Volumes (:mod:`zoo.volume_metrics`): when the test dataset says which volume and slice each item is
(``dataset.volumes``, a :class:`~zoo.volume_metrics.VolumeIndex`, set by ``data.volume_key``), the test
step also keeps each slice's predicted and true label maps (uint8, on the CPU, gathered across DDP ranks)
and the test epoch ends with Dice, VS, HD95 and MSD per 3-D volume, averaged over volumes per class
(``test/volume_dice/<class>``) and over the foreground classes (``test/volume_dice``, ``test/volume_vs``,
``test/volume_hd95``, ``test/volume_msd``), plus ``test/volumes`` and ``test/volume_surface_undefined``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from ..volume_metrics import VolumeStore, volume_metrics
from .base import ZooTask


def scores_from_confusion(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    cm = cm.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    iou = tp / (tp + fp + fn)  # nan where the class never occurs
    dice = 2 * tp / (2 * tp + fp + fn)
    vs = 1 - (fn - fp).abs() / (2 * tp + fp + fn)  # volumetric similarity
    return {"iou": iou, "dice": dice, "vs": vs, "acc": tp.sum() / cm.sum().clamp_min(1)}


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each border pixel of ``pred`` to ``gt``'s border, and back (two non-empty bool masks)."""
    from scipy import ndimage

    def border(m: np.ndarray) -> np.ndarray:
        return m ^ ndimage.binary_erosion(m)

    bp, bg = border(pred), border(gt)
    to_gt = ndimage.distance_transform_edt(~bg, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)
    return to_gt[bp], to_pred[bg]


def hd95_msd(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] = 1.0) -> tuple[float, float]:
    """(95th-percentile Hausdorff distance, mean symmetric surface distance) of two non-empty masks."""
    a, b = surface_distances(pred, gt, spacing)
    return max(np.percentile(a, 95), np.percentile(b, 95)), float(np.concatenate([a, b]).mean())


class SurfaceDistances(Metric):
    """Per-class means over images of HD95 and MSD (see the module docstring); ``update(pred, target)``
    takes label maps ``[B, H, W]``."""

    full_state_update = False

    def __init__(self, num_classes: int, spacing: float | Sequence[float] | None = None, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        if spacing is not None and not np.isscalar(spacing) and len(spacing) == 3:
            spacing = spacing[1:]  # (dz, dy, dx): the slices' (dy, dx)
        self.spacing = 1.0 if spacing is None else (float(spacing) if np.isscalar(spacing) else tuple(map(float, spacing)))
        for name in ("hd95_sum", "msd_sum", "count"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.detach().cpu().numpy(), target.detach().cpu().numpy()
        hd, msd, n = (np.zeros(self.num_classes) for _ in range(3))
        for p, t in zip(pred, target):
            valid = t != self.ignore_index
            for c in range(1, self.num_classes):
                pm, tm = (p == c) & valid, t == c
                if pm.any() and tm.any():
                    h, m = hd95_msd(pm, tm, self.spacing)
                    hd[c] += h
                    msd[c] += m
                    n[c] += 1
        for name, v in (("hd95_sum", hd), ("msd_sum", msd), ("count", n)):
            getattr(self, name).add_(torch.from_numpy(v).to(self.count))

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp_min(1)
        nan = torch.full_like(n, float("nan"))
        has = self.count > 0
        return {"hd95": torch.where(has, self.hd95_sum / n, nan), "msd": torch.where(has, self.msd_sum / n, nan)}


class SegmentationMetrics(nn.Module):
    """The confusion matrix, plus surface distances and the slices' label maps for the volume metrics when
    ``surface=True`` (the test split)."""

    def __init__(self, num_classes: int, *, surface: bool = False, spacing=None):
        super().__init__()
        self.cm = MulticlassConfusionMatrix(num_classes, ignore_index=255)
        self.surface = SurfaceDistances(num_classes, spacing) if surface else None
        self.volumes = VolumeStore(num_classes) if surface else None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.cm.update(pred, target)
        if self.surface is not None:
            self.surface.update(pred, target)

    def reset(self) -> None:
        self.cm.reset()
        if self.surface is not None:
            self.surface.reset()
            self.volumes.reset()


def slide_inference(net: nn.Module, x: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """Sliding-window logits (mmseg's ``slide`` mode): ``crop`` x ``crop`` windows every ``stride`` pixels,
    the last window flush with the border, overlapping logits averaged; images smaller than ``crop`` are
    zero-padded to it and the padding is cut off again. ``x: [B, C, H, W]`` -> ``[B, num_classes, H, W]``."""
    B, _, H, W = x.shape
    ph, pw = max(crop - H, 0), max(crop - W, 0)
    if ph or pw:
        x = nn.functional.pad(x, (0, pw, 0, ph))
    Hp, Wp = x.shape[-2:]
    out = x.new_zeros(B, num_classes, Hp, Wp)
    count = x.new_zeros(1, 1, Hp, Wp)
    rows = sorted({min(r, Hp - crop) for r in range(0, max(Hp - crop, 0) + stride, stride)})
    cols = sorted({min(c, Wp - crop) for c in range(0, max(Wp - crop, 0) + stride, stride)})
    for r in rows:
        for c in cols:
            out[:, :, r:r + crop, c:c + crop] += net(x[:, :, r:r + crop, c:c + crop])
            count[:, :, r:r + crop, c:c + crop] += 1
    return (out / count)[:, :, :H, :W]


class SegmentationTask(ZooTask):
    """``inference`` (from the datamodule, else the training data's ``data_info``): ``{"mode": "whole"}``
    (default: the net sees the whole image) or ``{"mode": "slide", "crop": 512, "stride": 341}`` (ADE20K's
    usual sliding window)."""

    task = "segmentation"
    monitor = "val/miou"
    monitor_mode = "max"

    def inference(self) -> dict:
        dm = getattr(getattr(self, "_trainer", None), "datamodule", None)
        given = getattr(dm, "inference", None) or (self.hparams.get("data_info") or {}).get("inference")
        return dict(given or {"mode": "whole"})

    def eval_forward(self, x: torch.Tensor, **kw) -> torch.Tensor:
        inf = self.inference()
        if inf.get("mode", "whole") == "whole":
            return self.net(x, **kw)
        if inf["mode"] != "slide":
            raise ValueError(f"data.inference.mode must be 'whole' or 'slide', got {inf['mode']!r}")
        crop = int(inf["crop"])
        return slide_inference(self.net, x, crop, int(inf.get("stride", crop * 2 // 3)), self.hparams.num_classes)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics["test"] = self.make_metrics(surface=True)  # surface distances cost CPU: test split only
        self._test_volumes = self._test_batches = None  # set per test epoch (on_test_epoch_start)
        self._test_batch_idx = 0

    figure_keys = ("per_class_iou",)

    def test_figures(self) -> dict[str, tuple]:
        iou = getattr(self, "test_figure_values", {}).get("per_class_iou")
        return {} if iou is None else {"per_class_iou": (iou.cpu(), self.class_names)}

    def make_metrics(self, surface: bool = False) -> SegmentationMetrics:
        spacing = (self.hparams.get("data_info") or {}).get("spacing")
        return SegmentationMetrics(self.hparams.num_classes, surface=surface, spacing=spacing)

    # ------------------------------------------------------------------ volumes of slices (test split)
    def on_test_epoch_start(self) -> None:
        """The test dataset's volume index, if it has one, and this rank's batches of dataset indices (the
        test loader is not shuffled; under DDP its DistributedSampler's share)."""
        loader = self._stage_loader("test")
        self._test_volumes = getattr(getattr(loader, "dataset", None), "volumes", None)
        sampler = getattr(loader, "batch_sampler", None)
        self._test_batches = list(sampler) if self._test_volumes is not None and sampler is not None else None

    def test_step(self, batch, batch_idx: int) -> None:
        self._test_batch_idx = batch_idx  # which dataset items this batch holds, for update_metrics
        super().test_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._test_volumes = self._test_batches = None

    def update_metrics(self, metrics, logits, y) -> None:
        pred = logits.argmax(1)
        metrics.update(pred, y)
        if metrics.volumes is not None and self._test_batches is not None:
            indices = self._test_batches[self._test_batch_idx]
            if len(indices) != len(y):
                raise RuntimeError(f"test batch {self._test_batch_idx} holds {len(y)} items but its sampler gave "
                                   f"{len(indices)} indices; the volume metrics cannot tell the slices apart")
            metrics.volumes.add(indices, pred, y)

    def compute_metrics(self, metrics) -> dict[str, torch.Tensor]:
        s = scores_from_confusion(metrics.cm.compute())
        fg = slice(1, None) if len(s["dice"]) > 1 else slice(None)
        out = {"miou": s["iou"].nanmean(), "acc": s["acc"], "dice": s["dice"][fg].nanmean(), "vs": s["vs"][fg].nanmean()}
        out.update({f"iou_{n}": v for n, v in zip(self.class_names, s["iou"])})
        out.update({f"dice_{n}": v for n, v in zip(self.class_names, s["dice"])})
        out.update({f"vs_{n}": v for n, v in zip(self.class_names, s["vs"])})
        out = {k: torch.nan_to_num(v.float(), nan=0.0) for k, v in out.items()}
        out["per_class_iou"] = s["iou"].float()  # a figure_key: per_class_iou.png, not logged
        if metrics.surface is not None:  # NaN kept: 0 would read as a perfect distance
            for key, v in metrics.surface.compute().items():
                out[key] = v[fg].float().nanmean()
                out.update({f"{key}_{n}": v[c].float() for c, n in enumerate(self.class_names) if c > 0})
        if metrics.volumes is not None and self._test_volumes is not None:  # every rank the same (items gathered)
            scores = volume_metrics(metrics.volumes.gathered(), self._test_volumes, self.class_names)
            out.update({k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in scores.items()})
        return out
