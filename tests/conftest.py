"""Shared fixtures: the repo root on sys.path (train.py, evaluate.py) and composed Hydra configs."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and its subprocesses), no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.pop("COLUMNS", None)  # workers inherit an 80-column COLUMNS; the CLI's tables are tested as a pipe's

import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def compose(config_name: str, overrides: list[str], out_dir: Path):
    """Compose a config as the CLI would, with the run directory pointed at ``out_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from zoo.config_store import register_model_configs

    register_model_configs()  # model=NAME for every registered name (train.py does this at import)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


@contextlib.contextmanager
def _intra_op_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread for small-op tests (restored after): with two threads on a shared 2-core machine they
    ran ~20x slower (measured: 1.9 s vs 0.08 s CPU for one layer check)."""
    with _intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def one_intra_op_thread_per_module():
    """``one_intra_op_thread`` for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``), and for
    module-scoped fixtures that train: bit-equal runs need the same thread count in every process."""
    with _intra_op_threads(1):
        yield


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(config_name: str = "train", overrides: list[str] | None = None, out_dir: Path | None = None):
        return compose(config_name, overrides or [], out_dir or tmp_path / "run")

    return _compose


def count_saved_tensors(fn) -> tuple[int, object]:
    """How many tensors autograd saves for backward while ``fn()`` runs (and its result): gradient
    checkpointing must make this smaller."""
    saved: list = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return len(saved), out


def assert_picture(path: Path) -> None:
    """``path`` is a PNG with pixels that are not all one colour (a drawn figure, not a blank canvas)."""
    import numpy as np
    from PIL import Image

    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.width > 0 and img.height > 0
        px = np.asarray(img.convert("RGB"))
    assert (px != px[0, 0]).any(), f"{path} is a single colour"
