"""Semantic segmentation datamodule: batches ``(image float[B, C, H, W], mask long[B, H, W])``,
mask value 255 = ignore. Transforms are joint (v2 + ``tv_tensors.Mask``): the mask follows
every geometric change of the image and is resized with nearest neighbours."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from zoo.errors import DatasetNotFoundError
from zoo.volume_metrics import SIDECAR, index_volumes, natural_key, volume_of

from .common import IMAGENET_MEAN, IMAGENET_STD, ZooDataModule, require_dir, split_indices
from .embedded import SHAPE_CLASSES, ShapesDataset, make_shapes
from .folders import SEGFOLDER_LAYOUT, SegFolderDataset, eval_policy, scan_segfolder, train_policy
from .standard_seg import STANDARD_SEG, read_standard_seg

IGNORE_INDEX = 255
SHAPES_SIZE = 64  # scenes are drawn at 64 px and resized per item if the model wants more


class SegmentationDataModule(ZooDataModule):
    """``dataset``: ``shapes`` (embedded, ``num_train``/``num_val``/``num_test`` scenes) or
    ``segfolder`` (``root/{split}/images/*`` + ``root/{split}/masks/*.png``, or CHAOS-style
    ``root/{split}/Img/*`` + ``root/{split}/GT/*``; needs ``num_classes``; ``value_map`` maps grey
    levels to class ids, unmapped values -> 255). Augmentation of folders: ``crop_scale`` (random
    resized crop; ``null`` = plain resize), horizontal flip, ``vflip``, ``rotate_degrees``, all joint.
    ``spacing`` (pixel size, (row, column) or one number; ``[dz, dy, dx]`` for volumes) scales the test
    surface distances.

    Volumes (``segfolder``): ``volume_key``, a regex searched in each image's path relative to ``root``
    (e.g. ``test/Img/Subj_21slice_3.png``), names the volume a slice belongs to (group ``volume``, else the
    first group) and, with a group ``slice``, its slice index; ``slice_key`` is a regex for the slice index
    alone; with neither, slices are stacked in the natural order of their file names. The test split is
    then also scored per 3-D volume (:mod:`zoo.volume_metrics`), with the voxel spacing from
    ``spacing=[dz, dy, dx]`` (or one number), else ``root/spacing.json`` (what ``python -m zoo prepare``
    writes), else in voxels. A missing val/test folder is then a seeded split of train's *volumes*, never
    of their slices. A test volume with a missing or repeated slice index is an error naming it.

    Standard datasets (``zoo.data.standard_seg``): ``ade20k``, ``pet_trimaps`` from their published layouts.
    ``eval_resize``: ``square`` (default: val/test resized to ``img_size`` squared), ``short_side`` (short
    side to ``img_size``, aspect kept; val/test batches of one) or ``none`` (native size, batches of one).
    ``inference``: ``{mode: whole}`` or ``{mode: slide, crop: 512, stride: 341}``, read by the segmentation
    task at validation and test time."""

    task = "segmentation"
    DATASETS = {
        "shapes": dict(img_size=SHAPES_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3),
        "segfolder": dict(img_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3),
        "ade20k": dict(img_size=512, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3),
        "pet_trimaps": dict(img_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3),
    }

    def __init__(
        self,
        *,
        dataset: str = "shapes",
        batch_size: int = 16,
        num_classes: int | None = None,
        class_names: list | None = None,
        value_map: dict | None = None,
        rotate_degrees: float = 0.0,
        crop_scale: tuple | None = (0.5, 1.0),
        vflip: bool = False,
        spacing: float | list | None = None,
        volume_key: str | None = None,
        slice_key: str | None = None,
        eval_resize: str = "square",
        inference: dict | None = None,
        bad_images: str | None = None,
        num_train: int = 1000,
        num_val: int = 200,
        num_test: int = 200,
        **common: Any,
    ) -> None:
        if dataset in STANDARD_SEG:  # fixed by the dataset, resolved before saving (as shapes below)
            num_classes = STANDARD_SEG[dataset].num_classes
        if eval_resize not in ("square", "short_side", "none"):
            raise ValueError(f"eval_resize must be 'square', 'short_side' or 'none', got {eval_resize!r}")
        if dataset == "shapes":
            if num_classes not in (None, len(SHAPE_CLASSES)):
                raise ValueError(f"shapes has {len(SHAPE_CLASSES)} classes {SHAPE_CLASSES}, not {num_classes}")
            # resolved before saving: Lightning refuses to log a datamodule whose num_classes
            # hparam differs from the task module's (it reads these locals)
            num_classes = len(SHAPE_CLASSES)
        super().__init__(dataset=dataset, batch_size=batch_size, **common)  # saves the hyper-parameters
        self._check_dataset()
        self._scenes = None  # (key, drawn shapes): drawing once serves every img_size
        if dataset == "segfolder" and num_classes is None:
            raise ValueError("dataset=segfolder needs num_classes (mask values 0..num_classes-1, 255 = ignore)")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        if (volume_key or slice_key) and dataset != "segfolder":
            raise ValueError(f"data.volume_key / data.slice_key name the volumes of segfolder slices; dataset={dataset} "
                             "has none")
        if slice_key and not volume_key:
            raise ValueError("data.slice_key orders the slices of volumes: give data.volume_key too")
        for name, pattern in (("volume_key", volume_key), ("slice_key", slice_key)):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"data.{name}={pattern!r} is not a regular expression ({e})") from None

    @property
    def inference(self) -> dict | None:
        return dict(self.hparams.inference) if self.hparams.inference else None

    def _standard(self):
        if getattr(self, "_std_splits", None) is None:
            hp = self.hparams
            if hp.root is None:
                spec = STANDARD_SEG[hp.dataset]
                raise DatasetNotFoundError(f"dataset={hp.dataset} needs data.root=PATH\nExpected layout under it:\n"
                                           f"{spec.layout}\nHow to get it: {spec.get}")
            self._std_splits = read_standard_seg(hp.dataset, Path(hp.root), download=hp.download)
        return self._std_splits

    def _loader(self, dataset, train: bool):
        if train or self.hparams.eval_resize == "square":
            return super()._loader(dataset, train)
        from torch.utils.data import DataLoader  # images keep their own sizes: one per batch

        hp = self.hparams
        return DataLoader(dataset, batch_size=1, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
                          pin_memory=self.pin_memory, collate_fn=type(self).collate_fn)

    def _load_classes(self) -> list[str]:
        hp = self.hparams
        if hp.dataset in STANDARD_SEG and not hp.class_names:
            return list(self._standard().classes)
        if hp.dataset == "shapes":
            return list(SHAPE_CLASSES)
        return [str(c) for c in hp.class_names] if hp.class_names else [f"class_{i}" for i in range(hp.num_classes)]

    # ------------------------------------------------------------------ transforms
    def _transforms(self, train: bool, native: int | None = None) -> v2.Compose:
        """Joint transforms; ``native`` is the stored size of already-square data (shapes)."""
        hp, s = self.hparams, self.img_size
        augment = train and hp.augment
        if native is None and not train and hp.eval_resize != "square":  # evaluation at (near) native size
            ops = [v2.Resize(s, antialias=True)] if hp.eval_resize == "short_side" else []
        elif native is None:  # photos of any size and aspect
            if augment and hp.crop_scale:
                ops = [v2.RandomResizedCrop(s, scale=tuple(hp.crop_scale), antialias=True), v2.RandomHorizontalFlip()]
            else:
                ops = [v2.Resize((s, s), antialias=True)] + ([v2.RandomHorizontalFlip()] if augment else [])
            if augment and hp.get("vflip"):  # slices (CHAOS): any flip is still anatomy
                ops.append(v2.RandomVerticalFlip())
        else:  # drawn square scenes: any flip is still a valid scene
            ops = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()] if augment else []
            if native != s:
                ops.append(v2.Resize((s, s), antialias=True))
        if augment and hp.rotate_degrees:
            fill = {tv_tensors.Mask: IGNORE_INDEX, "others": 0}  # rotated-in corners are ignored
            ops.append(v2.RandomRotation(hp.rotate_degrees, fill=fill))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(ops)

    def eval_transform(self) -> v2.Compose:
        """What val/test do to an image file (a ``tv_tensors.Image``, with or without its mask): ``zoo
        predict`` uses it too, so it sees what evaluation sees."""
        return self._transforms(False)

    # ------------------------------------------------------------------ datasets
    def _build(self) -> None:
        if self.hparams.dataset in STANDARD_SEG:
            self._build_standard_seg()
        elif self.hparams.dataset == "shapes":
            self._build_shapes()
        else:
            self._build_segfolder()

    def _build_shapes(self) -> None:
        hp = self.hparams
        n = hp.num_train + hp.num_val + hp.num_test
        if self._scenes is None or self._scenes[0] != (n, hp.seed):
            self._scenes = ((n, hp.seed), make_shapes(n, size=SHAPES_SIZE, seed=hp.seed))
        images, masks = self._scenes[1]
        if self.in_chans == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        bounds = np.cumsum([0, hp.num_train, hp.num_val, hp.num_test])
        sets = []
        for k, train in enumerate((True, False, False)):
            lo, hi = bounds[k], bounds[k + 1]
            tf = self._transforms(train, native=SHAPES_SIZE)
            sets.append(ShapesDataset(images[lo:hi], masks[lo:hi], np.arange(lo, hi), tf))
        self.train_set, self.val_set, self.test_set = sets

    def _build_segfolder(self) -> None:
        hp = self.hparams
        if hp.root is None:
            raise DatasetNotFoundError(f"dataset=segfolder needs data.root\nExpected layout:\n{SEGFOLDER_LAYOUT}")
        root = Path(hp.root).expanduser()
        train = scan_segfolder(require_dir(root / "train", "segfolder", SEGFOLDER_LAYOUT))
        has = {s: (root / s).is_dir() for s in ("val", "test")}
        # with volumes, the seeded split is over volumes: a volume's slices stay together
        by_volume = hp.volume_key and not (has["val"] and has["test"])
        groups = [volume_of(str(img), root, hp.volume_key)[0] for img, _ in train] if by_volume else None
        units = sorted(set(groups), key=natural_key) if groups else None
        tr, va, te = split_indices(
            len(units) if units else len(train), None, need_val=not has["val"], need_test=not has["test"],
            val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed,
        )
        if units:
            chosen = [{units[k] for k in part} for part in (tr, va, te)]
            tr, va, te = ([i for i, g in enumerate(groups) if g in c] for c in chosen)
        pairs = {
            "train": [train[i] for i in tr],
            "val": scan_segfolder(root / "val") if has["val"] else [train[i] for i in va],
            "test": scan_segfolder(root / "test") if has["test"] else [train[i] for i in te],
        }
        self._seg_sets(pairs["train"], pairs["val"], pairs["test"], hp.value_map)
        if hp.volume_key:
            ts = self.test_set
            ts.volumes = index_volumes(ts.item_names(range(len(ts))), root, hp.volume_key, slice_key=hp.slice_key,
                                       spacing=hp.spacing, sidecar=root / SIDECAR, split="test")

    def _build_standard_seg(self) -> None:
        hp, sp = self.hparams, self._standard()
        train, val = sp.train, sp.val
        if val is None:  # a seeded part of the official training set validates; test = the official split
            tr, va, _ = split_indices(len(train), None, need_val=True, need_test=False,
                                      val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed)
            train, val = [sp.train[i] for i in tr], [sp.train[i] for i in va]
        self._seg_sets(train, val, sp.test, hp.value_map or sp.value_map)

    def _seg_sets(self, train, val, test, value_map) -> None:
        """``bad_images``: unset = skip (replace and count) in training, error in val/test; ``skip`` also
        leaves unreadable val/test pairs out (counted as ``val/skipped``, ``test/skipped``), never replaced."""
        hp = self.hparams
        kw = dict(num_classes=hp.num_classes, value_map=value_map, in_chans=self.in_chans)
        b = hp.bad_images
        self.train_set = SegFolderDataset(train, transform=self._transforms(True), bad_images=train_policy(b), **kw)
        self.val_set = SegFolderDataset(val, transform=self._transforms(False), bad_images=eval_policy(b), split="val",
                                        **kw)
        self.test_set = SegFolderDataset(test, transform=self._transforms(False), bad_images=eval_policy(b),
                                         split="test", **kw)
