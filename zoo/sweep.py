"""Readable multirun folder names: ``hydra.sweep.subdir`` = ``NUM_KEY=VALUE,...`` of the swept keys only.

Hydra's ``override_dirname`` lists every command-line override, which runs past a file name's 255
bytes with a few fixed ones (``+trainer.limit_train_batches=2 ...``); the swept keys are the overrides of
``sys.argv`` that Hydra parses as sweeps (``a=1,2``, ``range(...)``, ``choice(...)``).
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

MAX_NAME = 120  # characters of the KEY=VALUE part; the job number keeps truncated names unique


def _parse(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            out.append(parser.parse_override(text))
        except Exception:  # noqa: BLE001 - not an override (a flag such as -m): Hydra reports it
            continue
    return out


def swept_keys(argv: Sequence[str] | None = None) -> list[str]:
    """The keys ``argv`` sweeps over (``optim.lr=1e-3,3e-3`` -> ``optim.lr``); hydra.* keys left out."""
    argv = sys.argv[1:] if argv is None else argv
    return [o.key_or_group for o in _parse(argv) if o.is_sweep_override() and not o.key_or_group.startswith("hydra")]


def sweep_subdir(num, job_overrides: Sequence[str] = (), argv: Sequence[str] | None = None) -> str:
    """``0_optim.lr=0.001,seed=1`` for job 0 of ``-m optim.lr=1e-3,3e-3 seed=1,2``; ``0`` if nothing is swept
    on the command line (a sweeper config's own parameters)."""
    keys = set(swept_keys(argv))
    parts = [f"{o.key_or_group}={o.value()}" for o in _parse(list(job_overrides)) if o.key_or_group in keys]
    name = re.sub(r"[^\w.=,+-]", "_", ",".join(parts))[:MAX_NAME]
    return f"{num}_{name}" if name else str(num)


def register_sweep_resolver() -> None:
    """``${zoo_sweep_subdir:${hydra.job.num},${hydra.overrides.task}}`` (configs/train.yaml)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("zoo_sweep_subdir"):
        OmegaConf.register_new_resolver("zoo_sweep_subdir", lambda num, overrides: sweep_subdir(num, list(overrides)))
