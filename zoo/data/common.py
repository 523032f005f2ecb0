"""What every zoo datamodule shares: size/normalisation resolution, seeded splits, loaders.

The training script relies on exactly this surface (``task``, ``configure_for_model``,
``img_size``/``mean``/``std``/``in_chans``, ``num_classes``/``class_names``,
``model_kwargs()`` and the three dataloaders), so it lives in one place.
"""
from __future__ import annotations

import abc

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo.errors import DatasetNotFoundError, ZooError
from zoo.spec import fit_channels  # noqa: F401  (re-exported: datamodules import it from here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel statistics of scikit-learn's digits scaled to [0, 1] and upsampled: the role
# (0.1307, 0.3081) plays for MNIST.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3247,)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnknownDatasetError(ZooError, ValueError):
    pass


def default_root() -> Path:
    """Where downloadable datasets live unless ``root`` is given (``$ZOO_DATA`` overrides)."""
    return Path(os.environ.get("ZOO_DATA", "~/.cache/zoo/data")).expanduser()


def require_dir(path: Path, what: str, layout: str) -> Path:
    """Fail early, naming the path and drawing the layout the reader expects."""
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{what}: folder not found: {path}\nExpected layout:\n{layout.rstrip()}"
        )
    return path


def split_indices(
    n: int,
    labels: Sequence | None,
    *,
    need_val: bool,
    need_test: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (stratified where labels are given) train/val/test split of ``range(n)``.

    Both fractions are of ``n``; a split that is not needed comes back empty. Classes too
    small to stratify fall back to a plain seeded shuffle rather than failing.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    y = None if labels is None else np.asarray(labels)
    out = {"val": idx[:0], "test": idx[:0]}
    for name, need, frac in (("test", need_test, test_fraction), ("val", need_val, val_fraction)):
        if not need or frac <= 0:
            continue
        k = int(round(frac * n))
        k = min(max(k, 1), len(idx) - 1)
        if k < 1:
            continue
        strat = None if y is None else y[idx]
        try:
            keep, held = train_test_split(idx, test_size=k, random_state=seed, stratify=strat)
        except ValueError:  # a class with a single member, or fewer held-out items than classes
            keep, held = train_test_split(idx, test_size=k, random_state=seed, stratify=None)
        idx, out[name] = np.sort(keep), np.sort(held)
    return idx, out["val"], out["test"]


class ZooDataModule(L.LightningDataModule):
    """Base of the three task datamodules: the shared constructor options. Subclasses
    declare ``DATASETS`` (name -> defaults) and implement ``_build()``/``_load_classes()``."""

    task: str = ""
    DATASETS: dict[str, dict[str, Any]] = {}
    collate_fn: Callable | None = None

    def __init__(
        self,
        *,
        dataset: str,
        root: str | None = None,
        img_size: int | None = None,
        mean: list | None = None,
        std: list | None = None,
        in_chans: int | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        download: bool = False,
        augment: bool = True,
    ) -> None:
        """The options every datamodule takes (a subclass adds its own and passes these on as ``**common``):
        ``img_size`` / ``mean`` / ``std`` / ``in_chans`` / ``interpolation`` / ``crop_pct`` override the
        run's input (None: the model's spec or the dataset's default); missing val/test splits are seeded
        stratified ``val_fraction`` / ``test_fraction`` parts of train. All of them, and the subclass's
        own arguments, are saved as hyper-parameters (Lightning collects every ``__init__`` in the chain)."""
        super().__init__()
        if in_chans not in (None, 1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.save_hyperparameters()
        self._from_model: dict[str, Any] = {}
        self._classes: list[str] | None = None
        self._built_key: tuple | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _check_dataset(self) -> None:
        if self.hparams.dataset not in self.DATASETS:
            raise UnknownDatasetError(
                f"unknown {self.task} dataset {self.hparams.dataset!r}; "
                f"choose one of {sorted(self.DATASETS)}"
            )

    @property
    def _defaults(self) -> dict[str, Any]:
        return self.DATASETS[self.hparams.dataset]

    # ---- resolution order: user argument > configure_for_model > dataset default ----
    def _resolve(self, key: str) -> Any:
        value = self.hparams.get(key)
        if value is None:
            value = self._from_model.get(key)
        if value is None:
            value = self._defaults.get(key)
        return value

    @property
    def in_chans(self) -> int | None:
        return self._resolve("in_chans")

    @property
    def img_size(self) -> int | None:
        size = self._resolve("img_size")
        return None if size is None else int(size)

    @property
    def mean(self) -> tuple[float, ...] | None:
        mean = self._resolve("mean")
        return None if mean is None else fit_channels(mean, self.in_chans or 3)

    @property
    def std(self) -> tuple[float, ...] | None:
        std = self._resolve("std")
        return None if std is None else fit_channels(std, self.in_chans or 3)

    def given_input(self) -> dict[str, Any]:
        """The input values the user / data config set explicitly (None = not given)."""
        return {k: self.hparams.get(k) for k in ("img_size", "in_chans", "mean", "std", "interpolation", "crop_pct")}

    @property
    def dataset_defaults(self) -> dict[str, Any]:
        return dict(self._defaults)

    def configure_input(self, run_input: Any) -> "ZooDataModule":
        """Take the run's resolved input (:class:`zoo.spec.RunInput`: size, channels, mean/std,
        interpolation, crop); explicit hparams still win, so a value resolved elsewhere never hides one."""
        self._from_model = {k: v for k, v in run_input.as_dict().items() if v is not None}
        self.run_input = run_input
        return self

    def configure_for_model(self, input_size=None, mean=None, std=None) -> "ZooDataModule":
        """Take a model's default input size and normalisation where the user gave none (for a
        datamodule used without the runner; the runner calls :meth:`configure_input`)."""
        if input_size is not None:
            self._from_model["img_size"] = int(input_size[-1])
        if mean is not None:
            self._from_model["mean"] = tuple(float(m) for m in mean)
        if std is not None:
            self._from_model["std"] = tuple(float(s) for s in std)
        return self

    @property
    def interpolation(self) -> str:
        return self._resolve("interpolation") or "bicubic"

    @property
    def crop_pct(self) -> float:
        value = self._resolve("crop_pct")
        return 0.875 if value is None else float(value)

    # ---- classes: cheap to discover, so valid before setup as well ----
    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            self._classes = list(self._load_classes())
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def _load_classes(self) -> list[str]:
        """The dataset's class names (each datamodule reads them its own way)."""

    def model_kwargs(self) -> dict[str, Any]:
        return {"in_chans": 1} if self.in_chans == 1 else {}

    # ---- datasets ----
    def setup(self, stage: str | None = None) -> None:
        # Idempotent; rebuilds only if configure_for_model changed what the data depends on.
        key = (self.img_size, self.mean, self.std, self.in_chans, self.interpolation, self.crop_pct)
        if self._built_key == key:
            return
        self._build()
        self._built_key = key

    @abc.abstractmethod
    def _build(self) -> None:
        """Create train_set / val_set / test_set."""

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        kwargs: dict[str, Any] = dict(
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=self._collate(dataset),
        )
        if train:
            kwargs.update(
                # the order depends only on (seed, epoch): a resumed run sees the batches an
                # uninterrupted one would; the generator only seeds workers
                sampler=EpochShuffleSampler(len(dataset), int(hp.seed), resume_position=self._resume_position),
                generator=torch.Generator().manual_seed(int(hp.seed)),
                # a lone last sample breaks BatchNorm; drop it when there is more than a batch
                drop_last=len(dataset) > hp.batch_size and len(dataset) % hp.batch_size == 1,
            )
        return DataLoader(dataset, **kwargs)

    def _collate(self, dataset: Dataset) -> Callable | None:
        """The collate function of ``dataset``'s loader (the class's ``collate_fn``; None: torch's default)."""
        return type(self).collate_fn

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches when the trainer runs on CUDA (asynchronous host-to-device copies)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, items already trained on in it) when Lightning restores a fit from a checkpoint
        (asked when the first epoch starts: the loop state is loaded after the loader is built)."""
        trainer = getattr(self, "trainer", None)
        loop = getattr(trainer, "fit_loop", None)
        if loop is None or not loop.restarting:
            return 0, 0
        epoch = loop.epoch_progress.current.processed
        done = loop.epoch_loop.batch_progress.current.completed
        return epoch, done * self.hparams.batch_size if loop.epoch_progress.current.started > epoch else 0

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, train=False)


def skip_resumed(sampler: Any, order: list[int]) -> Iterator[int]:
    """``order`` less the items a mid-epoch checkpoint had trained on: the sampler's ``_resume_position() ->
    (epoch, skip)`` is asked once, at its first pass, and applies only when that pass is the checkpoint's epoch."""
    if sampler._resume_position is not None:
        epoch, skip = sampler._resume_position()
        sampler._resume_position = None
        if epoch == sampler.epoch:
            order = order[skip:]
    return iter(order)


class EpochShuffleSampler(Sampler[int]):
    """A seeded shuffle whose order is a function of ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` before every epoch, so a run restored from a checkpoint draws the
    same order as one that was never interrupted. ``resume_position() -> (epoch, skip)``, asked once
    at the first pass, drops the first ``skip`` items of that epoch: those a mid-epoch checkpoint
    had already trained on.
    """

    def __init__(self, n: int, seed: int, resume_position: Callable[[], tuple[int, int]] | None = None) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self._resume_position = resume_position

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return skip_resumed(self, torch.randperm(self.n, generator=g).tolist())


class IndexedTensorDataset(Dataset):
    """A view of in-memory ``images``/``targets`` through ``indices`` (positions in the source
    arrays, so splits share memory and can be checked for overlap); ``transform`` runs per
    item (augmentation, normalisation)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices, transform=None):
        self.images, self._targets = images, targets
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    @property
    def targets(self) -> torch.Tensor:
        return self._targets[torch.from_numpy(self.indices)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        x = self.images[j]
        if self.transform is not None:
            x = self.transform(x)
        return x, self._targets[j]
