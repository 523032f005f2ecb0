"""The Hydra ``model`` config group, filled from the registry: ``model=NAME`` works for every registered name.

:func:`register_model_configs` stores one node per registered model in Hydra's ConfigStore (group
``model``, the zoo name as config name)::

    {name: NAME, pretrained: false, pretrained_file: null, freeze_backbone: false, kwargs: {}}

so a model file's ``@register_model`` is all a new model needs. A model whose defaults really differ
(timm backbone weights on by default, a recipe's drop-path rate) keeps a complete file
``configs/model/NAME.yaml`` with the same five keys; Hydra reads that file, and no node is stored for
that name (a file and a stored node of one name would be merged by Hydra's deprecated "automatic schema
matching"). Constructor arguments a node does not list are added with ``+model.kwargs.KEY=VALUE``
(``++`` sets one whether or not it is listed).

``train.py`` calls :func:`register_model_configs` when it is imported (``evaluate.py`` imports it), before
``@hydra.main``; code composing the configs itself (``hydra.compose``) calls it first. This module imports
Hydra; ``import zoo`` does not import this module.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

from .validate import MODEL_DEFAULTS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def model_files(config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """The models with their own ``configs/model/NAME.yaml`` (their defaults differ from the stored node)."""
    return sorted(p.stem for p in (Path(config_dir) / "model").glob("*.yaml"))


def model_node(name: str) -> dict:
    """The config of a model whose defaults are the registry's: no weights, nothing frozen, no kwargs."""
    return {"name": name, **copy.deepcopy(MODEL_DEFAULTS)}


def register_model_configs(config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """Store ``model/NAME`` in Hydra's ConfigStore for every registered name without a YAML file in
    ``config_dir/model``; returns the names stored. Calling it again stores models registered since."""
    from hydra.core.config_store import ConfigStore

    from .registry import list_models
    from .sweep import register_sweep_resolver

    register_sweep_resolver()  # configs/train.yaml's hydra.sweep.subdir, resolved before any job runs
    register_train_default_resolver()  # configs/optim/adamw.yaml: the model's own training defaults
    files = set(model_files(config_dir))
    store = ConfigStore.instance()
    names = [n for n in list_models() if n not in files]
    for name in names:
        store.store(group="model", name=name, node=model_node(name),
                    provider="zoo.registry")
    return names


def train_default(model: str, key: str, fallback, optimizer: str | None = None):
    """``${zoo_train_default:MODEL,KEY,FALLBACK[,OPTIMIZER]}``: the optim ``KEY`` of MODEL's training defaults
    (its spec's ``train_defaults`` over its task's, :meth:`zoo.tasks.base.ZooTask.defaults_for`), else FALLBACK.
    A value set on the command line or in a recipe replaces the interpolation, so it wins; with OPTIMIZER other
    than the model's, its lr / weight decay / betas are left out."""
    from .errors import ZooError
    from .registry import get_spec
    from .tasks import TASKS

    try:
        spec = get_spec(str(model))
    except ZooError:  # an unknown name is reported by the config check, with its close matches
        return fallback
    return TASKS[spec.task].defaults_for(spec, optimizer).get(key, fallback)


def register_train_default_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("zoo_train_default"):
        OmegaConf.register_new_resolver("zoo_train_default", train_default)


def check_model_overrides(args: Iterable[str], config_dir: str | Path = CONFIG_DIR) -> None:
    """Refuse a ``model=NAME`` command-line override naming no model with the registry's own error
    (:class:`zoo.UnknownModelError`, with the close names) before Hydra lists every option of the group.
    Arguments that are not a ``model`` group override (or do not parse) are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .registry import get_spec

    parser = OverridesParser.create()
    files = set(model_files(config_dir))
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
            if override.key_or_group != "model" or override.package is not None or override.is_delete():
                continue
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.value()])
        except Exception:  # noqa: BLE001 - a syntax (or glob sweep) Hydra itself reports or resolves
            continue
        for value in values:
            if isinstance(value, str) and value not in files:
                get_spec(value)  # UnknownModelError: "unknown model 'X'. Did you mean: ...?"
