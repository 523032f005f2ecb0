"""Check a run's config before anything is built or loaded: every key must exist and every value
must have the right type, else a :class:`ConfigError` naming the key and the valid choices.

Works on plain dicts (``OmegaConf.to_container``); ``train.py``/``evaluate.py`` call
:func:`check_run_config` first thing.
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any, Callable

from .errors import ZooError


class ConfigError(ZooError, ValueError):
    pass


MODEL_KEYS = {"name": str, "kwargs": dict, "pretrained": bool, "pretrained_file": (str, type(None)),
              "freeze_backbone": bool, "grad_checkpointing": bool, "channels_last": (bool, str)}
# a model config's values unless configs/model/NAME.yaml says otherwise (zoo.config_store stores them)
MODEL_DEFAULTS = {"pretrained": False, "pretrained_file": None, "freeze_backbone": False, "kwargs": {},
                  "grad_checkpointing": False, "channels_last": "auto"}


def _import(target: str) -> Any:
    import importlib

    module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"_target_ {target!r} cannot be imported ({e})") from None


def _hints(fn: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """``fn``'s keyword parameters and type hints; a class whose ``__init__`` passes ``**kwargs`` on to its
    base (the datamodules' shared options) gets the base's parameters too."""
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL,)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    params = {n: p for n, p in params.items() if p.kind != p.VAR_KEYWORD}
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: check names only
        hints = {}
    if var_kw and isinstance(fn, type):
        base = next((b for b in fn.__mro__[1:] if "__init__" in vars(b) and b is not object), None)
        if base is not None and base.__module__.startswith("zoo."):
            base_params, base_hints, var_kw = _hints(base)
            params, hints = {**base_params, **params}, {**base_hints, **hints}
    return params, hints, var_kw


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a config value (plain python from YAML) fits annotation ``tp``; unknown types pass."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    base = origin or tp
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if base in (list, tuple, typing.Sequence) or (isinstance(base, type) and base.__name__ == "Sequence"):
        return isinstance(value, (list, tuple))
    if base in (dict, typing.Mapping):
        return isinstance(value, dict)
    return True  # paths, callables, objects: left to the constructor


def _type_name(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _unknown(section: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {section}.{key}.{hint} Valid keys of {section}: {', '.join(sorted(valid))}")


def check_kwargs(section: str, fn: Callable, values: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Every key of ``values`` is a parameter of ``fn`` with a value of its annotated type."""
    params, hints, var_kw = _hints(fn)
    for key, value in values.items():
        if key in skip or key.startswith("_"):
            continue
        if key not in params:
            if var_kw:
                continue
            raise _unknown(section, key, list(params))
        tp = hints.get(key, params[key].annotation)
        if not _accepts(tp, value):
            raise ConfigError(f"{section}.{key}={value!r} has the wrong type ({type(value).__name__}); "
                              f"{section}.{key} takes {_type_name(tp)}")


def check_choice(section: str, key: str, value: Any, choices: list | tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


# values every run needs that a config leaves as ``???``: what to give on the command line
MANDATORY_HINTS = {
    "data.root": "data.root=/path/to/the/dataset (the folder the data config's layout describes)",
    "data.num_classes": "data.num_classes=N (the number of classes; mask values 0..N-1, 255 = ignore)",
    "data.labels": "data.labels=labels.csv (the bag_id,label[,split] CSV; relative paths are under data.root)",
    "ckpt_path": "ckpt_path=PATH/checkpoints/best-....ckpt (a checkpoint of a train run)",
}
MISSING = "???"


def check_mandatory(missing) -> None:
    """``missing``: dotted keys without a value (OmegaConf's ``???``) -> one :class:`ConfigError` naming them all
    and what to set, instead of a ``MissingMandatoryValue`` traceback or a type error about the string ``???``."""
    missing = sorted(missing)
    if missing:
        todo = "; ".join(MANDATORY_HINTS.get(k, f"{k}=VALUE") for k in missing)
        raise ConfigError(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no value (??? in the "
                          f"config); give it on the command line: {todo}")


def missing_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of an OmegaConf config whose value is ``???``, found without resolving interpolations
    (``${hydra:...}`` needs a running Hydra app)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    out = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node)) if isinstance(node, ListConfig) else []
    for key in keys:
        if OmegaConf.is_missing(node, key):
            out.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key):
            out += missing_keys(node[key], f"{prefix}{key}.")
    return out


def _missing_in(section: str, values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _missing_in(f"{section}.{key}", value)
        elif isinstance(value, str) and value == MISSING:
            out.append(f"{section}.{key}")
    return out


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), f">= {low}"


FRACTION = (lambda v: 0 <= v < 1), "in [0, 1)"
# (section, key) -> (test, what the value must be); None and non-numbers are left to the type check
RANGES: dict[tuple[str, str], tuple[Callable[[float], bool], str]] = {
    ("data", "batch_size"): _at_least(1),
    ("data", "num_workers"): _at_least(0),
    ("data", "val_fraction"): FRACTION,
    ("data", "test_fraction"): FRACTION,
    ("trainer", "max_epochs"): ((lambda v: v >= 1 or v == -1), ">= 1, or -1 for no limit"),
    ("optim", "lr"): ((lambda v: v > 0), "> 0"),
    ("optim", "weight_decay"): _at_least(0),
    ("optim", "warmup_epochs"): _at_least(0),
    ("optim", "warmup_lr_ratio"): _at_least(0),
    ("optim", "min_lr_ratio"): _at_least(0),
    ("optim", "label_smoothing"): FRACTION,
    ("optim", "lr_decay_rate"): ((lambda v: 0 < v <= 1), "in (0, 1]"),
    ("optim", "accumulate"): _at_least(1),
    ("optim", "lr_base_batch"): _at_least(1),
}
INT_KEYS = {("optim", "accumulate"), ("optim", "lr_base_batch")}  # counts: 1.5 batches mean nothing


def check_ranges(section: str, values: dict[str, Any]) -> None:
    """Numbers of ``section`` within :data:`RANGES`, else a :class:`ConfigError` naming the key and its range."""
    for key, value in values.items():
        rule = RANGES.get((section, key))
        if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok, want = rule
        if (section, key) in INT_KEYS and not isinstance(value, int):
            raise ConfigError(f"{section}.{key}={value!r} has the wrong type ({type(value).__name__}); it takes an int")
        if not ok(value):
            raise ConfigError(f"{section}.{key}={value!r} is out of range; {section}.{key} must be {want}")
    if section == "data":
        fractions = [values.get(k) for k in ("val_fraction", "test_fraction")]
        if all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions) and sum(fractions) >= 1:
            raise ConfigError(f"data.val_fraction={fractions[0]!r} and data.test_fraction={fractions[1]!r} "
                              "leave nothing to train on; together they must be < 1")


def check_run_config(cfg: dict[str, Any], *, training: bool = True) -> None:
    """Validate the sections of a composed train/evaluate config (a plain dict): values present, known keys,
    types, ranges."""
    import lightning as L

    from .data.common import ZooDataModule
    from .registry import get_spec
    from .scale import CHANNELS_LAST, compile_backend

    check_mandatory([k for section, values in cfg.items() if isinstance(values, dict)
                     for k in _missing_in(section, values)])
    data = dict(cfg.get("data") or {})
    target = data.get("_target_")
    if not target:
        raise ConfigError("data has no _target_; pick a data config: data=digits, data=imagefolder, ...")
    dm_cls = _import(target)
    check_kwargs("data", dm_cls, data)  # the class: its __init__ and the base options it passes on
    check_ranges("data", data)
    if isinstance(dm_cls, type) and issubclass(dm_cls, ZooDataModule) and dm_cls.DATASETS and "dataset" in data:
        check_choice("data", "dataset", data["dataset"], sorted(dm_cls.DATASETS))

    model = dict(cfg.get("model") or {})
    for key, value in model.items():
        if key not in MODEL_KEYS:
            raise _unknown("model", key, list(MODEL_KEYS))
        if not isinstance(value, MODEL_KEYS[key]) and not (key == "kwargs" and value is None):
            raise ConfigError(f"model.{key}={value!r} has the wrong type ({type(value).__name__})")
    if "name" in model:
        get_spec(model["name"])  # UnknownModelError with close matches
    if "channels_last" in model:
        check_choice("model", "channels_last", model["channels_last"], CHANNELS_LAST)

    trainer = dict(cfg.get("trainer") or {})
    check_kwargs("trainer", L.Trainer.__init__, trainer,
                 skip=("callbacks", "logger", "plugins", "default_root_dir", "compile"))
    compile_backend(trainer.get("compile"))  # the zoo's key: false, true or a backend name
    check_ranges("trainer", trainer)

    if training and cfg.get("optim") is not None:
        from .tasks.base import DEFAULT_OPTIM, OPTIMIZERS, SCHEDULERS

        for key, value in dict(cfg["optim"]).items():
            if key not in DEFAULT_OPTIM and key != "nesterov":
                raise _unknown("optim", key, [*DEFAULT_OPTIM, "nesterov"])
            default = DEFAULT_OPTIM.get(key)
            if key == "name":
                check_choice("optim", "name", str(value).lower(), OPTIMIZERS)
            elif key == "scheduler":
                check_choice("optim", "scheduler", "none" if value is None else value, SCHEDULERS)
            elif key == "lr_decay_at" and (isinstance(value, (str, bytes)) or not all(
                    isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1 for f in value)):
                raise ConfigError(f"optim.lr_decay_at={value!r} is not valid; it takes a list of fractions of the run "
                                  "in [0, 1] (e.g. [0.5]: the lr drops at half of trainer.max_epochs)")
            elif key == "lr_base_batch" and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"optim.lr_base_batch={value!r} has the wrong type; it takes null or an int "
                                  "(the batch optim.lr is given for)")
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"optim.{key}={value!r} has the wrong type ({type(value).__name__}); "
                                      "it takes a number")
        check_ranges("optim", dict(cfg["optim"]))


def resolve_model_name(name: str) -> str:
    """A model name given on the zoo's command line: a registered zoo name is the zoo's model; a name only
    timm has (``resnet18``, ``resnet18.a1_in1k``, ``hf-hub:...``) means ``timm:NAME``; ``timm:NAME`` is
    returned as given. A name neither knows: one :class:`~zoo.errors.UnknownModelError` with the close
    names of both. (Zoo names never shadow timm's in timm's own registry: :mod:`zoo.timm_interop`.)"""
    from .backbones import is_timm_model
    from .errors import UnknownModelError
    from .registry import list_models

    if name.startswith("timm:"):
        return name
    zoo_names = list_models()
    if name in zoo_names:
        return name
    if is_timm_model(name):
        return f"timm:{name}"
    import timm

    known = list(dict.fromkeys(zoo_names + timm.list_models()))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}: neither a zoo model nor a timm model.{hint} "
                            "`python -m zoo list` shows the zoo's models, `timm.list_models()` timm's.")
