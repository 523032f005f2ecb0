"""On-disk formats users already have: ImageFolder trees, image/mask trees, CIFAR pickles."""
from __future__ import annotations

import abc

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from zoo.errors import DataFormatError, DatasetNotFoundError

from .common import IMG_EXTENSIONS

log = logging.getLogger("zoo.data")

IMAGEFOLDER_LAYOUT = """\
root/
  train/CLASS_A/img001.png      one folder per class (any image extension)
  train/CLASS_B/...
  val/CLASS_A/...               optional: a seeded stratified split of train stands in
  test/CLASS_A/...              optional: likewise
"""
SEGFOLDER_LAYOUT = """\
root/
  train/images/0001.jpg         any image extension
  train/masks/0001.png          same stem; pixel value = class id (or see value_map), 255 = ignore
  val/{images,masks}/...        optional: a seeded split of train stands in
  test/{images,masks}/...       optional: likewise
  (CHAOS-style {split}/Img/ + {split}/GT/ with the same file names is read too)
"""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


HIGH_BIT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_8bit(im: Image.Image) -> Image.Image:
    """Images of more than 8 bits per channel scaled by their real range, not clipped at 255: unsigned 16-bit
    (PNG, TIFF: Pillow modes ``I;16*``, and ``I`` holding values <= 65535) is divided by 65535, 32-bit
    integer data with larger values by its dtype max 2**31 - 1 (negatives clip to 0), float (``F``) images
    are taken as [0, 1]; then quantised to 8 bits (``round(value * 255)``). Masks do not pass through here:
    their values stay class ids."""
    if im.mode not in HIGH_BIT_MODES and im.mode != "F":
        return im
    arr = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(arr).all():  # read as unreadable: an error in val/test, or left out with 'skip'
            raise ValueError(f"{int((~np.isfinite(arr)).sum())} non-finite (NaN/inf) pixel values")
        top = 1.0
    elif im.mode == "I" and arr.size and arr.max() > 65535:
        top = 2.0**31 - 1  # genuinely 32-bit data
    else:
        top = float(HIGH_BIT_MODES[im.mode])
    scaled = np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8: mode L


def open_image(path, in_chans: int) -> Image.Image:
    with Image.open(path) as im:
        return to_8bit(im).convert("L" if in_chans == 1 else "RGB")


# --------------------------------------------------------------------------- ImageFolder
def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMG_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def find_classes(train_dir: Path, allow_empty: bool = False) -> list[str]:
    """Class names = the folders of ``train_dir``, sorted as ImageFolder sorts. A folder without images
    would be a class no sample has (shifting no ids, but counted in ``num_classes`` and the metrics):
    an error naming it, or with ``allow_empty`` a warning and the class is kept."""
    classes = sorted(e.name for e in train_dir.iterdir() if e.is_dir())  # as ImageFolder sorts
    if not classes:
        raise DatasetNotFoundError(
            f"no class folders in {train_dir}\nExpected layout:\n{IMAGEFOLDER_LAYOUT}"
        )
    empty = [train_dir / c for c in classes if not _has_image(train_dir / c)]
    if empty:
        names = ", ".join(str(e) for e in empty)
        if not allow_empty:
            raise DataFormatError(
                f"class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): {names}; each would be a class "
                "with no samples. Remove the folder, add its images, or set data.allow_empty_classes=true to keep it"
            )
        log.warning("EMPTY CLASS FOLDER(S) kept as classes without samples (data.allow_empty_classes=true): %s",
                    names)
    return classes


def scan_imagefolder(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class id) pairs of a split, with train's class ids (val/test may lack classes,
    but a class train never saw cannot be scored)."""
    present = sorted(e.name for e in split_dir.iterdir() if e.is_dir())
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataFormatError(f"{split_dir} has classes that train lacks: {unknown}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = tvd.folder.make_dataset(str(split_dir), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataFormatError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return samples


BAD_IMAGES = ("skip", "error")


def eval_policy(bad_images: str | None) -> str:
    """The datamodules' ``bad_images`` for val/test: unset (None) = ``'error'``."""
    return bad_images or "error"


def train_policy(bad_images: str | None) -> str:
    """The datamodules' ``bad_images`` for training: unset (None) = ``'skip'`` (replace and count)."""
    return bad_images or "skip"


def _why(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


class SkipsUnreadable(abc.ABC):
    """What an unreadable image (corrupt, truncated, not an image) does.

    Training split (``split='train'``): ``bad_images='skip'`` replaces it by the next readable item and
    logs it with a running count (per process: each DataLoader worker logs its own); ``'error'``: a
    DataFormatError naming the file.

    Evaluation splits (``split='val'``/``'test'``): no item is ever replaced. ``'error'``: a
    DataFormatError naming the file; ``'skip'``: every item is read once when the dataset is built, the
    unreadable ones are left out (``left_out``: their files; ``len`` counts only the rest) and named in
    the log; the task logs their count as ``{split}/skipped``."""

    bad_images = "skip"
    split = "train"
    left_out: list[str] | None = None  # evaluation with 'skip': the files left out (None: not scanned)

    def _check_policy(self, bad_images: str, split: str = "train") -> None:
        if bad_images not in BAD_IMAGES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGES}, got {bad_images!r}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.bad_images, self.split, self.skipped = bad_images, split, set()

    @abc.abstractmethod
    def _files(self, item) -> tuple:
        """The files one item reads (the image first, then the mask for segmentation)."""

    @abc.abstractmethod
    def _items(self) -> list:
        """The items (a list of (path, ...) tuples)."""

    @abc.abstractmethod
    def _set_items(self, items: list) -> None:
        """Replace the items (evaluation with 'skip': the readable ones)."""

    @abc.abstractmethod
    def _read_check(self, item) -> None:
        """Decode the item's files; raises what PIL raises on an unreadable one."""

    def item_names(self, indices) -> list[str]:
        """The image file of each item at ``indices`` (named in errors and in ``left_out``)."""
        items = self._items()
        return [str(self._files(items[i])[0]) for i in indices]

    def _leave_out_unreadable(self) -> None:
        """Evaluation with 'skip': read every item once and keep only the readable ones."""
        from concurrent.futures import ThreadPoolExecutor

        def problem(item):
            try:
                self._read_check(item)
            except (OSError, SyntaxError, ValueError) as e:
                if isinstance(e, DataFormatError):
                    raise
                return _why(e)
            return None

        items = self._items()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(problem, items))
        self.left_out = [str(self._files(it)[0]) for it, why in zip(items, problems) if why is not None]
        if self.left_out:
            for it, why in zip(items, problems):
                if why is not None:
                    log.warning("%s: left out unreadable %s (%s)", self.split, " / ".join(map(str, self._files(it))), why)
            log.warning("%s: %d of %d items left out as unreadable (data.bad_images=skip); the %s metrics are "
                        "computed on the other %d", self.split, len(self.left_out), len(items), self.split,
                        len(items) - len(self.left_out))
        kept = [it for it, why in zip(items, problems) if why is None]
        if items and not kept:
            raise DataFormatError(f"{self.split}: none of the {len(items)} images could be read "
                                  f"(first: {self.left_out[0]})")
        self._set_items(kept)

    def _unreadable(self, path, error: Exception, i: int) -> int:
        why = _why(error)
        if self.bad_images == "error" or self.split != "train":
            hint = ("fix or remove it, or set data.bad_images=skip to leave unreadable images out of "
                    "evaluation (they are counted as {s}/skipped)" if self.split != "train" else
                    "fix or remove it, or set data.bad_images=skip to skip unreadable images")
            raise DataFormatError(f"cannot read {self.split} image {path} ({why}); "
                                  + hint.format(s=self.split)) from None
        if str(path) not in self.skipped:
            self.skipped.add(str(path))
            log.warning("skipped unreadable image %s (%s); %d skipped so far", path, why, len(self.skipped))
        if len(self.skipped) >= len(self):
            raise DataFormatError(f"none of the {len(self)} images could be read (last: {path}: {why})")
        return (i + 1) % len(self)


class ImageList(SkipsUnreadable, Dataset):
    """(path, label) samples read with PIL; ``targets`` for stratified splits. ``split``: see
    :class:`SkipsUnreadable` (val/test never replace an unreadable image)."""

    def __init__(self, samples, transform: Callable | None = None, in_chans: int = 3, bad_images: str = "skip",
                 split: str = "train"):
        self.samples = list(samples)
        self.transform, self.in_chans = transform, in_chans
        self._check_policy(bad_images, split)
        if split != "train" and bad_images == "skip":
            self._leave_out_unreadable()
        self.targets = [t for _, t in self.samples]

    def _files(self, item) -> tuple:
        return (item[0],)

    def _items(self) -> list:
        return self.samples

    def _set_items(self, items: list) -> None:
        self.samples = items

    def _read_check(self, item) -> None:
        open_image(item[0], self.in_chans)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        while True:
            path, target = self.samples[i]
            try:
                img = open_image(path, self.in_chans)
                break
            except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated file
                i = self._unreadable(path, e, i)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


# --------------------------------------------------------------------------- segmentation folders
def scan_segfolder(split_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file stem."""
    img_dir, mask_dir = split_dir / "images", split_dir / "masks"
    if not img_dir.is_dir() and (split_dir / "Img").is_dir():  # the CHAOS slice layout
        img_dir, mask_dir = split_dir / "Img", split_dir / "GT"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DatasetNotFoundError(f"folder not found: {d}\nExpected layout:\n{SEGFOLDER_LAYOUT}")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs = []
    for img in _images_in(img_dir):
        if img.stem not in masks:
            raise DataFormatError(f"image {img} has no mask: expected {mask_dir / (img.stem + '.png')}")
        pairs.append((img, masks[img.stem]))
    if not pairs:
        raise DataFormatError(f"no images under {img_dir}\nExpected layout:\n{SEGFOLDER_LAYOUT}")
    return pairs


def mask_lut(value_map: dict | None, num_classes: int) -> np.ndarray | None:
    """Pixel value -> class id table; values outside ``value_map`` become 255 (ignore)."""
    if not value_map:
        return None
    vm = {int(k): int(v) for k, v in dict(value_map).items()}
    bad = {v for v in vm.values() if not (0 <= v < num_classes or v == 255)}
    if bad:
        raise ValueError(f"value_map targets {sorted(bad)} are not class ids < {num_classes} (or 255)")
    lut = np.full(max(max(vm), 255) + 1, 255, np.uint8)
    for k, v in vm.items():
        lut[k] = v
    return lut


def read_mask(path: Path, lut: np.ndarray | None, num_classes: int) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.array(im)
    if arr.ndim == 3:  # RGB(A) masks are accepted only when they are grey levels
        if not (arr[..., :3] == arr[..., :1]).all():
            raise DataFormatError(f"mask {path} is a colour image; masks must be single-channel")
        arr = arr[..., 0]
    arr = arr.astype(np.int64)
    if lut is not None:
        out = np.full(arr.shape, 255, np.uint8)
        ok = (arr >= 0) & (arr < len(lut))
        out[ok] = lut[arr[ok]]
        return out
    bad = np.unique(arr[(arr >= num_classes) & (arr != 255)])
    if bad.size:
        raise DataFormatError(
            f"mask {path} has values {bad[:8].tolist()} >= num_classes={num_classes}; "
            "give a value_map (pixel value -> class id) for grey-level encodings"
        )
    return arr.astype(np.uint8)


class SegFolderDataset(SkipsUnreadable, Dataset):
    """(image, mask) pairs from disk; joint v2 transforms see a ``tv_tensors.Mask``. ``volumes``: for slices
    of volumes, which volume and slice each item is (a :class:`zoo.volume_metrics.VolumeIndex`, set by the
    datamodule from ``data.volume_key``; None otherwise)."""

    volumes = None

    def __init__(self, pairs, *, num_classes: int, value_map=None, in_chans: int = 3, transform=None,
                 bad_images: str = "skip", split: str = "train"):
        self.pairs = list(pairs)
        self.num_classes, self.in_chans, self.transform = num_classes, in_chans, transform
        self.lut = mask_lut(value_map, num_classes)
        self._check_policy(bad_images, split)
        if split != "train" and bad_images == "skip":
            self._leave_out_unreadable()

    def _files(self, item) -> tuple:
        return tuple(item)

    def _items(self) -> list:
        return self.pairs

    def _set_items(self, items: list) -> None:
        self.pairs = items

    def _read_check(self, item) -> None:
        open_image(item[0], self.in_chans)
        with Image.open(item[1]) as im:
            im.load()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        while True:
            img_path, mask_path = self.pairs[i]
            try:
                img = open_image(img_path, self.in_chans)
            except (OSError, SyntaxError, ValueError) as e:
                i = self._unreadable(img_path, e, i)
                continue
            try:
                mask = read_mask(mask_path, self.lut, self.num_classes)
                break
            except DataFormatError:
                raise
            except (OSError, SyntaxError, ValueError) as e:
                i = self._unreadable(mask_path, e, i)
        if mask.shape != (img.height, img.width):
            raise DataFormatError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} is "
                f"{img.width}x{img.height} (width x height)"
            )
        img = tv_tensors.Image(TF.pil_to_tensor(img))
        mask = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


# --------------------------------------------------------------------------- CIFAR
class _CheckedCIFAR:
    """Mixin: with ``verify_checksums=False`` only the presence of the files is checked, so
    tiny fixtures in the real pickle layout (and re-packed copies) load."""

    def __init__(self, *args, verify_checksums: bool = True, **kwargs):
        self.verify_checksums = verify_checksums
        super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        if self.verify_checksums:
            return super()._check_integrity()
        base = Path(self.root) / self.base_folder
        return all((base / f).is_file() for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        if not self.verify_checksums:
            self.meta = {**self.meta, "md5": None}  # torchvision's check_integrity: None = exists
        super()._load_meta()


class CIFAR10(_CheckedCIFAR, tvd.CIFAR10):
    pass


class CIFAR100(_CheckedCIFAR, tvd.CIFAR100):
    pass


CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def cifar_missing(name: str, root: Path) -> list[str]:
    cls = CIFAR[name]
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f for f in files if not (root / cls.base_folder / f).is_file()]


def download_cifar(name: str, root: Path) -> None:
    try:
        CIFAR[name](str(root), train=True, download=True)
    except Exception as e:  # offline, proxy, disk full: say where the files should go instead
        raise DatasetNotFoundError(
            f"{name}: download to {root} failed ({e}); put the extracted "
            f"{CIFAR[name].filename} at {root / CIFAR[name].base_folder}/"
        ) from e


def load_cifar(name: str, root: Path, *, train: bool, verify_checksums: bool):
    """Images ``uint8 [N, 3, 32, 32]``, labels ``long [N]`` and class names of one split."""
    cls = CIFAR[name]
    folder = root / cls.base_folder
    missing = cifar_missing(name, root)
    if missing:
        raise DatasetNotFoundError(
            f"{name}: {folder} lacks {missing}; set data.download=true (needs internet) "
            f"or put the files at {folder}/ (the extracted {cls.filename})"
        )
    try:
        ds = cls(str(root), train=train, download=False, verify_checksums=verify_checksums)
    except RuntimeError as e:  # torchvision's md5 check failed
        raise DataFormatError(
            f"{name}: files under {folder} fail their checksums ({e}); "
            "re-download (data.download=true) or set data.verify_checksums=false"
        ) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
    return images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)


class EncodedImageList(ImageList):
    """An :class:`ImageList` for ``data.gpu_decode``: items are ``(bytes or uint8 image, label, path, train)``
    for :func:`zoo.data.device_decode.collate_encoded`; the datamodule decodes and transforms the batch on the
    device. Unreadable files (empty, truncated JPEG, not an image) follow the same ``bad_images`` policy."""

    def __init__(self, samples, in_chans: int = 3, bad_images: str = "skip", split: str = "train"):
        super().__init__(samples, None, in_chans, bad_images=bad_images, split=split)

    def __getitem__(self, i: int):
        from .device_decode import read_encoded

        while True:
            path, target = self.samples[i]
            try:
                return read_encoded(path, self.in_chans, open_image), target, str(path), self.split == "train"
            except (OSError, SyntaxError, ValueError) as e:
                i = self._unreadable(path, e, i)
