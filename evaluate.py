"""Evaluate a zoo checkpoint: ``python evaluate.py ckpt_path=PATH [data=NAME] [explain=true explain_dir=DIR]``

The net, its class names and its preprocessing come from the checkpoint; the data from ``cfg.data``.
A ``model=NAME`` (or an experiment's model) other than the checkpoint's is refused; left at the
default, the checkpoint's model is used and a warning says so.
Writes the same flat ``metrics.json`` as train.py, and PNG attention overlays with ``explain=true``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from train import build_loggers, check_config, run_guarded, trainer_kwargs
from zoo.contract import capabilities, overlay_style
from zoo.errors import ZooError
from zoo.runlock import run_dir_lock
from zoo.spec import stored_input
from zoo.runner import flat_metrics, load_task, prepare_data, print_metrics_table, write_metrics

log = logging.getLogger("zoo.evaluate")


def explain(task, dm, out_dir: str, max_images: int) -> list[Path]:
    """Write PNG overlays of ``net.attention_maps`` for the first test images."""
    from zoo.explain import denormalize, save_attention_maps

    net = task.net.eval()
    if not capabilities(net).attention_maps:
        raise ZooError(f"{task.hparams.model['name']} defines no attention_maps(x); explain=true needs one")
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        if task.task == "mil":
            coords = getattr(dm.test_set, "coords", None)
            if coords is not None and coords(0) is not None and dm.test_dataloader().batch_size == 1:
                images, maps = _explain_slide(net, batch[0][:1], batch[1][:1], coords(0)[None])
            else:
                images, maps = _explain_bags(net, dm, *batch[:2], max_images)
        else:  # Re-ID: the test loader starts with the query images
            x = batch[0][:max_images]
            images, maps = denormalize(x, dm.mean, dm.std), net.attention_maps(x)
    return save_attention_maps(images, maps, out_dir, prefix=task.hparams.model["name"], max_images=max_images,
                               **overlay_style(net))


def _explain_slide(net, bags, mask, coords):
    """Feature bags with tile coordinates: per-branch heatmaps on the slide's tile grid."""
    maps = net.attention_maps(bags, mask, coords=coords)
    h, w = next(iter(maps.values())).shape[-2:]
    return torch.full((1, 3, h * 16, w * 16), 0.5), maps


def _explain_bags(net, dm, bags, mask, max_images):
    """MIL: instances re-ordered by slide attention, drawn as a mosaic under their attention grid."""
    from zoo.explain import bag_mosaic, denormalize

    bags, mask = bags[:max_images], mask[:max_images]
    order = net.attention_weights(bags, mask).mean(1).argsort(-1, descending=True)  # most attended first
    bags = bags.gather(1, order.view(*order.shape, *[1] * (bags.ndim - 2)).expand_as(bags))
    mask = mask.gather(1, order)
    maps = net.attention_maps(bags, mask)
    if bags.ndim == 5:  # image bags: the tiles themselves
        images = bag_mosaic(denormalize(bags.flatten(0, 1), dm.mean, dm.std).unflatten(0, bags.shape[:2]), mask)
    else:  # feature bags: the attention grid alone, on grey
        side = next(iter(maps.values())).shape[-1]
        images = torch.full((len(bags), 3, side * 16, side * 16), 0.5)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, maps


RUNTIME_MODEL_KEYS = ("model.channels_last",)  # how to run the checkpoint's net: not a choice of model


def _model_was_given(cfg: DictConfig) -> bool:
    """Whether ``model`` was chosen (``model=``, ``model.*=`` or ``experiment=`` on the command line, or a
    model other than evaluate.yaml's default), rather than left at evaluate.yaml's default."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        given = [o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task]
        keys = {k.split(".", 1)[0].split("@", 1)[0] for k in given if k not in RUNTIME_MODEL_KEYS}
        if keys & {"model", "experiment"}:
            return True
    defaults = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent / "configs" / "evaluate.yaml")).get("defaults") or []
    default = next((d["model"] for d in defaults if isinstance(d, dict) and "model" in d), None)
    return (cfg.get("model") or {}).get("name") != default


def check_model_matches(cfg: DictConfig, ckpt_model: str) -> None:
    """``model=OTHER`` next to a checkpoint: refused (the net always comes from the checkpoint); the
    untouched default: a warning naming the model that is used."""
    from zoo.validate import resolve_model_name

    asked = (cfg.get("model") or {}).get("name")
    if not asked:
        return
    try:
        same = resolve_model_name(asked) == resolve_model_name(ckpt_model)
    except ZooError:
        same = asked == ckpt_model
    if same:
        return
    if _model_was_given(cfg):
        raise ZooError(f"model={asked} but the checkpoint {cfg.ckpt_path} holds a {ckpt_model}: evaluate.py "
                       f"evaluates the checkpoint's net, so drop model= (or set model={ckpt_model})")
    log.warning("evaluating the checkpoint's model %s (%s); model=%s is only evaluate.yaml's default and is not used",
                ckpt_model, cfg.ckpt_path, asked)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg, training=False)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank != 0:  # DDP: rank 0 holds the folder
        return _evaluate(cfg, out_dir)
    with run_dir_lock(out_dir):  # another run writing into this folder stops this one, naming it
        return _evaluate(cfg, out_dir)


def _evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    task = load_task(cfg.ckpt_path)
    check_model_matches(cfg, task.hparams.model["name"])
    if cfg.get("reid"):  # +reid.re_ranking=true etc.: evaluation options over the checkpoint's
        if task.task != "reid":
            raise ZooError(f"reid.* options are for Re-ID checkpoints; {cfg.ckpt_path} is a {task.task} checkpoint")
        task.set_eval_options(OmegaConf.to_container(cfg.reid, resolve=True))
    # how to run the net, not what it is: trainer.compile and model.channels_last apply as in train.py
    task.set_runtime(channels_last=(cfg.get("model") or {}).get("channels_last", False),
                     compile=cfg.trainer.get("compile", False))
    dm = instantiate(cfg.data, _convert_="all")
    # the checkpoint's input (size, channels, mean/std, crop) unless the user overrides it (logged as such)
    prepare_data(dm, task.hparams.model["name"], stored=stored_input(task.hparams), log=log.warning)
    stored_kwargs = dict(task.hparams.model.get("kwargs") or {})
    odd = {k: (stored_kwargs[k], v) for k, v in dm.model_kwargs().items() if k in stored_kwargs and v != stored_kwargs[k]}
    if odd:  # e.g. feature bags from another backbone than the checkpoint's net was trained on
        raise ZooError(f"data '{cfg.data.dataset}' does not fit the checkpoint's net: "
                       + ", ".join(f"{k}={v} in the data, {k}={c} in {cfg.ckpt_path}" for k, (c, v) in odd.items()))
    if task.task == "reid":  # retrieval compares features of unseen identities: any Re-ID data will do
        if dm.task != "reid":
            raise ZooError(f"{cfg.ckpt_path} is a Re-ID checkpoint; evaluate it on Re-ID data (data=digit_reid, "
                           f"market1501, ...), not the {dm.task} data '{cfg.data.dataset}'")
    elif dm.num_classes != task.num_classes:
        raise ZooError(f"the checkpoint has {task.num_classes} classes but data '{cfg.data.dataset}' has "
                       f"{dm.num_classes}; evaluate on the data it was trained for")
    stored_names = list((task.hparams.data_info or {}).get("class_names") or [])
    if task.task != "reid" and stored_names and list(dm.class_names) != stored_names:  # other classes or order
        raise ZooError(f"the checkpoint's classes {stored_names[:10]} are not data '{cfg.data.dataset}'s "
                       f"{list(dm.class_names)[:10]}; a metric over them would compare the wrong labels")
    trainer = L.Trainer(**trainer_kwargs(cfg), logger=build_loggers(cfg) or False,
                        callbacks=[L.pytorch.callbacks.RichProgressBar()], default_root_dir=str(out_dir))
    metrics = flat_metrics(trainer.test(task, datamodule=dm, verbose=False))
    if trainer.is_global_zero:
        write_metrics(metrics, out_dir / "metrics.json", cfg.get("metrics_file"))
        print_metrics_table(metrics, title=f"{task.hparams.model['name']} ({Path(cfg.ckpt_path).name}): test metrics")
        if cfg.get("explain"):
            paths = explain(task, dm, cfg.explain_dir, cfg.explain_images)
            log.info("wrote %d attention-map PNGs to %s", len(paths), cfg.explain_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_guarded(evaluate, cfg)


if __name__ == "__main__":
    from train import run_cli

    run_cli(main)
