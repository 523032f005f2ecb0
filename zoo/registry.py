"""Name -> model spec. The one place that knows which models exist and what input they take.

Model files register their variants with ``@register_model(...)``; everything else asks this module.
Modelled on torchvision's ``models/_api.py`` (duplicates raise) and timm's ``create_model``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import DuplicateModelError, InputSizeError, ModelArgumentError, UnknownModelError, ZooError

TASKS = ("classification", "segmentation", "mil")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about a registered model, before building it."""

    name: str
    builder: Callable[..., nn.Module]
    task: str
    input_size: tuple[int, int, int] = (3, 224, 224)  # default (C, H, W); for MIL: () or instance size
    size_divisor: int = 1  # H and W must be multiples of this
    min_size: int = 1
    fixed_input_size: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    paper: str = ""
    source: str = ""  # where the implementation comes from, e.g. "timm:halonet26t"
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None  # official keys -> zoo keys
    meta: dict[str, Any] = field(default_factory=dict)  # reference numbers: params_m, gflops, top1 ...

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
                f"{self.name} takes exactly {fixed[0]}x{fixed[1]} inputs; got {h}x{w}. "
                f"Resize your images (data.img_size={fixed[0]})."
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


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    fn: Callable | None = None, *, name: str | None = None, task: str = "classification", **spec_kwargs: Any
):
    """Decorator: register ``fn(pretrained=False, **kwargs) -> nn.Module`` under ``name`` (default fn's name)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def wrap(builder: Callable) -> Callable:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise DuplicateModelError(f"model {key!r} is registered twice (first by {_REGISTRY[key].builder.__module__})")
        _REGISTRY[key] = ModelSpec(name=key, builder=builder, task=task, **spec_kwargs)
        return builder

    return wrap(fn) if fn is not None else wrap


def _ensure_models_imported() -> None:
    from . import models  # noqa: F401  (importing registers every architecture)


def get_spec(name: str) -> ModelSpec:
    _ensure_models_imported()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} `python -m zoo list` shows all {len(_REGISTRY)} models."
        )
    return _REGISTRY[name]


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    _ensure_models_imported()
    return sorted(n for n, s in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (task is None or s.task == task))


def _size_check_hook(spec: ModelSpec):
    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            spec.check_input_size(args[0].shape)

    return hook


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    pretrained_file: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    ``pretrained=True`` downloads the published weights (timm's hub for timm-backed models);
    ``pretrained_file`` loads a local timm, official or zoo weights file instead (safely:
    safetensors or ``torch.load(weights_only=True)``); a classifier whose class count differs is
    re-initialised.
    """
    spec = get_spec(name)
    if num_classes is not None:
        least = 0 if spec.task == "classification" else 1  # timm's num_classes=0: no classifier
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < least:
            raise ModelArgumentError(
                f"{name}: num_classes must be an int >= {least}"
                f"{' (0 = no classifier: features)' if least == 0 else ''}; got {num_classes!r}"
            )
        kwargs["num_classes"] = num_classes
    _check_common_kwargs(name, kwargs)
    try:
        model = spec.builder(pretrained=pretrained and not pretrained_file, **kwargs)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear error naming the model and its arguments
        raise _build_error(spec, kwargs, e) from e
    if pretrained_file:
        from .weights import load_pretrained_file

        load_pretrained_file(model, pretrained_file, spec.checkpoint_filter)
    if spec.fixed_input_size and isinstance(kwargs.get("img_size"), int):  # built for another fixed size
        s = kwargs["img_size"]
        spec = dataclasses.replace(spec, input_size=(*spec.input_size[:-2], s, s))
    model.zoo_spec = spec
    if spec.task != "mil" and (spec.size_divisor > 1 or spec.fixed_input_size or spec.min_size > 1):
        model.register_forward_pre_hook(_size_check_hook(spec))
    return model


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _rate(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


_COMMON_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "in_chans": (_positive_int, "a positive int"),
    "in_dim": (_positive_int, "a positive int"),
    "img_size": (lambda v: _positive_int(v) or (isinstance(v, (tuple, list)) and len(v) == 2
                                                 and all(_positive_int(x) for x in v)), "a positive int or (H, W)"),
    "drop_rate": (_rate, "a float in [0, 1)"),
    "drop_path_rate": (_rate, "a float in [0, 1)"),
    "attn_drop_rate": (_rate, "a float in [0, 1)"),
}


def _check_common_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Arguments many models share, checked before anything is built (their errors come from deep inside torch)."""
    for key, (ok, what) in _COMMON_KWARGS.items():
        if key in kwargs and kwargs[key] is not None and not ok(kwargs[key]):
            raise ModelArgumentError(f"{name}: {key} must be {what}; got {kwargs[key]!r}")


def constructor_kwargs(name: str) -> list[str]:
    """The keyword arguments a model takes: its builder's and its class's (built once on the meta device)."""
    spec = get_spec(name)
    names = {n for n, p in inspect.signature(spec.builder).parameters.items()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        with torch.device("meta"):
            model = spec.builder(pretrained=False)
        names |= {n for n, p in inspect.signature(type(model).__init__).parameters.items()
                  if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"}
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta: the builder's names only
        pass
    return sorted(names - {"pretrained"})


def _build_error(spec: ModelSpec, kwargs: dict[str, Any], error: Exception) -> ModelArgumentError:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
    why = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    valid = constructor_kwargs(spec.name)
    unknown = sorted(k for k in kwargs if valid and k not in valid)
    hint = f" Unknown argument(s) {unknown}." if unknown else ""
    return ModelArgumentError(
        f"cannot build {spec.name} with {args} ({why}).{hint} "
        f"{spec.name} takes: {', '.join(valid) if valid else 'see its docstring'}."
    )


_PARAMS_CACHE: dict[str, float] = {}


def count_params_m(name: str, **kwargs: Any) -> float:
    """Parameter count in millions of the default variant, built on the meta device (no memory, fast)."""
    key = name + repr(sorted(kwargs.items()))
    if key not in _PARAMS_CACHE:
        with torch.device("meta"):
            model = get_spec(name).builder(pretrained=False, **kwargs)
        _PARAMS_CACHE[key] = sum(p.numel() for p in model.parameters()) / 1e6
    return _PARAMS_CACHE[key]


def model_info(name: str) -> dict[str, Any]:
    """A plain dict describing a model: task, input rules, normalisation, paper, parameter count."""
    spec = get_spec(name)
    return {
        "name": spec.name,
        "task": spec.task,
        "params_m": round(count_params_m(name), 3),
        "input_size": list(spec.input_size),
        "size_divisor": spec.size_divisor,
        "min_size": spec.min_size,
        "fixed_input_size": spec.fixed_input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "paper": spec.paper,
        "source": spec.source,
        **{f"ref_{k}": v for k, v in spec.meta.items()},
    }
