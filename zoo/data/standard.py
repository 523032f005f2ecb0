"""Standard classification datasets, read from the layouts their publishers ship.

Each reader parses the dataset's own index files (CUB's ``images.txt``, Flowers' ``setid.mat``,
Aircraft's ``images_variant_*.txt`` ...) into ``(path, label)`` lists; nothing is re-encoded or
copied. The layouts are the ones the official archives unpack to (and, where torchvision can
download a dataset, the folder torchvision downloads it into), so ``download=true`` and a copy a
user already has both work. A missing or half-unpacked dataset is a ``DatasetNotFoundError`` that
names the missing file and says how to get the data.

Splits: the official train/test split of each dataset; the official validation split where the
dataset has one (Flowers-102, FGVC-Aircraft), otherwise a seeded stratified split of train
(``val_fraction``). Checkpoints are chosen on validation, never on test. ImageNet's ``val/`` is the
test split (its labels are the only public ones).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zoo.errors import DataFormatError, DatasetNotFoundError

from .folders import find_classes, scan_imagefolder

Samples = list[tuple[str, int]]


@dataclass
class Splits:
    train: Samples
    test: Samples
    classes: list[str]
    val: Samples | None = None  # None: a seeded split of train stands in


@dataclass(frozen=True)
class StandardDataset:
    folder: str  # what ``root`` must contain (or be)
    layout: str  # the files the reader needs, shown when they are missing
    get: str  # how to obtain it
    read: Callable[[Path], Splits]
    download: Callable[[Path], None] | None = None  # None: no public automatic download


# --------------------------------------------------------------------------- helpers
def _need(path: Path, name: str) -> Path:
    if not path.exists():
        spec = STANDARD[name]
        raise DatasetNotFoundError(
            f"{name}: {path} is missing (the dataset is absent or only partly unpacked).\n"
            f"Expected layout under data.root:\n{spec.layout}\nHow to get it: {spec.get}"
        )
    return path


def _lines(path: Path, name: str) -> list[list[str]]:
    return [ln.split() for ln in _need(path, name).read_text().splitlines() if ln.strip()]


def _check_files(samples: Samples, name: str, get: str | None = None) -> Samples:
    """A half-copied dataset fails here, naming a missing file, instead of mid-epoch."""
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name}: {len(missing)} of {len(samples)} listed files are missing, e.g. {missing[0]}.\n"
            f"The dataset looks partly downloaded or unpacked. How to get it: {get or STANDARD[name].get}"
        )
    return samples


def _loadmat(path: Path, name: str) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(str(_need(path, name)), squeeze_me=True)
    except (ValueError, OSError, TypeError) as err:
        raise DataFormatError(f"{name}: cannot read {path} ({err}); re-download it") from err


def _root_of(root: Path, folder: str) -> Path:
    """Accept both ``data.root=PARENT`` and ``data.root=PARENT/<folder>``."""
    return root if root.name == folder else root / folder


def _tv_download(cls_name: str, **kw) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        from torchvision import datasets

        getattr(datasets, cls_name)(str(root), download=True, **kw)

    return download


def _archive_download(*urls: str, folder: str | None = None) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        dest = root / folder if folder else root
        for url in urls:
            download_and_extract_archive(url, download_root=str(dest))

    return download


# --------------------------------------------------------------------------- readers
def read_imagenet(root: Path) -> Splits:
    train_dir, val_dir = _need(root / "train", "imagenet"), _need(root / "val", "imagenet")
    classes = find_classes(train_dir)
    return Splits(scan_imagefolder(train_dir, classes), scan_imagefolder(val_dir, classes), classes)


def read_cub200(root: Path) -> Splits:
    base = _root_of(root, "CUB_200_2011")
    images = {i: p for i, p in _lines(base / "images.txt", "cub200")}
    labels = {i: int(c) - 1 for i, c in _lines(base / "image_class_labels.txt", "cub200")}
    is_train = {i: s == "1" for i, s in _lines(base / "train_test_split.txt", "cub200")}
    classes = [c for _, c in sorted(_lines(base / "classes.txt", "cub200"), key=lambda r: int(r[0]))]
    split: dict[bool, Samples] = {True: [], False: []}
    for i, rel in sorted(images.items(), key=lambda kv: int(kv[0])):
        split[is_train[i]].append((str(base / "images" / rel), labels[i]))
    return Splits(_check_files(split[True], "cub200"), _check_files(split[False], "cub200"), classes)


def read_stanford_dogs(root: Path) -> Splits:
    base = root
    classes = sorted(e.name for e in _need(base / "Images", "stanford_dogs").iterdir() if e.is_dir())
    out = []
    for part in ("train", "test"):
        mat = _loadmat(base / f"{part}_list.mat", "stanford_dogs")
        files = [str(f) for f in mat["file_list"]]
        labels = [int(v) - 1 for v in mat["labels"]]
        out.append(_check_files([(str(base / "Images" / f), y) for f, y in zip(files, labels)], "stanford_dogs"))
    names = [c.split("-", 1)[1] if "-" in c else c for c in classes]  # n02085620-Chihuahua -> Chihuahua
    return Splits(out[0], out[1], names)


def read_stanford_cars(root: Path) -> Splits:
    base = _root_of(root, "stanford_cars")  # torchvision's folder; devkit as in the original release
    meta = _loadmat(base / "devkit" / "cars_meta.mat", "stanford_cars")
    classes = [str(c) for c in meta["class_names"]]
    out = []
    for part, ann in (("train", base / "devkit" / "cars_train_annos.mat"),
                      ("test", base / "cars_test_annos_withlabels.mat")):
        rows = _loadmat(ann, "stanford_cars")["annotations"]
        samples = [(str(base / f"cars_{part}" / str(r["fname"])), int(r["class"]) - 1) for r in rows]
        out.append(_check_files(samples, "stanford_cars"))
    return Splits(out[0], out[1], classes)


def read_fgvc_aircraft(root: Path) -> Splits:
    base = _root_of(root, "fgvc-aircraft-2013b") / "data"
    classes = [ln.strip() for ln in _need(base / "variants.txt", "fgvc_aircraft").read_text().splitlines() if ln.strip()]
    index = {c: i for i, c in enumerate(classes)}

    def part(name: str) -> Samples:
        rows = [ln.split(" ", 1) for ln in _need(base / f"images_variant_{name}.txt", "fgvc_aircraft").read_text().splitlines() if ln.strip()]
        unknown = sorted({v for _, v in rows} - set(index))
        if unknown:
            raise DataFormatError(f"fgvc_aircraft: variants {unknown[:3]} are not in {base / 'variants.txt'}")
        return _check_files([(str(base / "images" / f"{i}.jpg"), index[v]) for i, v in rows], "fgvc_aircraft")

    return Splits(part("train"), part("test"), classes, val=part("val"))


def read_oxford_pets(root: Path) -> Splits:
    base = _root_of(root, "oxford-iiit-pet")
    out, names = [], {}
    for part in ("trainval", "test"):
        samples = []
        for row in _lines(base / "annotations" / f"{part}.txt", "oxford_pets"):
            if row[0].startswith("#"):
                continue
            label = int(row[1]) - 1
            names[label] = row[0].rsplit("_", 1)[0].replace("_", " ")  # Abyssinian_100 -> Abyssinian
            samples.append((str(base / "images" / f"{row[0]}.jpg"), label))
        out.append(_check_files(samples, "oxford_pets"))
    return Splits(out[0], out[1], [names[i] for i in sorted(names)])


def read_flowers102(root: Path) -> Splits:
    base = _root_of(root, "flowers-102")
    labels = [int(v) - 1 for v in _loadmat(base / "imagelabels.mat", "flowers102")["labels"]]
    ids = _loadmat(base / "setid.mat", "flowers102")

    def part(key: str) -> Samples:
        return _check_files([(str(base / "jpg" / f"image_{int(i):05d}.jpg"), labels[int(i) - 1]) for i in ids[key]],
                            "flowers102")

    classes = [f"flower_{i:03d}" for i in range(1, 103)]  # the release ships ids only
    return Splits(part("trnid"), part("tstid"), classes, val=part("valid"))


def read_food101(root: Path) -> Splits:
    base = _root_of(root, "food-101")
    classes = [ln.strip() for ln in _need(base / "meta" / "classes.txt", "food101").read_text().splitlines() if ln.strip()]
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for part in ("train", "test"):
        try:
            listing = json.loads(_need(base / "meta" / f"{part}.json", "food101").read_text())
        except json.JSONDecodeError as err:
            raise DataFormatError(f"food101: {base / 'meta' / f'{part}.json'} is not valid JSON ({err})") from err
        samples = [(str(base / "images" / f"{rel}.jpg"), index[c]) for c in classes for rel in listing.get(c, [])]
        out.append(_check_files(samples, "food101"))
    return Splits(out[0], out[1], classes)


STANDARD: dict[str, StandardDataset] = {
    "imagenet": StandardDataset(
        "imagenet", "  train/n01440764/*.JPEG ... (1000 class folders)\n  val/n01440764/*.JPEG ... (same folders)",
        "register at https://image-net.org, download ILSVRC2012 train/val and sort val into class folders "
        "(e.g. with the valprep.sh script); no automatic download", read_imagenet),
    "cub200": StandardDataset(
        "CUB_200_2011", "  CUB_200_2011/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt\n"
        "  CUB_200_2011/images/001.Black_footed_Albatross/*.jpg",
        "data.download=true, or CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/",
        read_cub200, _archive_download("https://data.caltech.edu/records/65de6-vjr11/files/CUB_200_2011.tgz")),
    "stanford_dogs": StandardDataset(
        "stanford_dogs", "  Images/n02085620-Chihuahua/*.jpg\n  train_list.mat, test_list.mat (from lists.tar)",
        "data.download=true, or images.tar + lists.tar from http://vision.stanford.edu/aditya86/ImageNetDogs/",
        read_stanford_dogs, _archive_download("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
                                              "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar")),
    "stanford_cars": StandardDataset(
        "stanford_cars", "  stanford_cars/devkit/cars_meta.mat, devkit/cars_train_annos.mat\n"
        "  stanford_cars/cars_test_annos_withlabels.mat, cars_train/*.jpg, cars_test/*.jpg",
        "the original host is gone; get the archive from a mirror (e.g. Kaggle 'stanford-cars-dataset') and "
        "unpack it in torchvision's StanfordCars layout", read_stanford_cars),
    "fgvc_aircraft": StandardDataset(
        "fgvc-aircraft-2013b", "  fgvc-aircraft-2013b/data/variants.txt, images_variant_{train,val,test}.txt\n"
        "  fgvc-aircraft-2013b/data/images/*.jpg",
        "data.download=true (torchvision FGVCAircraft), or https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        read_fgvc_aircraft, _tv_download("FGVCAircraft")),
    "oxford_pets": StandardDataset(
        "oxford-iiit-pet", "  oxford-iiit-pet/annotations/{trainval,test}.txt, annotations/trimaps/*.png\n"
        "  oxford-iiit-pet/images/*.jpg",
        "data.download=true (torchvision OxfordIIITPet), or https://www.robots.ox.ac.uk/~vgg/data/pets/",
        read_oxford_pets, _tv_download("OxfordIIITPet")),
    "flowers102": StandardDataset(
        "flowers-102", "  flowers-102/imagelabels.mat, setid.mat, jpg/image_00001.jpg ...",
        "data.download=true (torchvision Flowers102), or https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        read_flowers102, _tv_download("Flowers102")),
    "food101": StandardDataset(
        "food-101", "  food-101/meta/classes.txt, meta/{train,test}.json, images/apple_pie/*.jpg",
        "data.download=true (torchvision Food101, 5 GB), or https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        read_food101, _tv_download("Food101")),
}


def read_dataset(name: str, spec, root: Path, *, download: bool = False):
    """Read a published dataset (``spec``: a ``StandardDataset`` or ``StandardSegDataset``), downloading
    it first when asked and it is not already there."""
    root = Path(root).expanduser()
    if download:
        if spec.download is None:
            raise DatasetNotFoundError(f"{name} cannot be downloaded automatically: {spec.get}")
        try:
            return spec.read(root)
        except DatasetNotFoundError:
            root.mkdir(parents=True, exist_ok=True)
            spec.download(root)
    if not root.exists():
        raise DatasetNotFoundError(
            f"{name}: data.root {root} does not exist.\nExpected layout under data.root:\n{spec.layout}\n"
            f"How to get it: {spec.get}"
        )
    return spec.read(root)


def read_standard(name: str, root: Path, *, download: bool = False) -> Splits:
    return read_dataset(name, STANDARD[name], root, download=download)
