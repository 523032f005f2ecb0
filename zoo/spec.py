"""The typed spec of a registered model, and the resolved input of a run.

One :class:`ModelSpec` per registered name is the single owner of what a model is: its task, its
input rules, the preprocessing its weights were trained with, where those weights come from, the
paper's numbers and the licence. The registry, ``zoo list/info/table``, the data pipeline,
checkpoints, ``evaluate.py``, ``explain`` and ``export`` read it; a built classification net carries
it as timm's ``pretrained_cfg`` (:meth:`ModelSpec.pretrained_cfg`).

:class:`RunInput` is what one run feeds its net (size, channels, mean/std, interpolation, crop,
class names): resolved once (:func:`resolve_run_input`: user override > data config > model spec),
given to the datamodule and the net, stored in the checkpoint and restored from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import InputSizeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
TASKS = ("classification", "segmentation", "mil")


@dataclass(frozen=True)
class Weights:
    """Where trained weights for a model come from. ``pretrained=True`` works when one of ``timm``,
    ``backbone`` or ``url`` is set; ``official_file`` names a release a user loads with
    ``pretrained_file=``; ``note`` is what a user reads in the model table."""

    timm: str = ""  # timm ``arch.tag`` whose weights initialise the whole net
    backbone: str = ""  # timm ``arch.tag`` whose weights initialise the backbone only
    url: str = ""  # an official release that ``pretrained=True`` downloads
    official_file: str = ""  # an official file for ``pretrained_file=`` (not downloadable by the zoo)
    note: str = ""

    @property
    def downloadable(self) -> bool:
        return bool(self.timm or self.backbone or self.url)

    def describe(self) -> str:
        parts = []
        if self.timm:
            parts.append(f"timm `{self.timm}` (`pretrained=true`)")
        if self.backbone:
            parts.append(f"timm `{self.backbone}` backbone (`pretrained=true`)")
        if self.url:
            parts.append("official release (`pretrained=true`)")
        if self.official_file:
            parts.append(f"official {self.official_file} (`pretrained_file=`)")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class Metric:
    """One number the paper reports: ``top1`` 81.4 on ``imagenet-1k`` at 224 px."""

    name: str
    value: float
    dataset: str
    resolution: int | None = None

    def describe(self) -> str:
        at = f"@{self.resolution}" if self.resolution else ""
        return f"{self.dataset}{at} {self.name} {self.value}"


@dataclass(frozen=True)
class Reference:
    """The paper's own numbers for this variant (``gflops``: multiply-adds, as papers report FLOPs)."""

    params_m: float | None = None
    gflops: float | None = None
    metrics: tuple[Metric, ...] = ()
    note: str = ""

    def describe(self) -> str:
        parts = [f"{self.params_m}M"] if self.params_m is not None else []
        parts += [f"{self.gflops} GFLOPs"] if self.gflops is not None else []
        parts += [m.describe() for m in self.metrics]
        return "; ".join(parts) or "-"


OPTIM_KEYS = ("name", "lr", "weight_decay", "betas", "scheduler", "warmup_epochs", "min_lr_ratio", "label_smoothing",
              "lr_decay_at", "lr_decay_rate")


@dataclass(frozen=True)
class TrainDefaults:
    """A model's own training recipe (its paper's or official code's), for the ``optim`` keys a run leaves unset.

    Precedence of every ``optim`` key: the command line > the experiment recipe > these > the task's defaults
    > ``configs/optim/adamw.yaml`` (``optim=sgd`` picks SGD's own file and leaves these out). ``epochs`` is the
    paper's run length, shown at the start of a run; the run's own length stays ``trainer.max_epochs``.
    """

    name: str | None = None  # optimizer: adamw, adam, sgd, radam, lookahead_radam
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    scheduler: str | None = None  # "cosine" (per step, after warmup), "step" or "none"
    warmup_epochs: float | None = None
    min_lr_ratio: float | None = None
    label_smoothing: float | None = None
    lr_decay_at: tuple[float, ...] | None = None  # "step": the fractions of the run where the lr drops
    lr_decay_rate: float | None = None  # "step": the factor of each drop
    epochs: int | None = None
    source: str = ""  # where the numbers come from

    def optim(self) -> dict[str, Any]:
        """The ``optim`` keys these defaults set (tuples as lists, as a config holds them)."""
        values = {k: getattr(self, k) for k in OPTIM_KEYS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.optim().items()]
        parts += [f"{self.epochs} epochs"] if self.epochs else []
        return ", ".join(parts) + (f" ({self.source})" if self.source else "")


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about a registered model, before building it."""

    name: str
    builder: Callable[..., nn.Module]
    task: str
    # ---- input rules
    input_size: tuple[int, ...] = (3, 224, 224)  # default (C, H, W); MIL: the instance size or ()
    size_divisor: int = 1  # H and W must be multiples of this
    min_size: int = 1
    fixed_input_size: bool = False  # the net is built for one size (``img_size=`` builds another)
    # ---- preprocessing: the one the weights were trained with
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # ---- weights, paper, origin
    weights: Weights = field(default_factory=Weights)
    reference: Reference = field(default_factory=Reference)
    paper: str = ""
    paper_ids: tuple[str, ...] = ()  # e.g. ("arXiv:2303.08810",)
    license: str = "apache-2.0"  # of the weights / the code the zoo follows
    source: str = ""  # where the implementation comes from
    first_conv: str = ""  # timm's pretrained_cfg names (the modules exist on the built net)
    classifier: str | tuple[str, ...] = "head"
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None  # official keys -> zoo keys
    train_defaults: TrainDefaults | None = None  # the paper's optimizer settings (see TrainDefaults)

    # ------------------------------------------------------------------ input sizes
    def valid_sizes(self, around: int | None = None, count: int = 3) -> list[int]:
        """A few legal side lengths near ``around`` (default: the spec's own size)."""
        if self.fixed_input_size:
            return [self.input_size[-1]]
        d = self.size_divisor
        start = max(self.min_size, around or self.input_size[-1])
        lo = max(d, (start // d) * d)
        lo = max(lo, ((self.min_size + d - 1) // d) * d)
        return [lo + i * d for i in range(count)]

    def check_input_size(self, size: int | tuple[int, int] | torch.Size) -> None:
        """Raise :class:`InputSizeError` naming legal sizes unless ``size`` (H, W) fits this model."""
        if self.task == "mil":
            return
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        fixed = self.input_size[-2:]
        if self.fixed_input_size and (h, w) != tuple(fixed):
            raise InputSizeError(
                f"{self.name} was built for exactly {fixed[0]}x{fixed[1]} inputs; got {h}x{w}. Resize your "
                f"images, or build it for your size (img_size={h}; in train.py data.img_size={h})."
            )
        bad = [s for s in (h, w) if s % self.size_divisor or s < self.min_size]
        if bad:
            sizes = ", ".join(str(s) for s in self.valid_sizes(around=max(h, w)))
            rule = f"multiples of {self.size_divisor}" if self.size_divisor > 1 else "sides"
            rule += f" of at least {self.min_size}" if self.min_size > 1 else ""
            raise InputSizeError(
                f"{self.name} needs input height and width that are {rule} "
                f"(for example {sizes}); got {h}x{w}. Resize or crop to a legal size, "
                f"e.g. data.img_size={self.valid_sizes(around=max(h, w), count=1)[0]}."
            )

    def min_input_side(self) -> int:
        d = self.size_divisor
        return max(d, ((self.min_size + d - 1) // d) * d)

    def built_for(self, img_size: int | None = None, in_chans: int | None = None) -> "ModelSpec":
        """This spec as a net built with ``img_size`` / ``in_chans`` sees it (its default input moves)."""
        if self.task == "mil" or not self.input_size:
            return self
        c, h, w = self.input_size
        if img_size is not None:
            h = w = int(img_size)
        if in_chans is not None and in_chans != c:
            return dataclasses.replace(self, input_size=(in_chans, h, w), mean=_stats_for(self.mean, in_chans),
                                       std=_stats_for(self.std, in_chans))
        return dataclasses.replace(self, input_size=(c, h, w))

    # ------------------------------------------------------------------ timm interop
    def pretrained_cfg(self, num_classes: int | None = None) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` for this spec (the keys ``timm.data.resolve_data_config`` reads)."""
        side = self.min_input_side()
        tag = self.weights.timm.split(".", 1)[1] if "." in self.weights.timm else ""
        return {
            "architecture": self.name,
            "tag": tag,
            "hf_hub_id": f"timm/{self.weights.timm}" if self.weights.timm else None,
            "url": self.weights.url or None,
            "input_size": tuple(self.input_size),
            "fixed_input_size": self.fixed_input_size,
            "min_input_size": (self.input_size[0], side, side) if self.input_size else None,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "num_classes": num_classes,
            "first_conv": self.first_conv,
            "classifier": self.classifier,
            "license": self.license,
            "paper_ids": ", ".join(self.paper_ids),
            "paper_name": self.paper,
            "origin_url": self.source,
        }


# ---------------------------------------------------------------------------------------- run input
@dataclass(frozen=True)
class RunInput:
    """What one run feeds its net; stored in checkpoints as ``data_info`` (see :meth:`as_dict`)."""

    img_size: int | None
    in_chans: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    KEYS = ("img_size", "in_chans", "mean", "std", "interpolation", "crop_pct")

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def resolve_run_input(spec: ModelSpec, given: dict[str, Any], dataset_defaults: dict[str, Any] | None = None,
                      stored: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> RunInput:
    """One run's input: ``given`` (the user's / data config's explicit values) > ``stored`` (a checkpoint's)
    > the model ``spec`` > ``dataset_defaults`` (for what a spec leaves open, e.g. MIL bags).

    A given value that differs from a stored one is an override, reported through ``log``."""
    stored = {k: v for k, v in (stored or {}).items() if v is not None}
    defaults = dataset_defaults or {}
    has_image = spec.task != "mil" or bool(spec.input_size)
    from_spec = dict(img_size=spec.input_size[-1] if has_image and spec.input_size else None,
                     in_chans=spec.input_size[0] if has_image and spec.input_size else None,
                     mean=spec.mean, std=spec.std, interpolation=spec.interpolation, crop_pct=spec.crop_pct)
    if spec.task == "mil":  # the bag's instance statistics are the data's, not the attention head's
        from_spec = {k: v for k, v in from_spec.items() if k in ("interpolation", "crop_pct")}
    out: dict[str, Any] = {}
    for key in RunInput.KEYS:
        g = given.get(key)
        if g is not None:
            if key in stored and _differs(stored[key], g) and log is not None:
                log(f"override: data.{key}={g!r} replaces the checkpoint's {key}={stored[key]!r}")
            out[key] = g
        elif key in stored:
            out[key] = stored[key]
        elif from_spec.get(key) is not None:
            out[key] = from_spec[key]
        else:
            out[key] = defaults.get(key)
    chans = out["in_chans"]
    for key in ("mean", "std"):
        if out[key] is not None:
            out[key] = fit_channels(out[key], chans or len(tuple(out[key])))
    if out["img_size"] is not None:
        out["img_size"] = int(out["img_size"])
    return RunInput(**{k: out[k] for k in ("img_size", "in_chans", "mean", "std")},
                    interpolation=out["interpolation"] or "bicubic",
                    crop_pct=float(out["crop_pct"] if out["crop_pct"] is not None else 0.875))


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(abs(float(x) - float(y)) > 1e-9 for x, y in zip(a, b))
    return a != b


def _stats_for(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """A spec's statistics for a net built with another channel count: fitted where they fit (RGB -> grey),
    else their mean on every channel (a 2- or 4-channel net has no published statistics)."""
    try:
        return fit_channels(values, channels)
    except ValueError:
        return (sum(values) / len(values),) * channels


def fit_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Adapt per-channel stats to the channel count (RGB stats -> grey by averaging)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"cannot use {len(values)} per-channel values for {channels} channels")


def stored_input(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored run input (its ``data_info`` + the channel count its net was built with)."""
    info = dict(hparams.get("data_info") or {})
    model = hparams.get("model") if isinstance(hparams.get("model"), dict) else {}
    kwargs = dict(model.get("kwargs") or {})
    if info.get("in_chans") is None and kwargs.get("in_chans") is not None:  # checkpoints before in_chans was stored
        info["in_chans"] = kwargs["in_chans"]
    return {k: info.get(k) for k in RunInput.KEYS if info.get(k) is not None}


def example_input(spec: ModelSpec, run_input: RunInput | dict | None = None, *, batch_size: int = 1,
                  img_size: int | None = None, bag_size: int = 8, in_dim: int | None = None,
                  bag_images: bool = False) -> torch.Tensor:
    """A random input the net built from ``spec`` (for ``run_input``) accepts: ``[B, C, H, W]``; MIL: a
    feature bag ``[B, N, in_dim]``, or with ``bag_images`` an image bag ``[B, N, C, H, W]``."""
    given = run_input.as_dict() if isinstance(run_input, RunInput) else dict(run_input or {})
    default_c, default_side = (spec.input_size[0], spec.input_size[-1]) if spec.input_size else (3, 32)
    side = int(img_size or given.get("img_size") or default_side)
    chans = int(given.get("in_chans") or default_c)
    if spec.task == "mil" and (not bag_images or len(spec.input_size) != 3):
        return torch.randn(batch_size, bag_size, int(in_dim or 64))
    if spec.task == "mil":
        return torch.randn(batch_size, bag_size, chans, side, side)
    return torch.randn(batch_size, chans, side, side)
