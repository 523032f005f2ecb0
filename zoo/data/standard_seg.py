"""Standard segmentation datasets, read from the layouts their publishers ship (see ``standard.py``).

- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``; 150 classes, mask value
  0 ("other") ignored and 1..150 shifted to 0..149 (mmseg's ``reduce_zero_label``); class names from
  ``objectInfo150.txt`` when present. The official validation set is the test split; a seeded part of
  training validates.
- ``pet_trimaps``: Oxford-IIIT Pet ``annotations/trimaps/*.png`` (1 pet, 2 background, 3 border) ->
  classes pet / background / border; official ``trainval.txt`` / ``test.txt``.
CHAOS slices need no reader of their own: ``segfolder`` reads their ``{split}/Img`` + ``{split}/GT`` layout
(``configs/data/chaos.yaml``, volumes named by ``data.volume_key``); ``python -m zoo prepare chaos``
(:mod:`zoo.prepare`) writes that layout and each patient's voxel spacing from the published DICOM release.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zoo.errors import DatasetNotFoundError

from .standard import _archive_download, _check_files, _root_of, _tv_download, read_dataset

Pairs = list[tuple[Path, Path]]


@dataclass
class SegSplits:
    train: Pairs
    test: Pairs
    classes: list[str]
    value_map: dict[int, int]
    val: Pairs | None = None


@dataclass(frozen=True)
class StandardSegDataset:
    num_classes: int
    layout: str
    get: str
    read: Callable[[Path], SegSplits]
    download: Callable[[Path], None] | None = None


def _need(path: Path, name: str) -> Path:
    if not path.exists():
        spec = STANDARD_SEG[name]
        raise DatasetNotFoundError(f"{name}: {path} is missing (the dataset is absent or only partly unpacked).\n"
                                   f"Expected layout under data.root:\n{spec.layout}\nHow to get it: {spec.get}")
    return path


def _checked(pairs: Pairs, name: str) -> Pairs:
    _check_files([(str(m), 0) for _, m in pairs], name, STANDARD_SEG[name].get)
    _check_files([(str(i), 0) for i, _ in pairs], name, STANDARD_SEG[name].get)
    return pairs


def read_ade20k(root: Path) -> SegSplits:
    base = _root_of(root, "ADEChallengeData2016")
    out = []
    for part in ("training", "validation"):
        images = sorted(_need(base / "images" / part, "ade20k").glob("*.jpg"))
        if not images:
            raise DatasetNotFoundError(f"ade20k: no .jpg images in {base / 'images' / part}")
        out.append(_checked([(p, base / "annotations" / part / f"{p.stem}.png") for p in images], "ade20k"))
    info = base / "objectInfo150.txt"
    classes = [f"class_{i}" for i in range(150)]
    if info.is_file():  # Idx Ratio Train Val Name (names separated by ';', the first is used)
        rows = [ln.split("\t") for ln in info.read_text().splitlines()[1:] if ln.strip()]
        if len(rows) == 150:
            classes = [r[-1].split(";")[0].strip() for r in rows]
    return SegSplits(out[0], out[1], classes, {v: v - 1 for v in range(1, 151)})  # 0 ("other") -> ignore


def read_pet_trimaps(root: Path) -> SegSplits:
    base = _root_of(root, "oxford-iiit-pet")
    out = []
    for part in ("trainval", "test"):
        names = [ln.split()[0] for ln in _need(base / "annotations" / f"{part}.txt", "pet_trimaps").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        out.append(_checked([(base / "images" / f"{n}.jpg", base / "annotations" / "trimaps" / f"{n}.png") for n in names],
                            "pet_trimaps"))
    return SegSplits(out[0], out[1], ["pet", "background", "border"], {1: 0, 2: 1, 3: 2})


STANDARD_SEG: dict[str, StandardSegDataset] = {
    "ade20k": StandardSegDataset(
        150, "  ADEChallengeData2016/images/{training,validation}/*.jpg\n"
             "  ADEChallengeData2016/annotations/{training,validation}/*.png  (0 = other, 1..150 = classes)",
        "data.download=true, or ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/",
        read_ade20k, _archive_download("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip")),
    "pet_trimaps": StandardSegDataset(
        3, "  oxford-iiit-pet/images/*.jpg\n  oxford-iiit-pet/annotations/{trainval,test}.txt, annotations/trimaps/*.png",
        "data.download=true (torchvision OxfordIIITPet), or https://www.robots.ox.ac.uk/~vgg/data/pets/",
        read_pet_trimaps, _tv_download("OxfordIIITPet", target_types="segmentation")),
}


def read_standard_seg(name: str, root: Path, *, download: bool = False) -> SegSplits:
    return read_dataset(name, STANDARD_SEG[name], root, download=download)
