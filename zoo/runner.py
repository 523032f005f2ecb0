"""The steps train.py and evaluate.py share, free of Hydra: plain dicts in, Lightning objects out."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TaskMismatchError
from .registry import constructor_kwargs, create_model, get_spec
from .scale import enable_grad_checkpointing
from .spec import RunInput, resolve_run_input
from .tasks import TASKS, ZooTask
from .weights import extract_state_dict, load_into, safe_load


def run_task(model_task: str, data_task: str) -> str:
    """The task of a run: the model's, except that a classification net on Re-ID data trains for Re-ID."""
    return "reid" if (model_task, data_task) == ("classification", "reid") else model_task


def _data_hw(dm: Any) -> tuple[int, int] | None:
    """Re-ID data's (H, W) input (non-square: 256 x 128 persons); None for the square-input datamodules."""
    hw = getattr(dm, "img_hw", None) if getattr(dm, "task", None) == "reid" else None
    return None if hw is None else (int(hw[0]), int(hw[1]))


def prepare_data(dm: Any, model_name: str, stored: dict | None = None, log: Any = None) -> RunInput:
    """Check the model fits the data (task, input size), resolve the run's input once (user / data
    config > a checkpoint's ``stored`` input > model spec > dataset default), give it to ``dm``, set up."""
    spec = get_spec(model_name)
    if run_task(spec.task, dm.task) != dm.task:
        raise TaskMismatchError(
            f"model {model_name!r} is a {spec.task} model but data '{getattr(dm, 'dataset', type(dm).__name__)}' "
            f"is a {dm.task} dataset. Pick a {dm.task} model (`python -m zoo list --task {dm.task}`) "
            f"or {spec.task} data."
        )
    run = resolve_run_input(spec, dm.given_input(), dm.dataset_defaults, stored, log)
    dm.configure_input(run)
    hw = _data_hw(dm)
    if hw is not None:  # the net is built for the data's (H, W) (net_input_kwargs); a free-size net's rules hold
        if not spec.fixed_input_size:
            spec.check_input_size(hw)
    elif spec.task != "mil":
        size = dm.img_size
        spec.built_for(img_size=size if spec.fixed_input_size else None).check_input_size(size)
    dm.setup("fit")
    return run


def net_input_kwargs(model_name: str, dm: Any) -> dict:
    """The constructor arguments that make the net fit the run's input: channels, and the image size for
    nets whose position embeddings are built for one (fixed-size ViTs resize them, from weights too)."""
    spec = get_spec(model_name)
    kwargs = dict(dm.model_kwargs())
    size = getattr(dm, "img_size", None) if spec.task != "mil" else None
    takes_size = spec.fixed_input_size or "img_size" in constructor_kwargs(model_name)  # fixed-size builders take it
    hw = _data_hw(dm)
    if hw is not None:  # Re-ID: (H, W), e.g. [256, 128] (a list: checkpoints and JSON configs keep it)
        if spec.input_size and hw != tuple(spec.input_size[-2:]) and takes_size:
            kwargs["img_size"] = list(hw)
    elif size is not None and spec.input_size and size != spec.input_size[-1] and takes_size:
        kwargs["img_size"] = int(size)
    return kwargs


def data_info(dm: Any) -> dict:
    """What a checkpoint must remember of the data to preprocess the same way later."""
    hp = getattr(dm, "hparams", None) or {}
    spacing = hp.get("spacing")  # segmentation: pixel size for distances
    inference = getattr(dm, "inference", None)  # segmentation: whole-image or sliding-window evaluation
    # the rest of the eval transform (`zoo predict` rebuilds it): FGVC's resize-then-crop, the seg eval size,
    # and the backbone that extracted MIL features (to extract a tile folder's the same way)
    extra = {k: hp.get(k) for k in ("resize_ratio", "eval_resize") if hp.get(k) is not None}
    features = getattr(dm, "features_manifest", None)
    extra |= {"features": features} if features else {}
    run = getattr(dm, "run_input", None)
    return ({"spacing": spacing} if spacing is not None else {}) | ({"inference": inference} if inference else {}) | extra | {
        "dataset": getattr(dm, "dataset", None) or dm.hparams.get("dataset"),
        "img_size": getattr(dm, "img_size", None),
        **({"img_hw": list(_data_hw(dm))} if _data_hw(dm) else {}),
        "in_chans": getattr(dm, "in_chans", None),
        "mean": list(dm.mean) if getattr(dm, "mean", None) is not None else None,
        "std": list(dm.std) if getattr(dm, "std", None) is not None else None,
        "interpolation": run.interpolation if run is not None else None,
        "crop_pct": run.crop_pct if run is not None else None,
        "class_names": list(dm.class_names),
    }


def init_from_checkpoint(net: nn.Module, path: str) -> list[str]:
    """Copy weights from a zoo (Lightning) checkpoint or Hub folder; a head of another class count is re-initialised."""
    from .hub import folder_state_dict, is_hub_source

    sd = folder_state_dict(path) if is_hub_source(path) else extract_state_dict(safe_load(path))
    return load_into(net, sd, source=str(path))


def build_task(model_cfg: dict, dm: Any, optim: dict | None = None, init_from: str | None = None,
               compile: bool | str = False, reid: dict | None = None) -> ZooTask:
    """Create the net the config names, sized for ``dm``, and wrap it in its task's LightningModule
    (``model.grad_checkpointing``, ``model.channels_last`` and ``trainer.compile`` wired in here).
    On Re-ID data a classification net is built without a classifier (``num_classes=0``: the
    :class:`~zoo.tasks.ReIDTask` holds the identity classifiers) and ``reid`` holds the task's options."""
    name = model_cfg["name"]
    task = run_task(get_spec(name).task, dm.task)
    if reid and task != "reid":
        from .validate import ConfigError

        raise ConfigError(f"reid.* options are for Re-ID data; data '{getattr(dm, 'dataset', type(dm).__name__)}' "
                          f"is {dm.task} data: drop them")
    kwargs = {**dict(model_cfg.get("kwargs") or {}), **net_input_kwargs(name, dm)}
    net = create_model(
        name,
        pretrained=bool(model_cfg.get("pretrained", False)),
        pretrained_file=model_cfg.get("pretrained_file"),
        num_classes=0 if task == "reid" else dm.num_classes,
        **kwargs,
    )
    if init_from:
        init_from_checkpoint(net, init_from)
    if model_cfg.get("grad_checkpointing", False):
        enable_grad_checkpointing(net, get_spec(name).task, name)
    return TASKS[task](
        net,
        model={"name": name, "kwargs": kwargs},
        num_classes=dm.num_classes,
        optim=optim,
        data_info=data_info(dm),
        freeze_backbone=bool(model_cfg.get("freeze_backbone", False)),
        **({"reid": reid} if task == "reid" else {}),
    ).set_runtime(channels_last=model_cfg.get("channels_last", False), compile=compile)


def load_task(ckpt_path: str, map_location: str = "cpu") -> ZooTask:
    """Rebuild a task module from a zoo checkpoint, safely (``weights_only=True``): the net as
    :func:`zoo.explain.load_net_from_checkpoint` rebuilds it everywhere a checkpoint is read."""
    from .explain import load_net_from_checkpoint

    net, hp = load_net_from_checkpoint(ckpt_path, map_location=map_location)
    task_cls = TASKS["reid" if "reid" in hp else net.zoo_spec.task]  # a Re-ID task stores its reid options
    task = task_cls(net.train(), **{**hp, "freeze_backbone": False})
    own = [k for k in task.state_dict() if not k.startswith("net.")]
    if own:  # the task's own weights (Re-ID: BNNeck + identity classifiers), beside the net's
        from .hub import is_hub_source

        sd = {} if is_hub_source(ckpt_path) else safe_load(ckpt_path, map_location=map_location, mmap=True)["state_dict"]
        absent = [k for k in own if k not in sd]
        if absent:
            from .errors import WeightsError

            raise WeightsError(f"{ckpt_path} lacks the task's weights {absent[:6]} ({task_cls.__name__}); "
                               "give the Lightning checkpoint of the training run")
        task.load_state_dict({k: sd[k] for k in own}, strict=False)
    return task


def flat_metrics(results: list[dict] | dict) -> dict[str, float]:
    """Lightning's test results -> ``{"test/acc": 0.98, ...}`` (plain floats, NaN kept as null-safe floats)."""
    rows = results if isinstance(results, list) else [results]
    out: dict[str, float] = {}
    for row in rows:
        out.update({k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
    return dict(sorted(out.items()))


def write_metrics(metrics: dict[str, float], *paths: str | Path | None) -> None:
    text = json.dumps({k: (None if math.isnan(v) else v) for k, v in metrics.items()}, indent=2)
    from .weights import atomic_write

    for p in paths:  # atomically: a full disk leaves the previous metrics file as it was
        if p:
            atomic_write(p, lambda tmp: tmp.write_text(text + "\n"), what="the metrics file")


def print_metrics_table(metrics: dict[str, float], title: str = "Test metrics") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    Console().print(table)


def trainer_kwargs(trainer: dict, optim: dict | None = None) -> dict:
    """A run's ``trainer`` config as ``lightning.Trainer`` kwargs: ``trainer.compile`` is the zoo's (the task
    compiles its net), ``optim.accumulate`` -> ``accumulate_grad_batches``, and SyncBatchNorm (GPUs only) is
    dropped for DDP on CPU (gloo syncs gradients only)."""
    import logging

    from .scale import accumulate_grad_batches

    kw = dict(trainer)
    kw.pop("compile", None)
    kw["accumulate_grad_batches"] = accumulate_grad_batches(kw, dict(optim or {}))
    accelerator = str(kw.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if kw.get("sync_batchnorm") and not on_gpu:
        logging.getLogger("zoo.train").info("trainer.sync_batchnorm ignored: SyncBatchNorm needs GPUs")
        kw["sync_batchnorm"] = False
    return kw
