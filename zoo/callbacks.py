"""Lightning pieces that keep a long run's work safe: resumable RNG state, a checkpoint on SIGTERM,
a stop on a non-finite loss, and checkpoint files that are replaced atomically.

``train.py`` adds all of them to every run (:func:`reliability_callbacks`, :class:`AtomicCheckpointIO`).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import NonFiniteError, WeightsError, ZooError
from .weights import atomic_write

log = logging.getLogger("zoo.callbacks")


class NonFiniteLossError(NonFiniteError):
    pass


class CheckpointWriteError(ZooError, OSError):
    pass


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run keeps ``last.ckpt``: the ModelCheckpoint named ``last``, else ``<root>/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.filename == "last" and cb.dirpath:
            return Path(cb.dirpath) / "last.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def newest_checkpoint(trainer: L.Trainer) -> str | None:
    paths = [p for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)
             for p in Path(cb.dirpath).glob("*.ckpt")]
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None


class ResumableRNG(L.Callback):
    """Stores the global torch / numpy / python RNG states in every checkpoint and puts them back
    when training resumes, so augmentation and dropout after a restart draw what they would have
    drawn without it (with ``num_workers=0``; worker processes are seeded per epoch by Lightning)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s, self._pending = self._pending, None
        if not s:
            return
        torch.set_rng_state(s["torch"])
        n = s["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = s["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


class CheckpointOnInterrupt(L.Callback):
    """SIGTERM (a cluster pre-emption) or Ctrl-C: write ``last.ckpt`` where the run stopped, then exit.

    Lightning turns SIGTERM into a ``SIGTERMException`` after the current batch; resuming from the
    file continues mid-epoch with the batches that were not trained on yet."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(str(path), weights_only=False)  # the full state: optimizer, loops, callbacks
        if trainer.is_global_zero:
            log.warning("interrupted (%s) at step %d: saved %s; resume with ckpt_path=%s",
                        type(exception).__name__, trainer.global_step, path, path)


class FiniteLossGuard(L.Callback):
    """Stop at the first NaN or infinite training loss, before it reaches the weights.

    Checked before ``backward`` (so no optimizer step takes the bad gradients) and agreed across
    DDP ranks (so no rank is left waiting); nothing is saved, so the checkpoints on disk are the last
    good ones."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        last = newest_checkpoint(trainer)
        raise NonFiniteLossError(
            f"training loss is {float(loss.detach().float().mean())} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {batch}); stopped before the optimizer step. "
            + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
            + "Lower optim.lr, set trainer.gradient_clip_val, or check the data for NaN/inf values."
        )


def reliability_callbacks() -> list[L.Callback]:
    return [ResumableRNG(), CheckpointOnInterrupt(), FiniteLossGuard()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target's folder, fsync, then ``os.replace``.

    Lightning's own write goes through an fsspec transaction whose temporary file lives in the
    system temp dir: when that is another file system (often: /tmp on local disk, outputs on a
    share), the final move is a copy and a kill during it leaves a truncated checkpoint. A rename
    within one folder is atomic: a reader sees the old file or the new one, never half of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)

        try:  # a full disk, a read-only folder: the previous checkpoint stays as it was
            atomic_write(path, write, what="checkpoint", durable=True, tmp_suffix=False, hint="Free space or point hydra.run.dir at a writable folder, then resume with ckpt_path=last.")
        except WeightsError as e:
            raise CheckpointWriteError(str(e)) from None
