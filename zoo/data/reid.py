"""Object re-identification datamodule: P x K identity-balanced training batches, query + gallery evaluation.

Batches:

- ``train_dataloader()``: ``(images float[B, C, H, W], pids long[B], camids long[B])``; ``pids`` are the
  training identities relabelled ``0..num_classes-1`` (sorted by original id), drawn ``P x K``
  (:class:`IdentitySampler`).
- ``val_dataloader()`` / ``test_dataloader()``: ONE loader over the query images then the gallery
  images, ``(images, pids long[B] ORIGINAL ids, camids long[B], is_query bool[B])``, in a fixed order;
  ``split_sizes(stage)`` gives ``{"query": nq, "gallery": ng}`` and ``eval_items(stage)`` the name of
  every item (its file) in loader order.

>>> dm = ReIDDataModule(dataset="digit_reid", batch_size=64, num_instances=4)
>>> images, pids, camids = next(iter(dm.train_dataloader()))     # 16 identities x 4 images
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from zoo.errors import DataFormatError, DatasetNotFoundError

from .common import IMAGENET_MEAN, IMAGENET_STD, ZooDataModule, default_root, skip_resumed
from .folders import SkipsUnreadable, eval_policy, open_image, train_policy
from .reid_datasets import LAYOUTS, READERS, ReIDRecords, render_digit_reid

_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3)
_PERSON = dict(img_size=(256, 128), padding=10, flip_prob=0.5, val_identities=0.05, **_IMAGENET)


def as_hw(size: Any) -> tuple[int, int]:
    """``img_size`` as ``(H, W)``: an int is a square side, a pair is (height, width)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        return int(size[0]), int(size[1])
    try:  # an OmegaConf ListConfig
        h, w = list(size)
        return int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be an int or a pair [height, width], got {size!r}") from None


# ------------------------------------------------------------------------------------------ sampler
class IdentitySampler(DistributedSampler):
    """P x K sampling (torchreid's / TransReID's ``RandomIdentitySampler``): every batch holds ``P``
    distinct identities with ``K`` images each, contiguous in the index stream (``DataLoader(batch_size=P*K)``).

    Per identity, its images are shuffled and cut into chunks of ``K`` (the remainder is left for this
    epoch, as torchreid does); an identity with fewer than ``K`` images gets one chunk drawn WITH
    replacement. Each step draws ``P * world_size`` distinct identities uniformly among those with a
    chunk left and takes one chunk of each; where fewer remain, every identity gets a fresh shuffled pass
    (so every batch keeps P distinct identities and the epoch length is fixed).

    Epoch length, per rank: ``C // (P * world_size)`` batches of ``P * K`` items, with
    ``C = sum_i max(n_i, K) // K`` (the chunk count; ``n_i`` = images of identity i): about one pass over
    the training images. The order is a function of ``(seed, epoch)`` alone (``set_epoch`` moves it).

    DDP: every rank computes the same stream; at each step the ``P * world_size`` identities are split
    into rank slices, so ranks draw DIFFERENT identities. It subclasses ``DistributedSampler`` so that
    Lightning uses it as is (a plain sampler would be wrapped and its P x K groups split across ranks).
    ``resume_position() -> (epoch, items already trained on this rank)`` skips them on a mid-epoch restore.
    """

    def __init__(self, pids: Sequence[int], *, num_identities: int, num_instances: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None,
                 resume_position: Callable[[], tuple[int, int]] | None = None) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        pids = np.asarray(pids, dtype=np.int64)
        super().__init__(pids, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.P, self.K = int(num_identities), int(num_instances)
        self.ids = np.unique(pids)
        self.by_id = {int(p): np.flatnonzero(pids == p) for p in self.ids}
        self._resume_position = resume_position
        group = self.P * self.num_replicas
        if len(self.ids) < group:
            raise DataFormatError(
                f"P x K sampling needs {group} distinct training identities per step (P={self.P} per batch"
                f"{f' x {self.num_replicas} ranks' if self.num_replicas > 1 else ''}) but the training set has "
                f"{len(self.ids)}: lower data.batch_size (P = batch_size // num_instances) or raise data.num_instances")
        chunks = sum(max(len(v), self.K) // self.K for v in self.by_id.values())
        self.steps = chunks // group

    def __len__(self) -> int:
        return self.steps * self.P * self.K

    def _chunks(self, pid: int, rng: np.random.Generator) -> list[np.ndarray]:
        idx = self.by_id[pid]
        idx = rng.choice(idx, self.K, replace=True) if len(idx) < self.K else rng.permutation(idx)
        return [idx[j * self.K:(j + 1) * self.K] for j in range(len(idx) // self.K)]

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, each ``[P * K]`` dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = {int(p): deque(self._chunks(int(p), rng)) for p in self.ids}
        group, out = self.P * self.num_replicas, []
        for _ in range(self.steps):
            avail = [p for p, q in queues.items() if q]
            if len(avail) < group:  # a fresh pass for every identity
                for p in queues:
                    queues[p].extend(self._chunks(p, rng))
                avail = list(queues)
            chosen = rng.choice(avail, group, replace=False)
            mine = chosen[self.rank * self.P:(self.rank + 1) * self.P]
            taken = {int(p): queues[int(p)].popleft() for p in chosen}
            out.append(np.concatenate([taken[int(p)] for p in mine]))
        return out

    def __iter__(self):
        return skip_resumed(self, np.concatenate(self.batches()).tolist() if self.steps else [])


class EvalSampler(DistributedSampler):
    """Every item, in order, on every rank: retrieval needs the whole query + gallery set, and Lightning's
    DistributedSampler would split it and pad it with repeated items. Under DDP each rank therefore
    evaluates everything (identical metrics on every rank, no gathering)."""

    def __init__(self, n: int) -> None:
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=False)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n))


# ------------------------------------------------------------------------------------------ datasets
class ReIDImageList(SkipsUnreadable, Dataset):
    """Records ``(path, pid, camid[, is_query])`` read with PIL. Training items give ``(image, pid, camid)``
    and an unreadable training image (``bad_images='skip'``) is replaced by another image of the SAME
    identity, so a P x K batch keeps its K; evaluation items give ``(image, pid, camid, is_query)`` and
    follow :class:`~zoo.data.folders.SkipsUnreadable` (error, or left out of query/gallery with 'skip')."""

    def __init__(self, records, transform=None, in_chans: int = 3, bad_images: str = "skip", split: str = "train"):
        self.records = list(records)
        self.transform, self.in_chans = transform, in_chans
        self._check_policy(bad_images, split)
        if split != "train" and bad_images == "skip":
            self._leave_out_unreadable()
        self._same_id: dict[int, list[int]] = {}
        for i, r in enumerate(self.records):
            self._same_id.setdefault(r[1], []).append(i)

    def _files(self, item) -> tuple:
        return (item[0],)

    def _items(self) -> list:
        return self.records

    def _set_items(self, items: list) -> None:
        self.records = items

    def _read_check(self, item) -> None:
        open_image(item[0], self.in_chans)

    def __len__(self) -> int:
        return len(self.records)

    def _replacement(self, i: int, fallback: int) -> int:
        mates = [j for j in self._same_id[self.records[i][1]] if str(self.records[j][0]) not in self.skipped]
        return mates[0] if mates else fallback

    def __getitem__(self, i: int):
        while True:
            rec = self.records[i]
            try:
                img = open_image(rec[0], self.in_chans)
                break
            except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated file
                i = self._replacement(i, self._unreadable(rec[0], e, i))
        if self.transform is not None:
            img = self.transform(img)
        return (img.as_subclass(torch.Tensor) if isinstance(img, torch.Tensor) else img, *rec[1:])


class ReIDTensorSet(Dataset):
    """In-memory ``uint8 [N, C, H, W]`` images (the demo) behind the same records and item contract."""

    def __init__(self, images: torch.Tensor, records, transform=None, names: Sequence[str] | None = None):
        self.images, self.records, self.transform = images, list(records), transform
        self.names = list(names) if names is not None else [str(r[0]) for r in self.records]
        self.left_out = None

    def __len__(self) -> int:
        return len(self.records)

    def item_names(self, indices) -> list[str]:
        return [self.names[i] for i in indices]

    def __getitem__(self, i: int):
        rec = self.records[i]
        img = self.images[rec[0]]
        if self.transform is not None:
            img = self.transform(img)
        return (img.as_subclass(torch.Tensor), *rec[1:])  # plain tensors: tv_tensors would survive collation


# ------------------------------------------------------------------------------------------ datamodule
class ReIDDataModule(ZooDataModule):
    """``dataset``: ``digit_reid`` (embedded, no download), ``market1501``, ``dukemtmc``, ``msmt17``,
    ``veri776`` (published layouts under ``root``; see :mod:`zoo.data.reid_datasets`).

    Input size: ``img_size`` is an int (square) or ``[H, W]``; without it the dataset's protocol size is
    used (256x128 persons, 256x256 VeRi, 32x16 digit_reid). Documented choice: a Re-ID protocol fixes the
    input, so the dataset's size wins over a model's default (``configure_for_model``/``configure_input``
    still give mean/std, interpolation); ``img_hw`` and ``img_size`` are ``(H, W)``. The net must be built
    for it: give ``img_size=dm.img_hw`` to nets that take one (timm ViTs accept a pair). ``given_input()``
    leaves ``img_size`` out because the run-input resolver (``zoo.spec.resolve_run_input``) takes square ints.

    Training: ``batch_size = P x K`` with ``K = num_instances`` (default 4; ``batch_size`` must be a
    multiple of it; under DDP it is per rank), drawn by :class:`IdentitySampler`. ``num_classes`` = the number of training
    identities after the val hold-out, ``class_names`` their original ids (``'0002'``).
    Augmentation (TransReID's): resize to ``(H, W)``, horizontal flip (``flip_prob``; None = the dataset's:
    0.5, but 0 for digit_reid, whose digits are not mirror-symmetric), pad ``padding`` px (10; 2 for digit_reid)
    + random crop back to ``(H, W)``, normalise, random erasing (``erasing_prob``; timm's
    ``RandomErasing(mode='pixel', max_count=1)``, applied after normalisation as TransReID does);
    ``augment=false`` keeps only resize + normalise. Evaluation: resize + normalise.

    Test = the dataset's published query/gallery. Val never reuses the test set: ``val_identities``
    (a fraction of the training identities, or an int count; None = the dataset's default, 5 % for the
    real sets, 20 identities for digit_reid) are held out of training, chosen (seeded) among the
    identities seen by two or more cameras so every val query has a cross-camera match; of their images
    the query is one seeded image per (identity, camera) and the gallery is the rest.
    ``val_identities=0``: no validation; ``val_dataloader()`` returns ``[]``, which Lightning takes as
    "no val batches" and skips validation (callbacks that monitor a ``val/`` metric then have nothing to
    monitor: checkpoint on the last epoch instead).

    ``combine_val`` (MSMT17): add ``list_val.txt`` to training (TransReID; default) or not (torchreid).
    ``bad_images``: as the other datamodules (unset = skip in training, error in val/test); a skipped
    training image is replaced by another image of its identity.
    """

    task = "reid"
    DATASETS = {
        "digit_reid": dict(img_size=(32, 16), padding=2, flip_prob=0.0, val_identities=20, **_IMAGENET),
        "market1501": dict(_PERSON),
        "dukemtmc": dict(_PERSON),
        "msmt17": dict(_PERSON),
        "veri776": dict(_PERSON, img_size=(256, 256)),
    }

    def __init__(
        self,
        *,
        dataset: str = "digit_reid",
        batch_size: int = 64,
        num_instances: int = 4,
        val_identities: float | int | None = None,
        padding: int | None = None,
        flip_prob: float | None = None,
        erasing_prob: float = 0.5,
        combine_val: bool = True,
        bad_images: str | None = None,
        img_size: int | list[int] | tuple[int, int] | None = None,  # [H, W] (an int: square)
        **common: Any,
    ) -> None:
        if img_size is not None:
            img_size = list(as_hw(img_size))
        super().__init__(dataset=dataset, batch_size=batch_size, img_size=img_size, **common)
        self._check_dataset()
        if num_instances < 1 or batch_size % num_instances or batch_size < num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instances "
                             f"({num_instances}): a batch is P identities x K={num_instances} images")
        self._parts: dict[str, list] | None = None

    # ------------------------------------------------------------------ input
    @property
    def img_hw(self) -> tuple[int, int]:
        """(H, W) of every batch: ``img_size`` if given, else the dataset's protocol size."""
        size = self.hparams.img_size
        return as_hw(size if size is not None else self._defaults["img_size"])

    @property
    def img_size(self) -> tuple[int, int]:
        return self.img_hw

    def given_input(self) -> dict[str, Any]:
        return {**super().given_input(), "img_size": None}  # resolved here: (H, W), not a square int

    @property
    def num_identities_per_batch(self) -> int:
        """P."""
        return self.hparams.batch_size // self.hparams.num_instances

    # ------------------------------------------------------------------ records and splits
    @property
    def root(self) -> Path:
        if self.hparams.root is not None:
            return Path(self.hparams.root).expanduser()
        if self.hparams.dataset in READERS:
            name = self.hparams.dataset
            raise DatasetNotFoundError(f"dataset={name} needs data.root=PATH\nExpected layout under it:\n"
                                       f"{LAYOUTS[name].rstrip()}")
        return default_root()

    def _records(self) -> ReIDRecords:
        name = self.hparams.dataset
        if name == "digit_reid":
            return render_digit_reid()[1]
        if name == "msmt17":
            return READERS[name](self.root, combine_val=self.hparams.combine_val)
        return READERS[name](self.root)

    def _val_count(self, n_ids: int) -> int:
        v = self.hparams.val_identities
        if v is None:
            v = self._defaults["val_identities"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and v >= 1):
            raise ValueError(f"val_identities must be a fraction in [0, 1) of the training identities or an int "
                             f"count >= 0, got {v!r}")
        if isinstance(v, float):
            return 0 if v == 0 else max(1, round(v * n_ids))
        return int(v)

    def _partition(self) -> dict[str, list]:
        """train (relabelled) / val / test records; cheap (no image is decoded), cached."""
        if self._parts is not None:
            return self._parts
        rec = self._records()
        if not rec.train:
            raise DatasetNotFoundError(f"{self.hparams.dataset}: no training images (junk/distractors only?)")
        if not rec.query or not rec.gallery:
            raise DatasetNotFoundError(f"{self.hparams.dataset}: the test split has no "
                                       f"{'query' if not rec.query else 'gallery'} images")
        ids = sorted({r[1] for r in rec.train})
        cams: dict[int, set] = {}
        for r in rec.train:
            cams.setdefault(r[1], set()).add(r[2])
        n_val = self._val_count(len(ids))
        eligible = [p for p in ids if len(cams[p]) >= 2]
        if n_val > len(eligible) or n_val >= len(ids):
            raise DataFormatError(
                f"val_identities asks for {n_val} held-out identities but only {len(eligible)} of the {len(ids)} "
                "training identities are seen by two or more cameras (and some must stay for training): lower "
                "data.val_identities (0 = no validation)")
        rng = np.random.default_rng([int(self.hparams.seed), 22])
        val_ids = set(rng.choice(eligible, n_val, replace=False).tolist()) if n_val else set()
        train_ids = [p for p in ids if p not in val_ids]
        label = {p: i for i, p in enumerate(train_ids)}
        train = [(r[0], label[r[1]], r[2]) for r in rec.train if r[1] in label]
        val_q, val_g = [], []
        groups: dict[tuple[int, int], list] = {}
        for r in rec.train:
            if r[1] in val_ids:
                groups.setdefault((r[1], r[2]), []).append(r)
        for key in sorted(groups):
            items = groups[key]
            q = int(rng.integers(len(items)))
            val_q.append(items[q])
            val_g += [r for j, r in enumerate(items) if j != q]
        self._parts = dict(
            train=train, classes=[f"{p:04d}" for p in train_ids],
            val=[(*r, True) for r in val_q] + [(*r, False) for r in val_g],
            test=[(*r, True) for r in rec.query] + [(*r, False) for r in rec.gallery],
        )
        return self._parts

    def _load_classes(self) -> list[str]:
        return list(self._partition()["classes"])

    # ------------------------------------------------------------------ transforms
    def _transform(self, train: bool, from_file: bool) -> v2.Compose:
        h, w = self.img_hw
        mode = v2.InterpolationMode(self.interpolation)
        ops: list = [v2.ToImage()] if from_file else []
        if not from_file and self.in_chans == 1:
            ops.append(v2.Grayscale(1))
        ops.append(v2.Resize((h, w), interpolation=mode, antialias=True))
        hp = self.hparams
        aug = train and hp.augment
        if aug:
            pad = hp.padding if hp.padding is not None else self._defaults["padding"]
            flip = hp.flip_prob if hp.flip_prob is not None else self._defaults["flip_prob"]
            ops += [v2.RandomHorizontalFlip(flip)] if flip > 0 else []
            ops += [v2.Pad(int(pad)), v2.RandomCrop((h, w))]
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        if aug and hp.erasing_prob > 0:
            from timm.data.random_erasing import RandomErasing

            ops.append(RandomErasing(probability=hp.erasing_prob, mode="pixel", max_count=1, device="cpu"))
        return v2.Compose(ops)

    def eval_transform(self) -> v2.Compose:
        """What val/test do to one image file (a PIL image): resize to ``img_hw`` + normalise."""
        return self._transform(False, from_file=True)

    # ------------------------------------------------------------------ datasets
    def _build(self) -> None:
        parts = self._partition()
        self._classes = list(parts["classes"])
        if self.hparams.dataset == "digit_reid":
            return self._build_digits(parts)
        c, b = self.in_chans, self.hparams.bad_images
        self.train_set = ReIDImageList(parts["train"], self._transform(True, True), c, bad_images=train_policy(b))
        self.val_set = (ReIDImageList(parts["val"], self._transform(False, True), c, bad_images=eval_policy(b),
                                      split="val") if parts["val"] else None)
        self.test_set = ReIDImageList(parts["test"], self._transform(False, True), c, bad_images=eval_policy(b),
                                      split="test")

    def _build_digits(self, parts) -> None:
        images, _ = render_digit_reid()
        h, w = self.img_hw
        if (h, w) != tuple(images.shape[-2:]):  # resized once here, so per-item work is augmentation only
            images = F.interpolate(images.float(), size=(h, w), mode="bilinear", antialias=True,
                                   align_corners=False).round_().clamp_(0, 255).to(torch.uint8)

        def names(recs, split):  # e.g. digit_reid/test/query/0007_c2_row123 (row: index in the rendered set)
            role = [("query" if r[3] else "gallery") + "/" if len(r) > 3 else "" for r in recs]
            return [f"digit_reid/{split}/{q}{r[1]:04d}_c{r[2] + 1}_row{r[0]}" for q, r in zip(role, recs)]

        self.train_set = ReIDTensorSet(images, parts["train"], self._transform(True, False), names(parts["train"], "train"))
        self.val_set = (ReIDTensorSet(images, parts["val"], self._transform(False, False), names(parts["val"], "val"))
                        if parts["val"] else None)
        self.test_set = ReIDTensorSet(images, parts["test"], self._transform(False, False), names(parts["test"], "test"))

    # ------------------------------------------------------------------ evaluation bookkeeping
    def _eval_set(self, stage: str):
        self.setup(stage)
        if stage in ("val", "validate", "validation", "fit"):
            return self.val_set
        if stage == "test":
            return self.test_set
        raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")

    def _eval_records(self, ds) -> list:
        return ds.records if ds is not None else []

    def split_sizes(self, stage: str) -> dict[str, int]:
        """``{"query": nq, "gallery": ng}`` of the val or test loader (the first nq items are the queries;
        after unreadable images were left out with ``bad_images='skip'``)."""
        recs = self._eval_records(self._eval_set(stage))
        nq = sum(1 for r in recs if r[3])
        return {"query": nq, "gallery": len(recs) - nq}

    def eval_items(self, stage: str) -> list[str]:
        """The name (file) of every item of the val or test loader, in loader order."""
        ds = self._eval_set(stage)
        return ds.item_names(range(len(ds))) if ds is not None else []

    # ------------------------------------------------------------------ loaders
    def _common_loader_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        hp = self.hparams
        sampler = IdentitySampler([r[1] for r in self.train_set.records], num_identities=self.num_identities_per_batch,
                                  num_instances=hp.num_instances, seed=int(hp.seed),
                                  resume_position=self._resume_position)
        return DataLoader(self.train_set, batch_size=hp.batch_size, sampler=sampler, drop_last=False,
                          generator=torch.Generator().manual_seed(int(hp.seed)), **self._common_loader_kwargs())

    def _eval_loader(self, ds) -> DataLoader:
        return DataLoader(ds, batch_size=self.hparams.batch_size, sampler=EvalSampler(len(ds)),
                          **self._common_loader_kwargs())

    def val_dataloader(self):
        self.setup("validate")
        if self.val_set is None:
            return []  # val_identities=0: Lightning runs no validation
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._eval_loader(self.test_set)


__all__ = ["ReIDDataModule", "IdentitySampler", "EvalSampler", "ReIDImageList", "ReIDTensorSet", "as_hw"]
