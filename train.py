"""Train a zoo model: ``python train.py [model=NAME] [data=NAME] [experiment=NAME] [trainer=gpu] ...``

``model=NAME`` takes every registered name: importing this module stores the ``model`` config group
from the registry (:mod:`zoo.config_store`; ``configs/model/`` holds only the models whose defaults differ).

Builds the datamodule from ``cfg.data``, the net from the registry (its task must match the data's),
wraps it in the task's LightningModule, fits, tests the best checkpoint and writes ``metrics.json``.
"""
from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from zoo.callbacks import AtomicCheckpointIO, reliability_callbacks
from zoo.config_store import check_model_overrides, register_model_configs
from zoo.errors import ZooError
from zoo.plots import write_run_figures
from zoo.runlock import check_run_dir_free, check_run_dir_writable, run_dir_lock
from zoo.runner import build_task, flat_metrics, prepare_data, print_metrics_table, write_metrics
from zoo.runner import trainer_kwargs as runner_trainer_kwargs
from zoo.validate import check_mandatory, check_run_config, missing_keys
from zoo.weights import atomic_write, safe_load

log = logging.getLogger("zoo.train")

register_model_configs()  # model=NAME for every registered name, before @hydra.main composes


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build_callbacks(cfg: DictConfig, monitor: str, mode: str) -> list:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        if node.get("monitor") == "auto":
            node["monitor"] = monitor
        if node.get("mode") == "auto":
            node["mode"] = mode
        callbacks.append(instantiate(node))
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node and "_target_" in node]


def check_config(cfg: DictConfig, training: bool = True) -> None:
    check_mandatory(missing_keys(cfg))  # data.root, ckpt_path, ...: ??? named with what to set
    sections = {k: container(cfg.get(k)) for k in ("data", "model", "trainer", "optim") if cfg.get(k) is not None}
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise ZooError(f"seed={cfg.get('seed')!r} has the wrong type; seed takes an int")
    check_run_config(sections, training=training)


def trainer_kwargs(cfg: DictConfig) -> dict:
    """``cfg.trainer`` as Trainer kwargs (:func:`zoo.runner.trainer_kwargs`)."""
    return runner_trainer_kwargs(container(cfg.trainer), container(cfg.get("optim")))


def find_latest_run(root: str | Path) -> Path | None:
    """The newest ``<run>/checkpoints/last.ckpt`` under ``root`` (the runs of one task_name)."""
    found = [p for p in Path(root).glob("**/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_resume(cfg: DictConfig) -> str | None:
    """``ckpt_path=last``: this run directory's last.ckpt; ``resume=latest``: the newest last.ckpt of
    this task_name under ``resume_root``, whose run directory the resumed run then writes into.
    Neither found: a warning and a fresh start (so a requeue script can always pass them)."""
    ckpt, resume = cfg.get("ckpt_path"), cfg.get("resume")
    if resume not in (None, "latest"):
        raise ZooError(f"resume={resume!r}: the only value is 'latest' (or give ckpt_path=PATH|last)")
    if resume == "latest":
        if ckpt:
            raise ZooError("give either resume=latest or ckpt_path, not both")
        last = find_latest_run(cfg.resume_root)
        if last is None:
            log.warning("resume=latest: no checkpoints/last.ckpt under %s; starting a new run", cfg.resume_root)
            return None
        with open_dict(cfg):
            cfg.paths.output_dir = str(last.parent.parent)
        log.info("resume=latest: continuing %s in %s", last, cfg.paths.output_dir)
        ckpt = str(last)
    elif ckpt == "last":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            log.warning("ckpt_path=last: no %s yet; starting a new run", last)
            return None
        ckpt = str(last)
    if ckpt:  # refused here, with the zoo's message, if its pickle would run code
        stored = (safe_load(ckpt, mmap=True).get("hyper_parameters") or {}).get("model") or {}
        if stored.get("name") not in (None, cfg.model.name):
            raise ZooError(f"{ckpt} is a checkpoint of {stored.get('name')!r}, not of model={cfg.model.name!r}; "
                           "resume with the model (or experiment) it was trained with")
    return ckpt


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test; returns the flat test metrics (also written to metrics.json)."""
    check_config(cfg)  # unknown keys, wrong types: named before anything is built or loaded
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_resume(cfg)
    out_dir = Path(cfg.paths.output_dir)
    check_run_dir_writable(out_dir)  # a read-only or missing-permission folder: named, before anything runs
    if rank_zero_only.rank != 0:  # DDP: every rank runs this script; rank 0 holds the folder and writes
        return _fit_and_test(cfg, ckpt_path, out_dir)
    with run_dir_lock(out_dir):  # a second run into this folder stops here, naming this one
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(out_dir / "config.yaml", lambda tmp: tmp.write_text(text), what="the run's config")
        return _fit_and_test(cfg, ckpt_path, out_dir)


def _fit_and_test(cfg: DictConfig, ckpt_path: str | None, out_dir: Path) -> dict[str, float]:

    dm = instantiate(cfg.data, _convert_="all")
    prepare_data(dm, cfg.model.name)
    task = build_task(container(cfg.model), dm, optim=container(cfg.optim), init_from=cfg.get("init_from"),
                      compile=cfg.trainer.get("compile", False), reid=container(cfg.get("reid")))

    callbacks = build_callbacks(cfg, task.monitor, task.monitor_mode) + reliability_callbacks()
    trainer = L.Trainer(**trainer_kwargs(cfg), callbacks=callbacks, logger=build_loggers(cfg) or False,
                        default_root_dir=str(out_dir), plugins=[AtomicCheckpointIO()])
    with warnings.catch_warnings():
        # the zoo's training samplers skip the batches a mid-epoch checkpoint had trained on (tested bit-equal),
        # which Lightning cannot see and warns about
        warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if not cfg.get("test", True):
        return {}

    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(task, datamodule=dm, ckpt_path=ckpt or None, weights_only=True, verbose=False)
    metrics = flat_metrics(results)
    if ckpt:
        log.info("tested best checkpoint %s", ckpt)
    if trainer.is_global_zero:  # metrics are synced across ranks already; one rank writes them
        write_metrics(metrics, out_dir / "metrics.json", cfg.get("metrics_file"))
        print_metrics_table(metrics, title=f"{cfg.model.name} on {cfg.data.dataset}: test metrics")
        write_run_figures(task, trainer.loggers, out_dir)  # curves.png + the test split's pictures; never raises
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.get("test_last", True) and ckpt and last.is_file() and Path(ckpt).resolve() != last.resolve():
        # the last epoch too, next to the best-on-validation one (metrics.json): metrics_last.json
        last_metrics = flat_metrics(trainer.test(task, datamodule=dm, ckpt_path=str(last), weights_only=True,
                                                 verbose=False))
        if trainer.is_global_zero:
            write_metrics(last_metrics, out_dir / "metrics_last.json")
            print_metrics_table(last_metrics, title=f"{cfg.model.name} on {cfg.data.dataset}: test metrics, last epoch")
    return metrics


def run_guarded(fn, cfg: DictConfig) -> None:
    """Run ``fn(cfg)`` with the documented exit codes: 2 for an error the zoo names (one line), 143 on
    SIGTERM and 130 on Ctrl-C (128 + the signal; during training ``last.ckpt`` is saved first)."""
    try:
        fn(cfg)
    except ZooError as e:
        log.error("%s", e)
        sys.exit(2)
    except SIGTERMException:  # pre-empted: last.ckpt is saved; a non-zero status tells the scheduler
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's fit/test
        sys.exit(128 + signal.SIGINT)
    except SystemExit as e:  # Lightning's graceful Ctrl-C shutdown exits 1: say it was SIGINT
        if isinstance(e.__context__, KeyboardInterrupt):
            sys.exit(128 + signal.SIGINT)
        raise


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_guarded(train, cfg)


def run_cli(hydra_main) -> None:
    """Run a ``@hydra.main`` entry point; an unknown ``model=NAME`` is refused first with the zoo's
    one-line error and its close names (Hydra's own lists every option), exit code 2."""
    try:
        check_model_overrides(sys.argv[1:])
        for arg in sys.argv[1:]:  # before Hydra writes its .hydra/ files into a folder another run holds
            if arg.startswith("hydra.run.dir=") and "${" not in arg:
                check_run_dir_writable(arg.split("=", 1)[1])
                check_run_dir_free(arg.split("=", 1)[1])
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    run_cli(main)
