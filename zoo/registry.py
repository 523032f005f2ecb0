"""Name -> model spec. The one place that knows which models exist and what input they take.

Model files register their variants with ``@register_model(...)`` (the keywords are
:class:`zoo.spec.ModelSpec`'s fields); everything else asks this module. Modelled on torchvision's
``models/_api.py`` (duplicates raise) and timm's ``create_model``. After the models are imported the
classification models are also registered in timm's registry (:mod:`zoo.timm_interop`).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable

import torch
from torch import nn

from .errors import DuplicateModelError, InputSizeError, ModelArgumentError, UnknownModelError, WeightsError, ZooError
from .spec import IMAGENET_MEAN, IMAGENET_STD, TASKS, Metric, ModelSpec, Reference, Weights  # noqa: F401

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


_IMPORTED = False


def _ensure_models_imported() -> None:
    global _IMPORTED
    if _IMPORTED:
        return
    _IMPORTED = True
    from . import models  # noqa: F401  (importing registers every architecture)
    from .timm_interop import register_in_timm

    register_in_timm(s for s in _REGISTRY.values() if s.task == "classification")


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


def _input_check_hook(spec: ModelSpec):
    """Before the forward pass: a batch ``[B, C, H, W]`` with the net's channel count and a legal size,
    or an error naming the expected shape (not a conv's or a reshape's message from deep inside)."""
    chans, sized = spec.input_size[0], spec.size_divisor > 1 or spec.fixed_input_size or spec.min_size > 1

    def hook(module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        shape = tuple(args[0].shape)
        if len(shape) != 4:
            fix = " (one image: x.unsqueeze(0))" if len(shape) == 3 else ""
            raise InputSizeError(f"{spec.name} takes a batch of images [B, {chans}, H, W]; got a {len(shape)}-d "
                                 f"tensor of shape {list(shape)}{fix}")
        if shape[1] != chans:
            raise InputSizeError(f"{spec.name} was built for {chans}-channel images [B, {chans}, H, W]; got "
                                 f"{list(shape)}. Convert the images, or build it with in_chans={shape[1]}.")
        if sized:
            spec.check_input_size(shape)

    return hook


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    pretrained_file: str | None = None,
    features_only: bool = False,
    out_indices: int | tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    ``pretrained=True`` downloads the published weights the spec names (timm's hub for timm-backed
    models); a model without any is refused here, with the same message for every model.
    ``pretrained_file`` loads a local timm, official or zoo weights file instead (safely: safetensors or
    ``torch.load(weights_only=True)``); a classifier whose class count differs is re-initialised and
    position embeddings are resized to the net's grid. ``img_size=`` builds a fixed-size net for another
    size; ``in_chans=`` for another channel count. ``features_only=True`` returns timm's
    ``FeatureGetterNet`` over the net's ``forward_intermediates`` (maps at ``out_indices``, with
    ``feature_info``). The net carries its spec (``zoo_spec``) and, for classification, timm's
    ``pretrained_cfg`` / ``default_cfg``. ``local-dir:DIR`` / ``hf-hub:ORG/NAME`` build a saved net
    with its weights, classes and preprocessing (:mod:`zoo.hub`).
    """
    if isinstance(name, str) and name.startswith(("local-dir:", "hf-hub:")):
        from .hub import create_from_hub

        return create_from_hub(name, pretrained, num_classes, pretrained_file, features_only, out_indices, **kwargs)
    spec = get_spec(name)
    if num_classes is not None:
        least = 0 if spec.task == "classification" else 1  # timm's num_classes=0: no classifier
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < least:
            raise ModelArgumentError(
                f"{name}: num_classes must be an int >= {least}"
                f"{' (0 = no classifier: features)' if least == 0 else ''}; got {num_classes!r}"
            )
        kwargs["num_classes"] = num_classes
    if out_indices is not None and not features_only:  # a segmenter's own levels of its backbone
        kwargs["out_indices"] = out_indices
    _check_common_kwargs(name, kwargs)
    download = bool(pretrained) and not pretrained_file
    if download and not spec.weights.downloadable:
        raise WeightsError(no_weights_message(spec))
    try:
        model = spec.builder(pretrained=download, **kwargs)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear error naming the model and its arguments
        raise _build_error(spec, kwargs, e) from e
    if pretrained_file:
        from .weights import load_pretrained_file

        load_pretrained_file(model, pretrained_file, spec.checkpoint_filter)
    size = kwargs.get("img_size")
    built = spec.built_for(img_size=size if spec.fixed_input_size and isinstance(size, int) else None,
                           in_chans=kwargs.get("in_chans"))
    model.zoo_spec = built
    if spec.task == "classification":
        model.pretrained_cfg = built.pretrained_cfg(num_classes=model.num_classes)
        model.default_cfg = model.pretrained_cfg
    if spec.task != "mil":
        model.register_forward_pre_hook(_input_check_hook(built))
    if features_only:
        return feature_extractor(model, built, out_indices)
    return model


def no_weights_message(spec: ModelSpec) -> str:
    note = f" ({spec.weights.note})" if spec.weights.note else ""
    file = f"; load the official {spec.weights.official_file} with pretrained_file=PATH" if spec.weights.official_file else ""
    return (f"{spec.name} has no weights the zoo can download{note}. Train it (the README's model table names "
            f"its recipes), start from a zoo checkpoint (init_from=CKPT), or load a file (pretrained_file=PATH){file}.")


def default_out_indices(num_levels: int) -> tuple[int, ...]:
    """timm's defaults: every level of a pyramid (up to 5), the last three blocks of a plain ViT."""
    return tuple(range(num_levels)) if num_levels <= 5 else tuple(range(num_levels - 3, num_levels))


def feature_extractor(model: nn.Module, spec: ModelSpec, out_indices: int | tuple[int, ...] | None) -> nn.Module:
    """``features_only=True``: timm's ``FeatureGetterNet`` over the net's ``forward_intermediates``."""
    from timm.models._features import FeatureGetterNet

    from .contract import ZooModel

    if spec.task != "classification":
        raise ModelArgumentError(f"{spec.name}: features_only=True is for classification backbones; "
                                 f"{spec.name} is a {spec.task} model")
    why = model.features_unsupported if isinstance(model, ZooModel) else None
    if why:
        raise ModelArgumentError(f"{spec.name} cannot be built with features_only=True: {why}")
    info = model.feature_info  # part of the classification contract (empty: no spatial features)
    if not info:
        raise ModelArgumentError(f"{spec.name} has no spatial features (empty feature_info); features_only=True needs them")
    indices = default_out_indices(len(info)) if out_indices is None else out_indices
    if isinstance(indices, (list, tuple)):
        indices = tuple(int(i) for i in indices)
    extractor = FeatureGetterNet(model, out_indices=indices)
    extractor.zoo_spec = spec
    extractor.pretrained_cfg = extractor.default_cfg = model.pretrained_cfg
    return extractor


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
    """A plain dict describing a model: task, input rules, preprocessing, weights, paper, parameter count."""
    spec = get_spec(name)
    ref = spec.reference
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
        "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct,
        "weights": spec.weights.describe(),
        "pretrained": spec.weights.downloadable,
        "paper": spec.paper,
        "paper_ids": list(spec.paper_ids),
        "license": spec.license,
        "source": spec.source,
        "ref_params_m": ref.params_m,
        "ref_gflops": ref.gflops,
        "ref_metrics": [m.describe() for m in ref.metrics],
        "ref_note": ref.note,
        "train_defaults": spec.train_defaults.describe() if spec.train_defaults else None,
    }
