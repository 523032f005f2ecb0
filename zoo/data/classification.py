"""Image classification datamodule: batches ``(image float[B, C, H, W], label long[B])``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from zoo.errors import DatasetNotFoundError

from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IndexedTensorDataset,
    ZooDataModule,
    default_root,
    require_dir,
    split_indices,
)
from .device_decode import DeviceDecoder, EncodedBatch, collate_encoded
from .embedded import DIGIT_CLASSES, load_digits_tensor
from .standard import STANDARD, read_standard
from .folders import (
    CIFAR,
    CIFAR_NUM_CLASSES,
    IMAGEFOLDER_LAYOUT,
    EncodedImageList,
    ImageList,
    cifar_missing,
    eval_policy,
    train_policy,
    download_cifar,
    find_classes,
    load_cifar,
    scan_imagefolder,
)

_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3)


class ClassificationDataModule(ZooDataModule):
    """``dataset``: ``digits`` (embedded), ``imagefolder`` (``root/{train,val,test}/CLASS/*``),
    ``cifar10``/``cifar100`` (torchvision pickles under ``root``), or a standard dataset read from its
    published layout (``zoo.data.standard``: imagenet, cub200, stanford_dogs, stanford_cars,
    fgvc_aircraft, oxford_pets, flowers102, food101).

    ``resize_ratio``: resize the short side to ``round(img_size * resize_ratio)``, then crop ``img_size``
    (random crop + flip in training, centre crop otherwise): the FGVC pipeline (resize 550, crop 448) is
    ``img_size=448, resize_ratio=1.2277`` and follows ``img_size`` when it is overridden. Without it,
    training uses RandomResizedCrop and evaluation a centre crop of the run's ``crop_pct`` with its
    ``interpolation`` (the model spec's, i.e. its weights' preprocessing, unless the data config sets them).

    ``gpu_decode``: the workers only read the files and JPEGs are decoded on the trainer's device, batched
    (:mod:`zoo.data.device_decode`); for file datasets without ``timm_aug`` (timm's transforms are PIL's).

    ``timm_aug``: keyword arguments of ``timm.data.create_transform`` for the training images of file
    datasets (the DeiT recipe: ``auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
    interpolation='bicubic'``); timm's RandomResizedCrop then replaces the crop above. Evaluation
    transforms are unchanged. Mixup/cutmix are batch-level and live in the task (``optim.mixup_alpha``).

    Missing val/test splits are seeded stratified splits of train (``val_fraction``,
    ``test_fraction`` of it); ``digits`` is split 70/10/20 of all 1,797 images by default.
    """

    task = "classification"
    DATASETS = {
        "digits": dict(img_size=32, **_IMAGENET),
        "imagefolder": dict(img_size=224, **_IMAGENET),
        "cifar10": dict(img_size=32, **_IMAGENET),
        "cifar100": dict(img_size=32, **_IMAGENET),
        **{name: dict(img_size=224, **_IMAGENET) for name in STANDARD},
    }

    def __init__(
        self,
        *,
        dataset: str = "digits",
        batch_size: int = 64,
        verify_checksums: bool = True,
        resize_ratio: float | None = None,
        timm_aug: dict | None = None,
        bad_images: str | None = None,
        allow_empty_classes: bool = False,
        gpu_decode: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(dataset=dataset, batch_size=batch_size, **common)
        self._check_dataset()
        if gpu_decode and (dataset in CIFAR or dataset == "digits"):
            raise ValueError(f"data.gpu_decode decodes image files; dataset={dataset} is held in memory "
                             "(set data.gpu_decode=false)")
        if gpu_decode and timm_aug:
            raise ValueError("data.gpu_decode does not run timm's training transforms (they are PIL's); "
                             "set data.timm_aug=null or data.gpu_decode=false")
        self._decoder = None

    # ------------------------------------------------------------------ classes
    @property
    def root(self) -> Path:
        hp = self.hparams
        if hp.root is not None:
            return Path(hp.root).expanduser()
        if hp.dataset in STANDARD:
            raise DatasetNotFoundError(
                f"dataset={hp.dataset} needs data.root=PATH\nExpected layout under it:\n"
                f"{STANDARD[hp.dataset].layout}\nHow to get it: {STANDARD[hp.dataset].get}"
            )
        if hp.dataset == "imagefolder":
            raise DatasetNotFoundError(
                f"dataset=imagefolder needs data.root\nExpected layout:\n{IMAGEFOLDER_LAYOUT}"
            )
        return default_root()

    @property
    def num_classes(self) -> int:
        if self._classes is None and self.hparams.dataset in CIFAR_NUM_CLASSES:
            return CIFAR_NUM_CLASSES[self.hparams.dataset]  # known without touching the disk
        return super().num_classes

    def _load_classes(self) -> list[str]:
        name = self.hparams.dataset
        if name == "digits":
            return list(DIGIT_CLASSES)
        if name in STANDARD:
            return self._standard_splits().classes
        if name == "imagefolder":
            train = require_dir(self.root / "train", "imagefolder", IMAGEFOLDER_LAYOUT)
            return find_classes(train, allow_empty=self.hparams.allow_empty_classes)
        self.prepare_data()
        return load_cifar(name, self.root, train=False, verify_checksums=self.hparams.verify_checksums)[2]

    def prepare_data(self) -> None:
        name = self.hparams.dataset
        if name in CIFAR and self.hparams.download and cifar_missing(name, self.root):
            download_cifar(name, self.root)

    # ------------------------------------------------------------------ transforms
    def _to_float(self) -> list:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def _folder_transforms(self, train: bool):
        if train and self.hparams.augment and self.hparams.timm_aug:
            from timm.data import create_transform

            return create_transform(self.img_size, is_training=True, mean=self.mean, std=self.std,
                                    **dict(self.hparams.timm_aug))
        return v2.Compose([v2.ToImage(), *self._geometry(train), *self._to_float()])

    def _geometry(self, train: bool) -> list:
        """The crop / resize / flip of a file image (PIL image or uint8 tensor), before scaling to float."""
        s, ratio = self.img_size, self.hparams.resize_ratio
        if ratio is not None:  # resize then crop (FGVC: 550 -> 448)
            r = round(s * ratio)
            crop = v2.RandomCrop(s) if train and self.hparams.augment else v2.CenterCrop(s)
            flip = [v2.RandomHorizontalFlip()] if train and self.hparams.augment else []
            geo = [v2.Resize(r, antialias=True), crop, *flip]
        elif train and self.hparams.augment:
            geo = [v2.RandomResizedCrop(s, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        else:  # the model's centre crop (its pretrained_cfg crop_pct and interpolation)
            mode = v2.InterpolationMode(self.interpolation)
            geo = [v2.Resize(int(s / self.crop_pct), interpolation=mode, antialias=True), v2.CenterCrop(s)]
        return geo

    # ------------------------------------------------------------------ decoding on the device
    def _collate(self, dataset):
        return collate_encoded if isinstance(dataset, EncodedImageList) else super()._collate(dataset)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """``gpu_decode``: decode and transform the encoded batch on ``device`` (Lightning calls this hook)."""
        if isinstance(batch, EncodedBatch):
            if self._decoder is None:
                geometry = {t: v2.Compose(self._geometry(t)) for t in (True, False)}
                self._decoder = DeviceDecoder(geometry, self.mean, self.std, self.in_chans)
            return self._decoder(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def eval_transform(self):
        """What val/test do to one image, as a transform of an image file (a PIL image): ``zoo predict`` uses
        it, so it sees what evaluation sees. CIFAR and digits (square images in memory) are evaluated resized
        to ``img_size``, never cropped: so is a file."""
        if self.hparams.dataset in CIFAR or self.hparams.dataset == "digits":
            s = self.img_size
            return v2.Compose([v2.ToImage(), v2.Resize((s, s), antialias=True), *self._to_float()])
        return self._folder_transforms(False)

    def _cifar_transforms(self, train: bool) -> v2.Compose:
        s = self.img_size
        ops = [v2.Grayscale(1)] if self.in_chans == 1 else []
        if s != 32:
            ops.append(v2.Resize(s, antialias=True))
        if train and self.hparams.augment:
            ops += [v2.RandomCrop(s, padding=max(1, s // 8)), v2.RandomHorizontalFlip()]
        return v2.Compose([*ops, *self._to_float()])

    # ------------------------------------------------------------------ datasets
    def _build(self) -> None:
        name = self.hparams.dataset
        if name in STANDARD:
            return self._build_standard()
        {"digits": self._build_digits, "imagefolder": self._build_imagefolder}.get(
            name, self._build_cifar
        )()

    def _split(self, labels, need_val=True, need_test=True):
        hp = self.hparams
        return split_indices(
            len(labels), labels, need_val=need_val, need_test=need_test,
            val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed,
        )

    def _build_digits(self) -> None:
        x, y = load_digits_tensor(self.img_size, self.in_chans)
        tr, va, te = self._split(y.numpy())
        norm = v2.Normalize(self.mean, self.std)
        train_tf = norm
        if self.hparams.augment:
            affine = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
            train_tf = v2.Compose([affine, norm])
        self.train_set = IndexedTensorDataset(x, y, tr, train_tf)
        self.val_set = IndexedTensorDataset(x, y, va, norm)
        self.test_set = IndexedTensorDataset(x, y, te, norm)
        self._classes = list(DIGIT_CLASSES)

    def _build_cifar(self) -> None:
        hp = self.hparams
        self.prepare_data()
        x, y, classes = load_cifar(hp.dataset, self.root, train=True, verify_checksums=hp.verify_checksums)
        xt, yt, _ = load_cifar(hp.dataset, self.root, train=False, verify_checksums=hp.verify_checksums)
        tr, va, _ = self._split(y.numpy(), need_test=False)
        self.train_set = IndexedTensorDataset(x, y, tr, self._cifar_transforms(True))
        self.val_set = IndexedTensorDataset(x, y, va, self._cifar_transforms(False))
        self.test_set = IndexedTensorDataset(xt, yt, np.arange(len(yt)), self._cifar_transforms(False))
        self._classes = classes

    def _build_imagefolder(self) -> None:
        root = self.root
        classes = self.class_names  # found (and checked) once
        train = scan_imagefolder(root / "train", classes)
        has = {s: (root / s).is_dir() for s in ("val", "test")}
        tr, va, te = self._split([t for _, t in train], not has["val"], not has["test"])
        splits = {
            "train": [train[i] for i in tr],
            "val": scan_imagefolder(root / "val", classes) if has["val"] else [train[i] for i in va],
            "test": scan_imagefolder(root / "test", classes) if has["test"] else [train[i] for i in te],
        }
        self._image_lists(splits["train"], splits["val"], splits["test"])
        self._classes = classes

    def _standard_splits(self):
        if getattr(self, "_splits", None) is None:
            self._splits = read_standard(self.hparams.dataset, self.root, download=self.hparams.download)
        return self._splits

    def _build_standard(self) -> None:
        sp = self._standard_splits()
        train, val = sp.train, sp.val
        if val is None:  # no official validation split: a seeded stratified part of train
            tr, va, _ = self._split([t for _, t in train], need_test=False)
            train, val = [sp.train[i] for i in tr], [sp.train[i] for i in va]
        self._image_lists(train, val, sp.test)
        self._classes = sp.classes

    def _image_lists(self, train, val, test) -> None:
        """``bad_images``: unset = skip (replace and count) in training, error in val/test; ``skip`` also
        leaves unreadable val/test images out (counted as ``val/skipped``, ``test/skipped``), never replaced."""
        c, b = self.in_chans, self.hparams.bad_images
        self._decoder = None  # the next batch builds it for this input (size, mean/std)
        if self.hparams.gpu_decode:
            self.train_set = EncodedImageList(train, c, bad_images=train_policy(b))
            self.val_set = EncodedImageList(val, c, bad_images=eval_policy(b), split="val")
            self.test_set = EncodedImageList(test, c, bad_images=eval_policy(b), split="test")
            return
        self.train_set = ImageList(train, self._folder_transforms(True), c, bad_images=train_policy(b))
        self.val_set = ImageList(val, self._folder_transforms(False), c, bad_images=eval_policy(b), split="val")
        self.test_set = ImageList(test, self._folder_transforms(False), c, bad_images=eval_policy(b), split="test")
