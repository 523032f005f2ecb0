"""Standard classification datasets, each read from a tiny fixture written in its published on-disk layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from zoo.data import ClassificationDataModule
from zoo.errors import DatasetNotFoundError

IMG_SIZE = 32


def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


def _cell(strings: list[str]) -> np.ndarray:  # a MATLAB cell array of strings
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = s
    return out


# Each writer returns (root to pass, class names or None, n_train incl. a carved-out val, official n_val or None, n_test).
def write_imagenet(tmp: Path):
    root = tmp / "imagenet"
    for split, n in (("train", 10), ("val", 2)):
        for c in ("n01440764", "n01443537"):
            for i in range(n):
                _jpg(root / split / c / f"{c}_{i}.JPEG", i)
    return root, ["n01440764", "n01443537"], 20, None, 4


def write_cub200(tmp: Path):
    base = tmp / "cub200" / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split = [], [], []
    k = 0
    for ci, c in enumerate(classes):
        for i in range(6):
            k += 1
            rel = f"{c}/{c.split('.')[1]}_{i:04d}_{k}.jpg"
            _jpg(base / "images" / rel, k)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {ci + 1}")
            split.append(f"{k} {int(i < 4)}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)) + "\n")
    return tmp / "cub200", classes, 8, None, 4


def write_stanford_dogs(tmp: Path):
    root = tmp / "stanford_dogs"
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    lists = {"train": ([], []), "test": ([], [])}
    for ci, f in enumerate(folders):
        for i in range(6):
            rel = f"{f}/{f.split('-')[0]}_{i}.jpg"
            _jpg(root / "Images" / rel, i + 10 * ci)
            part = "train" if i < 4 else "test"
            lists[part][0].append(rel)
            lists[part][1].append(ci + 1)
    for part, (files, labels) in lists.items():
        savemat(root / f"{part}_list.mat", {"file_list": _cell(files), "labels": np.array(labels)[:, None]})
    return root, ["Chihuahua", "Japanese_spaniel"], 8, None, 4


def write_stanford_cars(tmp: Path):
    base = tmp / "cars" / "stanford_cars"
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": _cell(classes).T})
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for part, n, ann in (("train", 4, base / "devkit" / "cars_train_annos.mat"),
                         ("test", 2, base / "cars_test_annos_withlabels.mat")):
        rows = []
        for ci in range(2):
            for i in range(n):
                fname = f"{ci}{i:04d}.jpg"
                _jpg(base / f"cars_{part}" / fname, ci * 100 + i)
                rows.append((1, 1, 10, 10, ci + 1, fname))
        savemat(ann, {"annotations": np.array([rows], dtype=dtype)})
    return tmp / "cars", classes, 8, None, 4


def write_fgvc_aircraft(tmp: Path):
    base = tmp / "aircraft" / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "A300B4"]  # names with digits and dashes, as the release has
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(classes) + "\n")
    k = 1000000
    for part, n in (("train", 3), ("val", 2), ("test", 2)):
        rows = []
        for c in classes:
            for _ in range(n):
                k += 1
                _jpg(base / "images" / f"{k}.jpg", k)
                rows.append(f"{k} {c}")
        (base / f"images_variant_{part}.txt").write_text("\n".join(rows) + "\n")
    return tmp / "aircraft", classes, 6, 4, 4


def write_oxford_pets(tmp: Path):
    base = tmp / "pets" / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    names = ["Abyssinian", "american_bulldog"]
    for part, rng in (("trainval", range(1, 5)), ("test", range(5, 7))):
        rows = []
        for ci, name in enumerate(names):
            for i in rng:
                _jpg(base / "images" / f"{name}_{i}.jpg", i + 10 * ci)
                rows.append(f"{name}_{i} {ci + 1} {1 + ci} {1}")
        (base / "annotations" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    return tmp / "pets", ["Abyssinian", "american bulldog"], 8, None, 4


def write_flowers102(tmp: Path):
    base = tmp / "flowers" / "flowers-102"
    labels = [1, 1, 1, 2, 2, 2, 1, 2, 1, 2]
    for i in range(1, len(labels) + 1):
        _jpg(base / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 4, 2, 5]]), "valid": np.array([[3, 6]]),
                                 "tstid": np.array([[7, 8, 9, 10]])})
    return tmp / "flowers", None, 4, 2, 4


def write_food101(tmp: Path):
    base = tmp / "food" / "food-101"
    classes = ["apple_pie", "baby_back_ribs"]
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    listing = {"train": {}, "test": {}}
    for ci, c in enumerate(classes):
        for i in range(6):
            part = "train" if i < 4 else "test"
            listing[part].setdefault(c, []).append(f"{c}/{100 + i}")
            _jpg(base / "images" / c / f"{100 + i}.jpg", i + 10 * ci)
    for part, d in listing.items():
        (base / "meta" / f"{part}.json").write_text(json.dumps(d))
    return tmp / "food", classes, 8, None, 4


WRITERS = {
    "imagenet": write_imagenet, "cub200": write_cub200, "stanford_dogs": write_stanford_dogs,
    "stanford_cars": write_stanford_cars, "fgvc_aircraft": write_fgvc_aircraft, "oxford_pets": write_oxford_pets,
    "flowers102": write_flowers102, "food101": write_food101,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_standard_dataset_fixture(tmp_path, name):
    root, classes, n_train, n_val, n_test = WRITERS[name](tmp_path)
    dm = ClassificationDataModule(dataset=name, root=str(root), img_size=IMG_SIZE, batch_size=4, augment=True,
                                  val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == (102 if name == "flowers102" else 2)
    if classes is not None:
        assert dm.class_names == classes
    if n_val is None:  # a seeded split of train validates; test is the official test split
        assert len(dm.train_set) + len(dm.val_set) == n_train and len(dm.val_set) >= 1
    else:
        assert (len(dm.train_set), len(dm.val_set)) == (n_train, n_val)
    assert len(dm.test_set) == n_test
    x, y = dm.test_set[0]
    assert x.shape == (3, IMG_SIZE, IMG_SIZE) and 0 <= int(y) < dm.num_classes
    assert {int(t) for t in dm.test_set.targets} == ({0, 1})
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape[1:] == (3, IMG_SIZE, IMG_SIZE)


def test_cub_labels_follow_the_index_files(tmp_path):
    root, *_ = write_cub200(tmp_path)
    dm = ClassificationDataModule(dataset="cub200", root=str(root / "CUB_200_2011"), img_size=IMG_SIZE)
    dm.setup()  # root may also be the CUB_200_2011 folder itself
    for path, label in dm.test_set.samples:
        assert Path(path).parent.name == dm.class_names[label]


def test_fgvc_resize_then_crop_follows_img_size(tmp_path):
    root, *_ = write_cub200(tmp_path)
    dm = ClassificationDataModule(dataset="cub200", root=str(root), img_size=48, resize_ratio=550 / 448)
    dm.setup()
    resize = dm.test_set.transform.transforms[1]
    assert resize.size == [round(48 * 550 / 448)] and dm.test_set[0][0].shape == (3, 48, 48)


@pytest.mark.parametrize("name", list(WRITERS))
def test_missing_dataset_says_what_and_how(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="How to get it"):
        ClassificationDataModule(dataset=name, root=str(tmp_path / "nothing"), img_size=IMG_SIZE).setup()


@pytest.mark.parametrize("name", ["cub200", "food101", "flowers102", "fgvc_aircraft", "stanford_dogs"])
def test_half_unpacked_dataset_names_a_missing_image(tmp_path, name):
    root, *_ = WRITERS[name](tmp_path)
    victim = sorted(Path(root).rglob("*.jpg"))[-1]
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        ClassificationDataModule(dataset=name, root=str(root), img_size=IMG_SIZE).setup()


def test_missing_index_file_is_named(tmp_path):
    root, *_ = write_cub200(tmp_path)
    (root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="train_test_split.txt"):
        ClassificationDataModule(dataset="cub200", root=str(root), img_size=IMG_SIZE).setup()


@pytest.mark.parametrize("name", list(WRITERS))
def test_data_configs_compose_and_instantiate(compose_cfg, tmp_path, name):
    from hydra.utils import instantiate

    root, *_ = WRITERS[name](tmp_path)
    cfg = compose_cfg("train", [f"data={name}", f"data.root={root}", "data.img_size=32", "data.num_workers=0"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert dm.img_size == 32 and len(dm.test_set) > 0


def test_timm_training_augmentation_on_a_file_dataset(tmp_path):
    root, *_ = write_cub200(tmp_path)
    aug = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "interpolation": "bicubic"}
    dm = ClassificationDataModule(dataset="cub200", root=str(root), img_size=IMG_SIZE, timm_aug=aug, batch_size=4)
    dm.setup()
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert "RandAugment" in names and "RandomErasing" in names
    x, y = dm.train_set[0]
    assert x.shape == (3, IMG_SIZE, IMG_SIZE) and x.dtype.is_floating_point
    assert "RandAugment" not in [type(t).__name__ for t in dm.test_set.transform.transforms]


def test_download_true_fetches_then_reads_and_refuses_without_a_source(tmp_path, monkeypatch):
    """The download hook runs only when the data is absent; its result is read like a user's copy."""
    import dataclasses

    from zoo.data import standard

    calls = []

    def fake_download(root):  # stands in for the archive download (no network in tests)
        calls.append(root)
        write_cub200(root.parent)  # unpacks CUB_200_2011/ under root, as the real archive does

    monkeypatch.setitem(standard.STANDARD, "cub200", dataclasses.replace(standard.STANDARD["cub200"], download=fake_download))
    root = tmp_path / "cub200"
    dm = ClassificationDataModule(dataset="cub200", root=str(root), img_size=IMG_SIZE, download=True)
    dm.setup()
    assert len(calls) == 1 and len(dm.test_set) == 4
    ClassificationDataModule(dataset="cub200", root=str(root), img_size=IMG_SIZE, download=True).setup()
    assert len(calls) == 1  # already there: not downloaded again
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded automatically"):
        ClassificationDataModule(dataset="stanford_cars", root=str(tmp_path / "cars"), img_size=IMG_SIZE,
                                 download=True).setup()
