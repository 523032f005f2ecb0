"""What the three task modules share: building the net, the optimizer, the schedule, the step logic.

Tasks know nothing of a particular architecture; they call the model contract (:mod:`zoo.contract`): a
net that declares ``own_objective`` has ``forward_train(x, y, **kw) -> (logits, {name: loss})`` and the
task sums and logs those losses.
"""
from __future__ import annotations

import abc
import itertools
import logging
import math
from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ..contract import capabilities, no_weight_decay, spec_of
from ..errors import NonFiniteError
from ..registry import create_model
from ..spec import OPTIM_KEYS
from ..scale import compile_backend, effective_batch, lr_plan_line, optimizer_impl, scaled_lr, use_channels_last

log = logging.getLogger("zoo.train")

DEFAULT_OPTIM = dict(
    name="adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, betas=(0.9, 0.999),
    warmup_epochs=1.0, warmup_lr_ratio=0.01, min_lr_ratio=0.01, scheduler="cosine", label_smoothing=0.0,
    lr_decay_at=(0.5,), lr_decay_rate=0.1,  # scheduler="step": lr x rate at each of these fractions of the run
    mixup_alpha=0.0, cutmix_alpha=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,  # classification only (timm Mixup)
    accumulate=1, lr_base_batch=None,  # gradient accumulation; DeiT's lr x effective batch / lr_base_batch
)
# adamw and sgd are built here; the others are timm's (create_optimizer_v2) for the recipes that name them
OPTIMIZERS = ("adamw", "sgd", "adam", "radam", "lookahead_radam")
SCHEDULERS = ("cosine", "step", "none")
OPTIMIZER_TIED = ("lr", "weight_decay", "betas")  # a model's values of these hold for its own optimizer only


def build_net(model: dict, num_classes: int) -> nn.Module:
    """Rebuild a net from a checkpoint's stored hyper-parameters (no downloads: weights come from the checkpoint)."""
    return create_model(model["name"], num_classes=num_classes, **dict(model.get("kwargs") or {}))


def freeze_backbone_of(net: nn.Module, task: str) -> None:
    """Freeze all but the head: the net's own ``freeze_backbone()`` where it declares trainable groups,
    else every parameter but the classifier's (``get_classifier()``, part of the classification contract)."""
    if capabilities(net).trainable_groups:
        net.freeze_backbone()
        return
    if task != "classification":
        raise ValueError(f"{type(net).__name__} declares no trainable groups (freeze_backbone); only classification "
                         "nets can freeze all but their classifier")
    net.requires_grad_(False)
    net.get_classifier().requires_grad_(True)


def warmup_cosine(step: int, total: int, warmup: int, warmup_ratio: float, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ``warmup_ratio`` to 1, then half-cosine down to ``min_ratio``."""
    if step < warmup:
        return warmup_ratio + (1 - warmup_ratio) * step / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_step(step: int, total: int, warmup: int, warmup_ratio: float, decay_at: list, rate: float) -> float:
    """LR multiplier: linear warmup, then ``rate`` to the power of the milestones passed (fractions of ``total``),
    as ``MultiStepLR`` with its milestones at those fractions of the run."""
    if step < warmup:
        return warmup_ratio + (1 - warmup_ratio) * step / max(1, warmup)
    return float(rate) ** sum(step >= round(float(f) * total) for f in decay_at)


def lr_lambda(o: dict, total: int, max_epochs: int | None):
    """The LR multiplier per optimizer step for ``total`` steps over ``max_epochs`` (warmup in epochs)."""
    warmup = int(total * float(o["warmup_epochs"]) / max(1, max_epochs or 1))
    if o.get("scheduler") == "step":
        return lambda s: warmup_step(s, total, warmup, o["warmup_lr_ratio"], list(o["lr_decay_at"]), o["lr_decay_rate"])
    return lambda s: warmup_cosine(s, total, warmup, o["warmup_lr_ratio"], o["min_lr_ratio"])


class ZooTask(L.LightningModule):
    """Base LightningModule: subclasses set ``task``, ``monitor`` and implement the metric hooks."""

    task = ""
    monitor = "val/loss"
    monitor_mode = "min"
    # the task's optim defaults, under a model spec's train_defaults (precedence: TrainDefaults's docstring)
    train_defaults: dict[str, Any] = {}

    @classmethod
    def defaults_for(cls, spec: Any, optimizer: str | None = None) -> dict[str, Any]:
        """The optim values a run of ``spec``'s model falls back to: the task's, then the model's own. With
        ``optimizer`` other than theirs, their lr, weight decay and betas (tuned for their optimizer) are left out."""
        own = spec.train_defaults.optim() if spec is not None and spec.train_defaults is not None else {}
        out = {**cls.train_defaults, **own}
        if optimizer is not None and str(optimizer).lower() != str(out.get("name", optimizer)).lower():
            out = {k: v for k, v in out.items() if k not in OPTIMIZER_TIED and k != "name"}
        return out

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        model: dict,
        num_classes: int,
        optim: dict | None = None,
        data_info: dict | None = None,
        freeze_backbone: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else build_net(model, num_classes)
        spec = self._spec = _spec_of(self.net, model)
        self.spec_defaults = self.defaults_for(spec)  # the model's own (over its task's), for the start-of-run line
        # given > model's > task's > global; the model's lr / weight decay / betas only with its own optimizer
        self.optim = {**DEFAULT_OPTIM, **self.defaults_for(spec, (optim or {}).get("name")), **(optim or {})}
        if freeze_backbone:
            freeze_backbone_of(self.net, self.task)
        self.num_classes = num_classes
        self.class_names = list((data_info or {}).get("class_names") or [str(i) for i in range(num_classes)])
        self.metrics = nn.ModuleDict({s: self.make_metrics() for s in ("val", "test")})
        # run-time choices, not hyper-parameters (a checkpoint loads the same without them): set_runtime()
        self._runtime: dict[str, bool | str] = {"channels_last": False, "compile": False}
        self._channels_last_on = self._compiled = False

    def set_runtime(self, channels_last: bool | str = False, compile: bool | str = False) -> "ZooTask":
        """``model.channels_last`` (true/false/auto) and ``trainer.compile``, applied in :meth:`configure_model`
        once the device is known."""
        compile_backend(compile)  # a bad value fails now, not after the data is set up
        self._runtime = {"channels_last": channels_last, "compile": compile}  # not self.compile: nn.Module's method
        return self

    def configure_model(self) -> None:
        """Lightning calls this on the trainer's device before fit/test. ``net.compile()`` compiles the module's
        call in place, so state_dict keys stay the net's own (no ``_orig_mod.``)."""
        device = self.trainer.strategy.root_device.type if self._trainer is not None else "cpu"
        if not self._channels_last_on and use_channels_last(self._runtime["channels_last"], self.net, device):
            self.net.to(memory_format=torch.channels_last)
            self._channels_last_on = True
        backend = compile_backend(self._runtime["compile"])
        if backend and not self._compiled:
            self.net.compile(backend=backend)
            self._compiled = True

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """Image batches follow the net into channels_last (a layout mismatch would copy in every conv)."""
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last_on and x.ndim == 4 else x

    # ------------------------------------------------------------------ hooks for subclasses
    @abc.abstractmethod
    def make_metrics(self) -> nn.Module:
        """The task's torchmetrics module (one instance per stage)."""

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ls = float(self.optim.get("label_smoothing", 0.0))
        return nn.functional.cross_entropy(logits, y, label_smoothing=ls, ignore_index=255)

    def unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x, y = batch
        return x, y, {}

    def update_metrics(self, metrics: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> None:
        metrics.update(logits, y)

    def compute_metrics(self, metrics: nn.Module) -> dict[str, torch.Tensor]:
        return dict(metrics.compute())

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.net(x, **kw)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-level augmentation of the training inputs and targets (mixup/cutmix in classification)."""
        return x, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, kw = self.unpack(batch)
        x, y = self.mix(self.to_memory_format(x), y)
        if capabilities(self.net).own_objective:
            logits, losses = self.net.forward_train(x, y, **kw)
        else:
            logits = self.net(x, **kw)
            losses = {"ce": self.criterion(logits, y)}
        loss = sum(losses.values())
        bs = y.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if len(losses) > 1:
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        return loss

    def eval_forward(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Logits for validation / test (segmentation overrides it with sliding-window inference)."""
        return self.net(x, **kw)

    def _eval_step(self, batch: Any, stage: str, batch_idx: int = 0) -> None:
        x, y, kw = self.unpack(batch)
        x = self.to_memory_format(x)
        logits = self.eval_forward(x, **kw)
        loss = self.criterion(logits, y)
        self._check_finite(stage, batch_idx, x, logits, loss)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=y.shape[0], sync_dist=True)
        self.update_metrics(self.metrics[stage], logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def _check_finite(self, stage: str, batch_idx: int, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None:
        """A NaN or inf input, output or loss in val/test stops the run naming the files: a metric over
        them would be computed on numbers that mean nothing (every DDP rank stops together)."""
        bad = not bool(torch.isfinite(loss).all())
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        rows = ~(torch.isfinite(x.flatten(1)).all(1) & torch.isfinite(logits.flatten(1)).all(1))
        names = self._batch_item_names(stage, batch_idx)
        odd = [n for n, r in zip(names, rows.tolist()) if r] or names  # no one row: the whole batch
        what = "inputs" if not bool(torch.isfinite(x).all()) else "outputs"
        raise NonFiniteError(
            f"{stage} loss is {float(loss)} at {stage} batch {batch_idx}: non-finite (NaN/inf) {what} for "
            f"{', '.join(odd[:8])}{' ...' if len(odd) > 8 else ''}. The {stage} metrics would be meaningless; "
            "fix or remove those files" + (" (or the checkpoint's weights are not finite)" if what == "outputs" else "")
        )

    def _batch_item_names(self, stage: str, batch_idx: int) -> list[str]:
        """The files (or indices) of this rank's ``batch_idx``-th batch of ``stage`` (unshuffled loaders)."""
        loader = self._stage_loader(stage)
        sampler = getattr(loader, "batch_sampler", None)
        indices = next(itertools.islice(iter(sampler), batch_idx, None), None) if sampler is not None else None
        if indices is None:
            return [f"{stage} batch {batch_idx}"]
        dataset = loader.dataset
        named = getattr(dataset, "item_names", None)
        return named(indices) if named is not None else [f"{stage} item {i}" for i in indices]

    def _stage_loader(self, stage: str):
        """The DataLoader of ``stage`` ('val' / 'test') the trainer runs now (None outside a trainer)."""
        trainer = getattr(self, "_trainer", None)
        loaders = getattr(trainer, f"{stage}_dataloaders", None) if trainer is not None else None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if len(loaders) == 1 else None
        return loaders

    figure_keys: tuple[str, ...] = ()  # computed metrics that are pictures' data, not numbers to log

    def test_figures(self) -> dict[str, tuple]:
        """``{figure: args}`` for :mod:`zoo.plots` (e.g. ``{"roc": (curves,)}``) from the last test epoch."""
        return {}

    def _log_epoch_metrics(self, stage: str) -> None:
        values = self.compute_metrics(self.metrics[stage])
        figures = {k: values.pop(k) for k in self.figure_keys if k in values}
        if stage == "test":  # kept for test_figures(): the metrics hold the whole split, no second pass
            self.test_figure_values = figures
        left_out = getattr(getattr(self._stage_loader(stage), "dataset", None), "left_out", None)
        if left_out is not None:  # data.bad_images=skip: unreadable items left out of this split's metrics
            values["skipped"] = torch.tensor(float(len(left_out)), device=self.device)
        # torchmetrics has synced these across DDP ranks already; sync_dist averages equal values (a no-op
        # that keeps Lightning from warning about unsynced epoch-level logs)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)
        self.metrics[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        o = self.optim
        groups = self.param_groups(float(o["weight_decay"]))
        name = o["name"].lower()
        lr = self._scaled_lr()
        if name == "adamw":
            clipping = self._trainer is not None and bool(self._trainer.gradient_clip_val)
            impl = optimizer_impl(self.net.parameters(), clipping=clipping)
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o["betas"]), **impl)
        elif name == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=o["momentum"], nesterov=bool(o.get("nesterov", True)),
                                  foreach=True)
        elif name in OPTIMIZERS:  # Adam (L2 weight decay), RAdam, Lookahead(RAdam): timm's factory
            from timm.optim import create_optimizer_v2

            opt = create_optimizer_v2(groups, opt=name, lr=lr, betas=tuple(o["betas"]))
        else:
            raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {o['name']!r}")
        self._log_optim_plan()
        if o.get("scheduler") not in (*SCHEDULERS, None):
            raise ValueError(f"optim.scheduler must be one of {', '.join(SCHEDULERS)}, got {o['scheduler']!r}")
        if o.get("scheduler", "cosine") in (None, "none"):
            return opt
        # optimizer steps (Lightning divides by accumulate_grad_batches), and the scheduler steps with the optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, total, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups: the net's, its ``no_weight_decay()`` names and 1-D parameters without
        decay (a task with parameters of its own, e.g. Re-ID's BNNeck and identity classifier, adds them)."""
        no_decay = no_weight_decay(self.net, self.task)
        return param_groups_weight_decay(self.net, weight_decay, no_weight_decay_list=no_decay)

    def _log_optim_plan(self) -> None:
        """One line at start: the optimizer settings, and the model's own defaults they fall back to."""
        if self._trainer is not None and not self._trainer.is_global_zero:
            return
        keys = OPTIM_KEYS if self.optim.get("scheduler") == "step" else tuple(
            k for k in OPTIM_KEYS if not k.startswith("lr_decay"))
        spec = self._spec
        name = spec.name if spec is not None else self.hparams["model"].get("name")
        own = ", ".join(f"{k}={_short(self.spec_defaults[k])}" for k in keys if k in self.spec_defaults)
        paper = spec.train_defaults if spec is not None else None
        log.info("optim: %s%s%s", ", ".join(f"{k}={_short(self.optim.get(k))}" for k in keys),
                 f" | {name}'s own defaults, for what the command line and the recipe leave unset: {own}" if own else "",
                 f"; its paper trains {paper.epochs} epochs (trainer.max_epochs sets this run's)" if paper and paper.epochs else "")

    def _scaled_lr(self) -> float:
        """``optim.lr``, scaled by the effective batch when ``optim.lr_base_batch`` is set; logged once."""
        o, trainer = self.optim, self._trainer
        dm = trainer.datamodule if trainer is not None else None
        batch = (dm.hparams.get("batch_size") if dm is not None else None) or 0
        world, accumulate = (trainer.world_size, trainer.accumulate_grad_batches) if trainer is not None else (1, 1)
        if batch and trainer.is_global_zero:
            log.info("%s", lr_plan_line(o["lr"], batch, world, accumulate, o.get("lr_base_batch")))
        if o.get("lr_base_batch") is None:
            return float(o["lr"])
        if not batch:
            raise ValueError("optim.lr_base_batch needs the datamodule's batch_size (fit with datamodule=...)")
        return scaled_lr(o["lr"], effective_batch(batch, world, accumulate), o["lr_base_batch"])


def _spec_of(net: nn.Module, model: dict) -> Any:
    """The spec of the task's net: the one ``create_model`` attached, else the registry's for ``model['name']``
    (None for a net from outside the registry)."""
    spec = spec_of(net)
    if spec is not None:
        return spec
    from ..errors import UnknownModelError
    from ..registry import get_spec

    try:
        return get_spec(str(model.get("name")))
    except UnknownModelError:
        return None


def _short(v: Any) -> str:
    return f"({', '.join(_short(x) for x in v)})" if isinstance(v, (list, tuple)) else f"{v:g}" if isinstance(
        v, float) else str(v)
