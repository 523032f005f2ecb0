"""Train a zoo model: ``python train.py [model=NAME] [data=NAME] [experiment=NAME] [trainer=gpu] ...``

Builds the datamodule from ``cfg.data``, the net from the registry (its task must match the data's),
wraps it in the task's LightningModule, fits, tests the best checkpoint and writes ``metrics.json``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from zoo.errors import ZooError
from zoo.runner import build_task, flat_metrics, prepare_data, print_metrics_table, write_metrics

log = logging.getLogger("zoo.train")


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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test; returns the flat test metrics (also written to metrics.json)."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)

    dm = instantiate(cfg.data, _convert_="all")
    prepare_data(dm, cfg.model.name)
    task = build_task(container(cfg.model), dm, optim=container(cfg.optim), init_from=cfg.get("init_from"))

    callbacks = build_callbacks(cfg, task.monitor, task.monitor_mode)
    trainer = L.Trainer(**container(cfg.trainer), callbacks=callbacks, logger=build_loggers(cfg) or False,
                        default_root_dir=str(out_dir))
    trainer.fit(task, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    if not cfg.get("test", True):
        return {}

    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(task, datamodule=dm, ckpt_path=ckpt or None, weights_only=True, verbose=False)
    metrics = flat_metrics(results)
    if ckpt:
        log.info("tested best checkpoint %s", ckpt)
    write_metrics(metrics, out_dir / "metrics.json", cfg.get("metrics_file"))
    if trainer.is_global_zero:
        print_metrics_table(metrics, title=f"{cfg.model.name} on {cfg.data.dataset}: test metrics")
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ZooError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
