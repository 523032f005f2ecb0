"""The pictures a run writes: curves.png from the CSV logger, and the test split's confusion matrix
(classification), per-class IoU (segmentation) or ROC (MIL); a drawing failure never fails the run."""
from __future__ import annotations

import json
import logging

import pytest

from conftest import assert_picture

LIGHT = ["trainer.max_epochs=1", "trainer.log_every_n_steps=1", "+trainer.limit_train_batches=2",
         "+trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0",
         "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "test_last=false"]
RUNS = {
    "classification": (["model=halonet_tiny", "data=digits", "data.batch_size=8", "+trainer.limit_test_batches=1"],
                       "confusion_matrix.png"),
    "segmentation": (["model=fpn_tiny", "data=shapes", "data.img_size=32", "data.batch_size=4",
                      "+trainer.limit_test_batches=1"], "per_class_iou.png"),
    # 12 test bags: a ROC curve needs both classes among them
    "mil": (["model=abmil", "data=digit_bags", "data.batch_size=4", "+trainer.limit_test_batches=3"], "roc.png"),
}


@pytest.mark.parametrize("task", list(RUNS))
def test_a_run_writes_its_curves_and_test_figure(task, compose_cfg, tmp_path):
    from train import train

    overrides, figure = RUNS[task]
    train(compose_cfg("train", [*overrides, *LIGHT], out_dir=tmp_path))
    assert_picture(tmp_path / "curves.png")
    assert_picture(tmp_path / figure)


class Task:
    monitor = "val/acc"

    def test_figures(self):
        return {"confusion_matrix": ("not a tensor", ["a"])}


def test_drawing_failures_and_no_csv_logger_are_log_lines_only(tmp_path, caplog):
    from zoo.plots import write_run_figures

    with caplog.at_level(logging.INFO, logger="zoo.plots"):
        assert write_run_figures(Task(), [], tmp_path) == []
    assert "CSV logger is off" in caplog.text and "could not draw confusion_matrix.png" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_failing_plot_leaves_the_run_and_its_metrics(compose_cfg, tmp_path, monkeypatch):
    import zoo.plots
    from train import train

    def boom(*a, **k):
        raise RuntimeError("no figure today")

    monkeypatch.setitem(zoo.plots.DRAW, "confusion_matrix", boom)
    overrides = [*RUNS["classification"][0], *LIGHT, "logger=none", "callbacks.lr_monitor=null"]
    metrics = train(compose_cfg("train", overrides, out_dir=tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert "test/acc" in metrics and not (tmp_path / "confusion_matrix.png").exists()
    assert not (tmp_path / "curves.png").exists()  # logger=none: no metrics.csv to draw
