"""End to end: configs compose, each task trains (fast_dev_run), resume, evaluate == train, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import zoo
from zoo.errors import DatasetNotFoundError, InputSizeError, TaskMismatchError, UnknownModelError
from zoo.runner import run_task

from conftest import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
         "+trainer.limit_test_batches=2"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, compose_cfg):
    from train import build_callbacks, build_loggers

    cfg = compose_cfg("train", [f"experiment={experiment}", "logger=csv"])
    dm = instantiate(cfg.data)
    spec = zoo.get_spec(cfg.model.name)
    task = run_task(spec.task, dm.task)  # a classification net on Re-ID data: the Re-ID task
    assert task == dm.task
    assert build_callbacks(cfg, "val/acc", "max") and build_loggers(cfg)
    embedded = cfg.data.get("root") is None
    num_classes = dm.num_classes if embedded else 2
    kwargs = dict(cfg.model.kwargs)
    if embedded:
        kwargs.update(dm.model_kwargs())
    elif spec.task == "mil":
        kwargs.setdefault("in_dim", 64)
    big = (spec.input_size or (0,))[-1] > 64  # the paper-sized nets: built on the meta device (no init cost)
    with torch.device("meta" if big else "cpu"):
        net = zoo.create_model(cfg.model.name, num_classes=num_classes, **kwargs)
    assert sum(p.numel() for p in net.parameters()) > 0
    # the task accepts the recipe's optimisation settings (e.g. mixup with a model's own objective is refused)
    from zoo.tasks import TASKS

    TASKS[task](net, model={"name": cfg.model.name, "kwargs": kwargs}, num_classes=num_classes,
                optim=dict(cfg.optim), **({"reid": dict(cfg.reid)} if "reid" in cfg else {}))
    # evaluate.py takes the same experiment
    compose_cfg("evaluate", [f"experiment={experiment}", "ckpt_path=x.ckpt"])


@pytest.mark.parametrize("model,data,key", [
    ("halonet_tiny", "digits", "test/acc"),
    ("fpn_tiny", "shapes", "test/miou"),
    ("abmil", "digit_bags", "test/auroc"),
])
def test_fast_dev_run_each_task(model, data, key, compose_cfg, tmp_path):
    from train import train

    cfg = compose_cfg("train", [f"model={model}", f"data={data}", "trainer=debug", f"metrics_file={tmp_path}/m.json"])
    metrics = train(cfg)
    assert key in metrics
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_resume_from_last_and_evaluate_reproduces(compose_cfg, tmp_path):
    from evaluate import evaluate
    from train import train

    run = tmp_path / "run"
    lists = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]  # list values must survive weights_only loading
    cfg = compose_cfg("train", ["model=halonet_tiny", "data=digits", *SHORT, *lists], out_dir=run)
    first = train(cfg)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and first["test/acc"] >= 0
    assert torch.load(last, weights_only=True)["epoch"] == 0

    # resume: one more epoch on top of the saved one
    cfg = compose_cfg("train", ["model=halonet_tiny", "data=digits", *SHORT, *lists, "trainer.max_epochs=2",
                                f"ckpt_path={last}"], out_dir=run)
    resumed = train(cfg)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == 2
    assert ckpt["global_step"] == 6  # 3 steps in each of the 2 epochs: none repeated, none lost

    best = next((run / "checkpoints").glob("best-*.ckpt"))
    ecfg = compose_cfg("evaluate", ["data=digits", f"ckpt_path={best}", "+trainer.limit_test_batches=2"],
                       out_dir=tmp_path / "eval")
    again = evaluate(ecfg)
    assert set(again) == set(resumed)
    for k in resumed:
        assert again[k] == pytest.approx(resumed[k], abs=1e-6), k


def test_last_checkpoint_is_the_latest_epoch_even_without_improvement(compose_cfg, tmp_path):
    from train import train

    run = tmp_path / "run"
    # lr 1e-30 (the config check refuses lr <= 0): each update is below float32 rounding of the weights, so
    # the monitored metric cannot improve after the first epoch
    train(compose_cfg("train", ["model=halonet_tiny", "data=digits", *SHORT, "trainer.max_epochs=3", "optim.lr=1e-30",
                                "test=false"], out_dir=run))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 9
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == ["best-epoch000.ckpt"]


def test_explain_writes_pngs(compose_cfg, tmp_path):
    from evaluate import evaluate
    from train import train

    run = tmp_path / "run"
    train(compose_cfg("train", ["model=halonet_tiny", "data=digits", *SHORT], out_dir=run))
    out = tmp_path / "maps"
    evaluate(compose_cfg("evaluate", ["data=digits", f"ckpt_path={run}/checkpoints/last.ckpt", "explain=true",
                                      f"explain_dir={out}", "explain_images=2", "+trainer.limit_test_batches=1"],
                         out_dir=tmp_path / "eval"))
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_init_from_checkpoint_reinitialises_head(compose_cfg, tmp_path):
    from zoo.runner import init_from_checkpoint

    from train import train

    run = tmp_path / "run"
    train(compose_cfg("train", ["model=halonet_tiny", "data=digits", *SHORT, "test=false"], out_dir=run))
    net = zoo.create_model("halonet_tiny", num_classes=4)
    skipped = init_from_checkpoint(net, str(run / "checkpoints" / "last.ckpt"))
    assert skipped == ["head.fc.weight", "head.fc.bias"]
    sd = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(net.stem.conv.weight, sd["net.stem.conv.weight"])


def test_freeze_backbone_trains_only_head(compose_cfg):
    from zoo.runner import build_task

    cfg = compose_cfg("train", ["model=halonet_tiny", "model.freeze_backbone=true"])
    dm = instantiate(cfg.data)
    from zoo.runner import prepare_data

    prepare_data(dm, cfg.model.name)
    task = build_task(dict(cfg.model), dm)
    trainable = {n for n, p in task.net.named_parameters() if p.requires_grad}
    assert trainable == {"head.fc.weight", "head.fc.bias"}


def test_wandb_offline_creates_run_directory(compose_cfg, tmp_path):
    from train import train

    run = tmp_path / "run"
    train(compose_cfg("train", ["model=halonet_tiny", "data=digits", "logger=wandb", *SHORT, "test=false"], out_dir=run))
    assert list((run / "wandb").glob("offline-run-*")), list(run.rglob("*"))[:20]


# ---------------------------------------------------------------- bad input gets a clear error
def test_unknown_model_error(compose_cfg):
    from train import train

    with pytest.raises(UnknownModelError, match="halonet_tiny"):
        train(compose_cfg("train", ["model.name=halonet_tinyy", "trainer=debug"]))


def test_task_mismatch_error_names_both(compose_cfg):
    from train import train

    with pytest.raises(TaskMismatchError) as e:
        train(compose_cfg("train", ["model=fpn_tiny", "data=digits", "trainer=debug"]))
    assert "fpn_tiny" in str(e.value) and "segmentation" in str(e.value) and "classification" in str(e.value)


def test_wrong_image_size_error(compose_cfg):
    from train import train

    with pytest.raises(InputSizeError, match="multiples of 32"):
        train(compose_cfg("train", ["model=halonet_tiny", "data=digits", "data.img_size=48", "trainer=debug"]))


def test_missing_data_folder_error(compose_cfg, tmp_path):
    from train import train

    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DatasetNotFoundError) as e:
        train(compose_cfg("train", ["data=imagefolder", f"data.root={missing}", "trainer=debug"]))
    assert str(missing) in str(e.value)


def test_cli_train_writes_everything_under_the_run_dir(tmp_path):
    run = tmp_path / "cli_run"
    proc = subprocess.run(
        [sys.executable, "train.py", "trainer=debug", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.json").is_file() and (run / "config.yaml").is_file() and (run / ".hydra").is_dir()
    assert "test/acc" in proc.stdout


def test_cli_reports_zoo_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "model=fpn_tiny", "trainer=debug", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "segmentation" in (proc.stdout + proc.stderr)
