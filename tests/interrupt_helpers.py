"""Test-only callbacks that interrupt a run at an exact step (importable by a train.py subprocess)."""
from __future__ import annotations

import os
import signal

import lightning as L
import torch


class SignalAt(L.Callback):
    """Send ``signal`` (KILL, TERM, ...) to this process after training step ``step``."""

    def __init__(self, step: int, signal: str = "KILL") -> None:
        self.step, self.signal = step, getattr(signal_module, f"SIG{signal}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class NaNLossAt(L.Callback):
    """Turn the loss of training step ``step`` into NaN (as a diverging run would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch[0].mul_(float("nan"))


signal_module = signal

