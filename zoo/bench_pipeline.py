"""Where a training run's time goes: the net, the data loader, or the Lightning loop.

>>> from zoo.bench_pipeline import bench_pipeline
>>> r = bench_pipeline("halonet_tiny", ["data=digits"], steps=10)

or ``python -m zoo bench-pipeline halonet_tiny --data data=digits --steps 10 [--json]``. One process measures:

* ``net_*`` (a): forward + loss + backward + optimizer step of the task's net on one device-resident batch
  (:func:`zoo.bench.time_train_steps`), with the optimizer the task builds (its param groups, no schedule).
* ``loader`` (b): the train DataLoader of the real datamodule alone (read, decode, augment, collate), per
  worker count (with ``data.gpu_decode=true``: read in the workers, decode + augment on the device); ``loader_workers`` is the count the data config uses, which (c) runs with.
* ``train_*`` (c): ``train.py``'s steps: datamodule and task built as train.py builds them
  (:func:`zoo.runner.prepare_data`, :func:`zoo.runner.build_task`), a ``lightning.Trainer`` with the
  config's trainer settings and callbacks but ``max_steps``, no validation, checkpoints or logger. A step
  is timed from one ``on_train_batch_end`` to the next, so it includes waiting for the loader.
* ``plain_*`` / ``lightning_*``: a plain PyTorch loop and ``Trainer.fit`` over the same list of
  pre-loaded batches, same net and optimizer: ``lightning_overhead_pct`` is the loop's own cost.

Derived: ``train_over_net`` = (c)/(a); ``bound`` is ``"loader"`` when (b) < (a) (``loader_shortfall``: the
loader's rate is that fraction below the net's), else ``"net"``; ``loop_overhead_ms`` = a step of (c) minus
the step the net and loader allow (their max with loader workers, their sum with ``num_workers=0``, where
loading is serial). Overheads are signed: noise can make them negative.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ZooError

__all__ = ["bench_pipeline", "write_synthetic_jpegs", "format_report", "DEFAULT_CACHE"]

DEFAULT_CACHE = Path.home() / ".cache" / "attention_zoo" / "synthetic_jpeg"


# ---------------------------------------------------------------------------------------- synthetic data
def parse_size(text: str) -> tuple[int, int]:
    """``"224x224"`` -> ``(224, 224)`` (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ZooError(f"--size takes WxH, e.g. 224x224; got {text!r}") from None
    if w < 1 or h < 1:
        raise ZooError(f"--size must be positive, got {text!r}")
    return w, h


def write_synthetic_jpegs(n: int, size: tuple[int, int], cache: str | Path | None = None, classes: int = 10,
                          seed: int = 0) -> Path:
    """An ImageNet-layout folder of ``n`` real JPEGs (``train/class_XX/img_XXXXX.JPEG``, smooth random images
    of ``size`` = (W, H), PIL quality 90) under ``cache/<n>_<W>x<H>/``; returns that root. Written once:
    a later call finds the ``.complete`` marker and reuses it (a half-written folder is rewritten)."""
    from PIL import Image

    if n < 1:
        raise ZooError(f"--synthetic-jpeg needs at least one image, got {n}")
    w, h = size
    root = Path(cache or DEFAULT_CACHE).expanduser() / f"{n}_{w}x{h}"
    if (root / ".complete").is_file():
        return root
    gen = torch.Generator().manual_seed(seed)
    classes = min(classes, n)
    try:
        for i in range(n):
            c = i % classes
            folder = root / "train" / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # a coarse random grid, bicubically upsampled: smooth like a photo, so JPEG sizes are realistic
            grid = (torch.rand(8, 8, 3, generator=gen) * 200 + c * 5).clamp(0, 255).to(torch.uint8)
            img = Image.fromarray(grid.numpy()).resize((w, h), Image.BICUBIC)
            img.save(folder / f"img_{i:05d}.JPEG", quality=90)
        (root / ".complete").write_text(f"{n} images {w}x{h}\n")
    except OSError as e:
        raise ZooError(f"cannot write the synthetic JPEGs under {root}: {e}; pick another --cache DIR") from None
    return root


# ---------------------------------------------------------------------------------------- config
def compose_train_config(overrides: list[str]):
    """``configs/train.yaml`` composed with ``overrides``, as ``python train.py OVERRIDES`` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from omegaconf import OmegaConf

    from .config_store import CONFIG_DIR, check_model_overrides, register_model_configs
    from .validate import check_mandatory, check_run_config, missing_keys

    register_model_configs()
    check_model_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ZooError(f"bad config override: {' '.join(str(e).split())}") from None
    check_mandatory(missing_keys(cfg))  # data.root=??? and the like, named as train.py names them
    check_run_config({k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "trainer", "optim")})
    return cfg


# ---------------------------------------------------------------------------------------- timing
class StepTimer:
    """Lightning callback: ``time.perf_counter()`` at every train batch's start and end (synced on CUDA)."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []

    def _now(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(self._now(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.ends.append(self._now(module))

    def step_s(self, warmup: int) -> tuple[float, float]:
        """(mean seconds per step end to end, mean seconds inside a step) over the steps after ``warmup``."""
        n = len(self.ends) - warmup
        if n < 1:
            raise ZooError(f"the trainer ran {len(self.ends)} steps, not more than the {warmup} warm-up ones; "
                           "the data has too few batches (more images, or a smaller --batch-size)")
        wall = (self.ends[-1] - self.ends[warmup - 1]) / n
        inside = sum(e - s for s, e in zip(self.starts[warmup:], self.ends[warmup:])) / n
        return wall, inside


def _fit(cfg, task, dm_or_loader, max_steps: int) -> StepTimer:
    """``Trainer.fit`` as train.py runs it, for ``max_steps`` steps, without validation, checkpoints or logger."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
    from omegaconf import OmegaConf

    from .callbacks import reliability_callbacks
    from .runner import trainer_kwargs

    timer = type("_StepTimer", (StepTimer, Callback), {})()
    kept = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node and "_target_" in node
            and not node["_target_"].endswith((ModelCheckpoint.__name__, LearningRateMonitor.__name__))]
    kw = trainer_kwargs(OmegaConf.to_container(cfg.trainer, resolve=True), OmegaConf.to_container(cfg.optim, resolve=True))
    kw.update(max_steps=max_steps, max_epochs=None, limit_val_batches=0, num_sanity_val_steps=0,
              enable_checkpointing=False, logger=False)
    trainer = L.Trainer(**kw, callbacks=[*kept, *reliability_callbacks(), timer])
    data = ({"datamodule": dm_or_loader} if isinstance(dm_or_loader, L.LightningDataModule)
            else {"train_dataloaders": dm_or_loader})
    with contextlib.redirect_stdout(sys.stderr):  # progress bar and summary off stdout: --json stays parseable
        trainer.fit(task, **data)
    return timer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loader(dm, workers: int, batches: int, device: torch.device) -> float:
    """Seconds per batch of the train DataLoader with ``workers`` workers, after one untimed batch (worker
    start). With ``data.gpu_decode`` this includes the datamodule's decoding of the batch on ``device``."""
    saved = dm.hparams.num_workers
    dm.hparams.num_workers = workers
    decode = dm.hparams.get("gpu_decode", False)
    try:
        loader = dm.train_dataloader()
        it, done = iter(loader), 0
        next(it)
        t0 = time.perf_counter()
        while done < batches:
            try:
                batch = next(it)
                if decode:
                    dm.transfer_batch_to_device(batch, device, 0)
                done += 1
            except StopIteration:
                it = iter(loader)  # a small dataset: the next epoch
        _sync(device)
        return (time.perf_counter() - t0) / batches
    finally:
        dm.hparams.num_workers = saved


def _optimizer(task) -> torch.optim.Optimizer:
    """The task's own optimizer (same param groups and hyper-parameters), without its LR schedule."""
    saved = task.optim
    task.optim = {**saved, "scheduler": "none"}
    try:
        return task.configure_optimizers()
    finally:
        task.optim = saved


# ---------------------------------------------------------------------------------------- the benchmark
def bench_pipeline(model: str, overrides: list[str] | None = None, *, batch_size: int | None = None,
                   img_size: int | None = None, steps: int = 10, warmup: int = 2,
                   workers: list[int] | None = None, synthetic: dict | None = None) -> dict[str, Any]:
    """Measure (a) the net's train step, (b) the loader per worker count, (c) train.py's steps and the
    Lightning loop against a plain loop, for ``model`` on the data ``overrides`` name (Hydra overrides of
    ``configs/train.yaml``, e.g. ``["data=digits"]``). ``synthetic``: ``{"n", "size", "cache"}`` writes (once)
    and uses a JPEG folder with ``data=imagefolder``. Rates are images/s; see the module docstring."""
    if steps < 1 or warmup < 1 or (batch_size is not None and batch_size < 1):
        raise ZooError("--steps, --warmup and --batch-size must be >= 1")
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .runner import build_task, prepare_data

    overrides = [f"model={model}", *(overrides or [])]
    if synthetic:
        root = write_synthetic_jpegs(synthetic["n"], synthetic["size"], synthetic.get("cache"))
        overrides += ["data=imagefolder", f"data.root={root}"]
    overrides += [f"data.batch_size={batch_size}"] * bool(batch_size) + [f"data.img_size={img_size}"] * bool(img_size)
    cfg = compose_train_config(overrides)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = instantiate(cfg.data, _convert_="all")
    prepare_data(dm, cfg.model.name)  # as train.py: the input checked, resolved and set up
    task = build_task(OmegaConf.to_container(cfg.model, resolve=True), dm,
                      optim=OmegaConf.to_container(cfg.optim, resolve=True))
    b, used = int(dm.hparams.batch_size), int(dm.hparams.num_workers)
    worker_counts = sorted({*(workers if workers is not None else [0, 1, 2]), used})

    # (b) the loader alone, then the batches every other measurement reuses
    device = torch.device("cuda" if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") else "cpu")
    loader_s = {w: _time_loader(dm, w, steps + warmup, device) for w in worker_counts}
    it = iter(dm.train_dataloader())
    batches = [tuple(dm.transfer_batch_to_device(next(it), device, 0))[:2]
               for _ in range(min(steps + warmup, len(dm.train_dataloader())))]
    del it

    # (a) the net alone on one fixed batch, with the task's optimizer
    from .bench import time_train_steps

    net = task.net.to(device).train()
    net_s = time_train_steps(net, batches[:1], _optimizer(task), warmup=warmup, iters=steps, device=device)

    # the Lightning loop against a plain loop, over the same pre-loaded batches
    plain_s = time_train_steps(net, batches, _optimizer(task), warmup=warmup, iters=steps, device=device)
    preloaded = torch.utils.data.DataLoader(batches * (1 + (steps + warmup) // len(batches)), batch_size=None)
    lightning_s, _ = _fit(cfg, task, preloaded, steps + warmup).step_s(warmup)

    # (c) train.py's steps on the real datamodule
    train_s, inside_s = _fit(cfg, task, dm, steps + warmup).step_s(warmup)

    load_s = loader_s[used]
    allowed = net_s + load_s if used == 0 else max(net_s, load_s)
    rate = lambda s: b / s  # noqa: E731
    return {
        "model": model, "data": cfg.data.dataset, "batch_size": b, "img_size": getattr(dm, "img_size", None),
        "device": str(device), "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "net_img_s": rate(net_s), "net_step_ms": net_s * 1e3,
        "loader": {str(w): {"img_s": rate(s), "batch_ms": s * 1e3} for w, s in loader_s.items()},
        "loader_workers": used,
        "train_img_s": rate(train_s), "train_step_ms": train_s * 1e3, "train_data_wait_ms": (train_s - inside_s) * 1e3,
        "train_over_net": net_s / train_s,
        "bound": "loader" if load_s > net_s else "net",
        "loader_shortfall": max(0.0, 1 - net_s / load_s),
        "loop_overhead_ms": (train_s - allowed) * 1e3,
        "plain_img_s": rate(plain_s), "lightning_img_s": rate(lightning_s),
        "lightning_overhead_pct": (lightning_s / plain_s - 1) * 100,
    }


# ---------------------------------------------------------------------------------------- output
def format_report(r: dict[str, Any]):
    """The results as a ``rich.table.Table`` (rates, step times) and a list of summary lines."""
    from rich.table import Table

    t = Table(title=f"{r['model']} on {r['data']}: batch {r['batch_size']}, {r['img_size']} px, {r['device']}, "
                    f"{r['threads']} threads, {r['steps']} timed steps", title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("images/s", justify="right")
    t.add_column("ms / step", justify="right")
    t.add_row("(a) net step (fixed batch)", f"{r['net_img_s']:.1f}", f"{r['net_step_ms']:.1f}")
    for w, v in r["loader"].items():
        mark = "  <- train" if int(w) == r["loader_workers"] else ""
        t.add_row(f"(b) loader, {w} workers{mark}", f"{v['img_s']:.1f}", f"{v['batch_ms']:.1f}")
    t.add_row("(c) train.py steps", f"{r['train_img_s']:.1f}", f"{r['train_step_ms']:.1f}")
    t.add_row("plain loop, pre-loaded", f"{r['plain_img_s']:.1f}", f"{r['batch_size'] / r['plain_img_s'] * 1e3:.1f}")
    t.add_row("Lightning, pre-loaded", f"{r['lightning_img_s']:.1f}",
              f"{r['batch_size'] / r['lightning_img_s'] * 1e3:.1f}")
    load = r["loader"][str(r["loader_workers"])]
    if r["bound"] == "loader":
        bound = (f"loader-bound: the loader ({r['loader_workers']} workers) gives {load['img_s']:.1f} images/s, "
                 f"{r['loader_shortfall']:.0%} below the net's {r['net_img_s']:.1f}")
    else:
        bound = f"net-bound: the loader ({r['loader_workers']} workers) keeps up ({load['img_s']:.1f} images/s)"
    lines = [
        f"(c)/(a) = {r['train_over_net']:.2f}; {bound}",
        f"loop overhead per step of (c): {r['loop_overhead_ms']:+.1f} ms (data wait inside it: "
        f"{r['train_data_wait_ms']:.1f} ms)",
        f"Lightning vs plain loop: {r['lightning_overhead_pct']:+.1f}%",
    ]
    return t, lines
