"""Sweeps: a real 2x2 Hydra multirun (own readable folder per run, sibling locks never block) and
``python -m zoo results`` over it (table, results.md / .csv / .png, unfinished runs listed)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_picture

TINY = ["model=halonet_tiny", "data=digits", "data.batch_size=8", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "+trainer.num_sanity_val_steps=0", "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null",
        "callbacks.lr_monitor=null", "logger=none", "test_last=false"]
NAMES = ["0_optim.lr=0.001,seed=1", "1_optim.lr=0.001,seed=2", "2_optim.lr=0.003,seed=1", "3_optim.lr=0.003,seed=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = subprocess.run([sys.executable, "train.py", "-m", *TINY, "optim.lr=1e-3,3e-3", "seed=1,2",
                           f"hydra.sweep.dir={root}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_writes_one_readable_folder_per_run(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:  # each run held only its own folder: all four finished
        assert (sweep / name / "metrics.json").is_file() and (sweep / name / "config.yaml").is_file()


def test_results_table_files_and_plot(sweep, tmp_path, capsys):
    from zoo.__main__ import main

    assert main(["results", str(sweep), "--out", str(tmp_path)]) == 0
    assert "4 run(s)" in capsys.readouterr().out
    rows = read_csv(tmp_path / "results.csv")
    assert [r["run"] for r in rows] == NAMES
    swept = [k for k in rows[0] if k not in ("run", "status") and not k.startswith("test/")]
    assert swept == ["optim.lr", "seed"]  # data.seed (a copy of seed) and the run folders' paths left out
    assert [(r["optim.lr"], r["seed"]) for r in rows] == [("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2")]
    assert all(r["status"] == "done" and r["test/acc"] for r in rows)
    md = (tmp_path / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| run | optim.lr | seed | test/acc")
    assert_picture(tmp_path / "results.png")


def test_unfinished_run_is_listed_not_dropped(sweep, tmp_path):
    from zoo.results import results

    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(sweep), str(run)], check=True)
    (run / NAMES[1] / "metrics.json").unlink()
    r = results(run, metric="test/f1", x="optim.lr")
    assert [x.status for x in r["runs"]] == ["done", "no metrics.json (crashed or unfinished)", "done", "done"]
    assert read_csv(run / "results.csv")[1]["test/f1"] == ""
    assert_picture(run / "results.png")


def test_errors_are_one_line_exit_2(sweep, tmp_path, capsys):
    from zoo.__main__ import main

    assert main(["results", str(tmp_path / "nothing")]) == 2
    assert main(["results", str(tmp_path)]) == 2  # a folder without runs
    assert main(["results", str(sweep), "--out", str(tmp_path), "--metric", "test/nope"]) == 2
    assert main(["results", str(sweep), "--out", str(tmp_path), "--x", "model.name"]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "no runs under" in err and "test/acc" in err and "optim.lr, seed" in err


def test_sweep_subdir_names_the_swept_keys_only():
    from zoo.sweep import sweep_subdir

    argv = ["-m", "model=x", "optim.lr=1e-3,3e-3", "seed=range(2)", "data.crop_scale=[0.5,1.0]", "hydra.sweep.dir=a,b"]
    job = ["model=x", "optim.lr=0.001", "seed=1", "data.crop_scale=[0.5,1.0]", "data.root=/d/e"]
    assert sweep_subdir(0, job, argv) == "0_optim.lr=0.001,seed=1"
    assert sweep_subdir(3, ["data.root=/d/e"], ["data.root=/d/e,/f/g"]) == "3_data.root=_d_e"  # no nested folders
    assert sweep_subdir(1, job, ["model=x"]) == "1"  # a sweeper config's parameters: the number alone


def test_log_axis_for_lr_like_values():
    from zoo.results import log_x

    assert log_x([1e-4, 1e-3, 1e-2]) and not log_x([1e-3, 3e-3]) and not log_x([0, 1, 100])
