"""The pictures a run leaves in its folder: ``curves.png`` (loss and monitored metric per epoch, from the
CSV logger's ``metrics.csv``) and the test split's ``confusion_matrix.png`` (classification),
``per_class_iou.png`` (segmentation) or ``roc.png`` (MIL), from the task's :meth:`test_figures`.

Headless (matplotlib's Agg canvas through ``Figure``, no pyplot state). :func:`write_run_figures` never
raises: a picture that cannot be drawn is a warning, the run and its metrics.json stay as they are.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from .weights import atomic_write

log = logging.getLogger("zoo.plots")

MAX_TICK_LABELS = 30  # more classes than this: the confusion matrix is drawn without names


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), what=path.name)
    return path


def read_metrics_csv(paths: list[Path]) -> list[dict[str, float]]:
    """Rows of Lightning CSVLogger files (several versions: a resumed run), empty cells dropped."""
    rows = []
    for p in paths:
        with p.open(newline="") as f:
            for row in csv.DictReader(f):
                rows.append({k: float(v) for k, v in row.items() if k and v not in ("", None)})
    return rows


def epoch_curves(rows: list[dict[str, float]], keys: list[str]) -> dict[str, dict[int, float]]:
    """``{key: {epoch: value}}``: the mean of a key's rows in each epoch (train/loss is logged per step);
    a later file's epoch replaces an earlier one's (a resumed run repeats its interrupted epoch)."""
    out: dict[str, dict[int, list[float]]] = {k: {} for k in keys}
    for row in rows:
        if "epoch" not in row:
            continue
        for k in keys:
            if k in row and math.isfinite(row[k]):
                out[k].setdefault(int(row["epoch"]), []).append(row[k])
    return {k: {e: sum(v) / len(v) for e, v in sorted(d.items())} for k, d in out.items() if d}


def plot_curves(csv_files: list[Path], monitor: str, path: Path) -> Path | None:
    """train/loss (logged every ``trainer.log_every_n_steps``: absent from runs shorter than that), val/loss
    and ``monitor`` per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = epoch_curves(read_metrics_csv(csv_files), ["train/loss", "val/loss", monitor])
    if not curves:
        log.info("no curves.png: %s has no per-epoch values", ", ".join(map(str, csv_files)))
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key, ax in (("train/loss", ax_loss), ("val/loss", ax_loss), (monitor, ax_metric)):
        if key in curves:
            ax.plot(list(curves[key]), list(curves[key].values()), "o-", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_metric.set(xlabel="epoch", ylabel=monitor, title=monitor)
    epochs = sorted({e for c in curves.values() for e in c})
    for ax in (ax_loss, ax_metric):
        if len(epochs) <= 15:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save(fig, path)


def plot_confusion_matrix(cm, class_names: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    cm = cm.float()
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)  # rows: true class; colour = recall share
    n = len(class_names)
    side = min(12.0, 3 + 0.4 * n)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"test confusion matrix ({int(cm.sum())} samples)")
    return save(fig, path)


def plot_per_class_iou(iou, class_names: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    present = [v for v in iou.tolist() if not math.isnan(v)]  # NaN: a class absent from labels and predictions
    values = [0.0 if math.isnan(v) else v for v in iou.tolist()]
    fig = Figure(figsize=(max(5.0, 0.5 * len(values) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), class_names, rotation=90 if len(values) > 8 else 0)
    ax.set(ylim=(0, 1), ylabel="IoU", title=f"test per-class IoU (mIoU {sum(present) / max(1, len(present)):.3f})")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def plot_roc(curves: dict[str, tuple[Any, Any]], path: Path) -> Path:
    """``curves``: ``{label: (fpr, tpr)}`` (one for a binary task, one per class otherwise)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import auc

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{label} (AUC {auc(fpr.numpy(), tpr.numpy()):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize="small", loc="lower right")
    return save(fig, path)


DRAW = {"confusion_matrix": plot_confusion_matrix, "per_class_iou": plot_per_class_iou, "roc": plot_roc}


def csv_logger_files(loggers: list) -> list[Path] | None:
    """The metrics.csv files of the run's CSVLogger (every version: resumed runs add one); None without one."""
    from lightning.pytorch.loggers import CSVLogger

    for lg in loggers:
        if isinstance(lg, CSVLogger):
            return sorted(Path(lg.root_dir).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:] or 0))
    return None


def write_run_figures(task, loggers: list, out_dir: str | Path) -> list[Path]:
    """``curves.png`` and the task's test figures into ``out_dir``; every failure is a warning only."""
    out_dir, written = Path(out_dir), []
    jobs = []
    files = csv_logger_files(loggers)
    if files is None:
        log.info("no curves.png: the CSV logger is off (logger=csv writes the metrics.csv it is drawn from)")
    else:
        jobs.append(("curves.png", lambda: plot_curves(files, task.monitor, out_dir / "curves.png")))
    try:
        figures = task.test_figures()
    except Exception as e:  # noqa: BLE001 - a picture must never fail the run
        log.warning("no test figures: %s: %s", type(e).__name__, e)
        figures = {}
    for name, args in figures.items():
        jobs.append((f"{name}.png", lambda name=name, args=args: DRAW[name](*args, out_dir / f"{name}.png")))
    for name, job in jobs:
        try:
            path = job()
        except Exception as e:  # noqa: BLE001
            log.warning("could not draw %s: %s: %s", name, type(e).__name__, e)
            continue
        if path is not None:
            written.append(path)
    if written:
        log.info("wrote %s in %s", ", ".join(p.name for p in written), out_dir)
    return written
