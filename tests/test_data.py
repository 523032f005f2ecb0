"""The data room: every dataset sets up, keeps its batch contract, splits reproducibly, and
fails with messages that name the file or folder at fault. On-disk fixtures are written in
the exact formats users have (PNG trees, grey-level masks, pt/h5 bags, CIFAR pickles)."""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import ClassificationDataModule, MILDataModule, SegmentationDataModule, collate_bags
from zoo.data.common import UnknownDatasetError
from zoo.errors import DataFormatError, DatasetNotFoundError, ZooError


def paths(ds) -> list[str]:
    return [str(p[0]) for p in getattr(ds, "samples", getattr(ds, "pairs", []))]


# ============================================================================ classification
def test_digits_contract_and_split():
    dm = ClassificationDataModule(dataset="digits", batch_size=16)
    assert dm.task == "classification"
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]  # before setup
    assert dm.img_size == 32 and len(dm.mean) == 3 and dm.in_chans == 3 and dm.model_kwargs() == {}
    dm.setup()
    first = dm.train_set
    dm.setup()  # idempotent: nothing rebuilt
    assert dm.train_set is first
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long and int(y.max()) < 10
    tr, va, te = (set(s.indices.tolist()) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr) + len(va) + len(te) == 1797
    assert abs(len(te) - 359) <= 1 and abs(len(va) - 180) <= 1  # 70/10/20
    # stratified: every digit in every split
    assert set(dm.test_set.targets.tolist()) == set(range(10))

    same = ClassificationDataModule(dataset="digits", batch_size=16)
    same.setup()
    assert np.array_equal(same.val_set.indices, dm.val_set.indices)
    assert np.array_equal(same.test_set.indices, dm.test_set.indices)
    other = ClassificationDataModule(dataset="digits", batch_size=16, seed=1)
    other.setup()
    assert not np.array_equal(other.test_set.indices, dm.test_set.indices)


def test_loaders_seeded_shuffle_and_deterministic_eval():
    def first_batches(seed):
        dm = ClassificationDataModule(batch_size=32, seed=seed, augment=False)
        dm.setup()
        return next(iter(dm.train_dataloader()))[1], next(iter(dm.val_dataloader()))[1]

    (a_tr, a_va), (b_tr, b_va) = first_batches(0), first_batches(0)
    assert torch.equal(a_tr, b_tr) and torch.equal(a_va, b_va)
    dm = ClassificationDataModule(batch_size=32, augment=False)
    dm.setup()
    assert torch.equal(next(iter(dm.val_dataloader()))[1], dm.val_set.targets[:32])  # no shuffle
    loader = ClassificationDataModule(batch_size=8, num_workers=1).train_dataloader()
    assert loader.persistent_workers


def test_configure_for_model_fills_only_what_user_left_unset():
    dm = ClassificationDataModule(batch_size=4, in_chans=1)
    dm.configure_for_model((3, 48, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert dm.img_size == 48 and dm.mean == (0.5,) and dm.std == (0.25,)
    assert dm.model_kwargs() == {"in_chans": 1}
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 1, 48, 48)

    user = ClassificationDataModule(batch_size=4, img_size=24, mean=[0.1, 0.2, 0.3])
    user.configure_for_model((3, 224, 224), (0.5,) * 3, (0.5,) * 3)
    assert user.img_size == 24 and user.mean == (0.1, 0.2, 0.3) and user.std == (0.5,) * 3
    user.setup()
    user.configure_for_model((3, 16, 16), None, None)  # still fine after setup: rebuilt
    user.setup()
    assert next(iter(user.test_dataloader()))[0].shape[-1] == 24


def test_unknown_dataset_names_choices():
    with pytest.raises(UnknownDatasetError, match="digits"):
        ClassificationDataModule(dataset="mnist", batch_size=2)
    assert issubclass(UnknownDatasetError, ZooError)


@pytest.fixture
def image_tree(tmp_path):
    """root/train/{bird,cat,dog}/*.png (odd sizes), root/test/{cat,dog}; no val split."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for split, classes, n in (("train", ("dog", "cat", "bird"), 10), ("test", ("cat", "dog"), 3)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (20 + i, 26, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{c}_{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(image_tree):
    dm = ClassificationDataModule(dataset="imagefolder", root=str(image_tree), img_size=32, batch_size=5)
    assert dm.class_names == ["bird", "cat", "dog"]  # sorted as ImageFolder does; before setup
    dm.setup()
    assert dm.num_classes == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    # test/ exists (with train's class ids); val/ does not: a stratified 10% of train
    assert [t for _, t in dm.test_set.samples] == [1] * 3 + [2] * 3
    assert len(dm.val_set) == 3 and sorted(dm.val_set.targets) == [0, 1, 2]
    assert not set(paths(dm.val_set)) & set(paths(dm.train_set))
    assert len(dm.train_set) == 27
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (3, 3, 32, 32)

    again = ClassificationDataModule(dataset="imagefolder", root=str(image_tree), img_size=32, batch_size=5)
    again.setup()
    assert paths(again.val_set) == paths(dm.val_set)

    grey = ClassificationDataModule(dataset="imagefolder", root=str(image_tree), img_size=16,
                                    batch_size=2, in_chans=1)
    grey.setup()
    assert next(iter(grey.test_dataloader()))[0].shape == (2, 1, 16, 16)


def test_imagefolder_missing_split_folder_and_no_test(image_tree, tmp_path):
    import shutil

    shutil.rmtree(image_tree / "test")
    dm = ClassificationDataModule(dataset="imagefolder", root=str(image_tree), img_size=16, batch_size=4)
    dm.setup()
    assert len(dm.test_set) == 6 and len(dm.val_set) == 3 and len(dm.train_set) == 21
    assert not set(paths(dm.test_set)) & set(paths(dm.train_set) + paths(dm.val_set))

    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        ClassificationDataModule(dataset="imagefolder", root=str(missing), batch_size=2).setup()
    assert str(missing / "train") in str(err.value) and "CLASS" in str(err.value)


def _write_cifar(root, name, n_train=4, n_test=6):
    rng = np.random.default_rng(0)

    def batch(n, key, k):
        data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
        entry = {"data": data, key: rng.integers(0, k, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        if key == "fine_labels":
            entry["coarse_labels"] = rng.integers(0, 20, n).tolist()
        return entry

    if name == "cifar10":
        folder, key, k = root / "cifar-10-batches-py", "labels", 10
        files = {f"data_batch_{i}": batch(n_train, key, k) for i in range(1, 6)}
        files["test_batch"] = batch(n_test, key, k)
        files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    else:
        folder, key, k = root / "cifar-100-python", "fine_labels", 100
        files = {"train": batch(5 * n_train, key, k), "test": batch(n_test, key, k)}
        files["meta"] = {"fine_label_names": [f"f{i:02d}" for i in range(100)],
                         "coarse_label_names": [f"g{i}" for i in range(20)]}
    folder.mkdir(parents=True)
    for fname, obj in files.items():
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f)
    return folder


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_fixture(tmp_path, name, k):
    _write_cifar(tmp_path, name)
    dm = ClassificationDataModule(dataset=name, root=str(tmp_path), batch_size=4, verify_checksums=False)
    assert dm.num_classes == k
    dm.setup()
    assert dm.num_classes == k and len(dm.class_names) == k
    assert dm.class_names[0] == ("c0" if name == "cifar10" else "f00")
    assert len(dm.train_set) + len(dm.val_set) == 20 and len(dm.val_set) == 2 and len(dm.test_set) == 6
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    dm.configure_for_model((3, 40, 40), None, None)
    assert next(iter(dm.test_dataloader()))[0].shape == (4, 3, 40, 40)

    with pytest.raises(DataFormatError, match="verify_checksums"):  # fixture md5s are not the real ones
        ClassificationDataModule(dataset=name, root=str(tmp_path), batch_size=4).setup()


def test_cifar_missing_or_half_downloaded(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        ClassificationDataModule(dataset="cifar10", root=str(tmp_path), batch_size=2).setup()
    assert "data.download=true" in str(err.value) and str(tmp_path) in str(err.value)
    folder = _write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        ClassificationDataModule(dataset="cifar10", root=str(tmp_path), batch_size=2,
                                 verify_checksums=False).setup()


# ============================================================================ segmentation
def test_shapes_contract_and_determinism():
    kw = dict(batch_size=8, num_train=40, num_val=10, num_test=10)
    dm = SegmentationDataModule(**kw)
    assert dm.task == "segmentation" and dm.num_classes == 4
    assert dm.hparams.num_classes == 4  # Lightning merges it with the task module's num_classes
    assert dm.class_names == ["background", "circle", "square", "triangle"]
    dm.setup()
    x, m = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
    assert m.shape == (8, 64, 64) and m.dtype == torch.long
    assert set(m.unique().tolist()) <= {0, 1, 2, 3}
    idx = [set(s.indices.tolist()) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])

    same = SegmentationDataModule(**kw)
    same.setup()
    assert torch.equal(same.val_set.images, dm.val_set.images) and torch.equal(same.val_set.masks, dm.val_set.masks)
    other = SegmentationDataModule(**kw, seed=3)
    other.setup()
    assert not torch.equal(other.val_set.masks, dm.val_set.masks)
    # every class present and scenes actually differ
    assert set(dm.train_set.masks.unique().tolist()) == {0, 1, 2, 3}

    dm.configure_for_model((3, 96, 96), None, None)
    xv, mv = next(iter(dm.val_dataloader()))
    assert xv.shape == (8, 3, 96, 96) and mv.shape == (8, 96, 96)
    assert set(mv.unique().tolist()) <= {0, 1, 2, 3}  # nearest-neighbour masks: no blended ids


def test_shapes_default_splits():
    # no wall-clock assertion: timed tests fail on loaded machines (speed belongs in benchmarks)
    dm = SegmentationDataModule(batch_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1000, 200, 200)


CHAOS_MAP = {0: 0, 63: 1, 126: 2, 189: 3, 252: 4}


@pytest.fixture
def seg_tree(tmp_path):
    """root/train/{images,masks}: RGB JPEG/PNG images + grey-level PNG masks; no val/test."""
    rng = np.random.default_rng(0)
    root = tmp_path / "chaos"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    levels = np.array(list(CHAOS_MAP) + [30])  # 30 is not in the map -> ignore
    for i in range(12):
        h, w = 24 + i, 30
        ext = ".jpg" if i % 2 else ".png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / "images" / f"s{i:02d}{ext}")
        Image.fromarray(levels[rng.integers(0, len(levels), (h, w))].astype(np.uint8), mode="L").save(
            root / "train" / "masks" / f"s{i:02d}.png")
    return root


def test_segfolder(seg_tree):
    kw = dict(dataset="segfolder", root=str(seg_tree), num_classes=5, value_map=CHAOS_MAP, img_size=32, batch_size=4)
    dm = SegmentationDataModule(**kw, rotate_degrees=15)
    assert dm.num_classes == 5 and dm.class_names == [f"class_{i}" for i in range(5)]
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 1, 2)  # 10% / 20% of 12, rounded
    assert not set(paths(dm.train_set)) & set(paths(dm.val_set) + paths(dm.test_set))
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        for x, m in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            assert m.dtype == torch.long and m.shape[1:] == (32, 32)
            assert set(m.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    _, m = dm.test_set[0]
    assert 255 in m.unique().tolist() and m.max() == 255  # grey level 30 ignored

    same = SegmentationDataModule(**kw)
    same.setup()
    assert paths(same.test_set) == paths(dm.test_set)
    grey = SegmentationDataModule(**kw | {"in_chans": 1})
    grey.setup()
    assert grey.val_set[0][0].shape == (1, 32, 32)
    # without value_map, the grey levels are not class ids: a clear error names the mask
    raw = SegmentationDataModule(**{k: v for k, v in kw.items() if k != "value_map"})
    raw.setup()
    with pytest.raises(DataFormatError, match="value_map"):
        raw.val_set[0]


def test_segfolder_errors(seg_tree, tmp_path):
    kw = dict(dataset="segfolder", num_classes=5, value_map=CHAOS_MAP, img_size=16, batch_size=2)
    Image.new("L", (5, 5)).save(seg_tree / "train" / "masks" / "s03.png")  # wrong size for its image
    dm = SegmentationDataModule(root=str(seg_tree), **kw, val_fraction=0, test_fraction=0)
    dm.setup()
    assert len(dm.train_set) == 12 and len(dm.val_set) == len(dm.test_set) == 0
    with pytest.raises(DataFormatError) as err:
        dm.train_set[3]
    assert "s03.png" in str(err.value) and "s03.jpg" in str(err.value)

    (seg_tree / "train" / "masks" / "s05.png").unlink()
    with pytest.raises(DataFormatError, match="s05.jpg"):
        SegmentationDataModule(root=str(seg_tree), **kw).setup()

    with pytest.raises(DatasetNotFoundError) as err:
        SegmentationDataModule(root=str(tmp_path / "absent"), **kw).setup()
    assert str(tmp_path / "absent") in str(err.value) and "masks" in str(err.value)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationDataModule(dataset="segfolder", root=str(seg_tree), batch_size=2)


# ============================================================================ MIL
def test_digit_bags():
    kw = dict(batch_size=4, num_train=60, num_val=20, num_test=30)
    dm = MILDataModule(**kw)
    assert dm.task == "mil" and dm.num_classes == 2 and dm.class_names == ["negative", "positive"]
    assert dm.model_kwargs() == {"in_chans": 1} and dm.img_size == 28
    dm.setup()
    bags, mask, y = next(iter(dm.train_dataloader()))
    assert bags.dtype == torch.float32 and bags.ndim == 5 and bags.shape[0] == 4 and bags.shape[2:] == (1, 28, 28)
    assert mask.dtype == torch.bool and mask.shape == bags.shape[:2] and y.dtype == torch.long
    assert (bags[~mask] == 0).all()

    for ds in (dm.train_set, dm.val_set, dm.test_set):
        labels = ds.labels.tolist()
        assert labels.count(1) == labels.count(0)  # balanced by alternation
        for inst, label in zip(ds.instance_labels, labels):
            assert label == int((inst == 9).any())
            assert 1 <= len(inst) <= 100
    lengths = [len(b) for b in dm.train_set.bag_indices]
    assert 8 <= np.mean(lengths) <= 12
    # mask matches bag lengths, batch by batch
    start = 0
    for bags, mask, y in dm.val_dataloader():
        n = [len(b) for b in dm.val_set.bag_indices[start:start + len(y)]]
        assert mask.sum(1).tolist() == n and bags.shape[1] == max(n)
        start += len(y)
    # instance pools of the splits are disjoint
    pools = [set(np.concatenate(s.bag_indices).tolist()) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])

    same = MILDataModule(**kw)
    same.setup()
    assert all(np.array_equal(a, b) for a, b in zip(same.test_set.bag_indices, dm.test_set.bag_indices))
    other = MILDataModule(**kw, seed=5, target_digit=3)
    other.setup()
    assert not all(np.array_equal(a, b) for a, b in zip(other.test_set.bag_indices, dm.test_set.bag_indices))
    assert all(l == int((i == 3).any()) for i, l in zip(other.test_set.instance_labels, other.test_set.labels.tolist()))


def _bag_tree(tmp_path, fmt: str, split_column: bool, d: int = 8, n_bags: int = 20):
    rng = np.random.default_rng(0)
    root = tmp_path / f"wsi_{fmt}_{split_column}"
    folder = root / ("pt_files" if fmt == "pt" else "h5_files")
    folder.mkdir(parents=True)
    rows, lengths = ["bag_id,label" + (",split" if split_column else "")], {}
    for i in range(n_bags):
        bag, n = f"slide_{i:02d}", int(rng.integers(1, 15))
        feats = rng.normal(size=(n, d)).astype(np.float32)
        if fmt == "pt":
            torch.save(torch.from_numpy(feats), folder / f"{bag}.pt")
        else:
            with h5py.File(folder / f"{bag}.h5", "w") as f:
                f["features"] = feats
                f["coords"] = rng.integers(0, 10_000, (n, 2))
        label = ("normal", "tumor")[i % 2]
        split = ("train",) * 6 + ("val", "test", "test", "train")
        rows.append(f"{bag},{label}" + (f",{split[i % 10]}" if split_column else ""))
        lengths[bag] = n
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, lengths


@pytest.mark.parametrize("fmt,split_column", [("pt", True), ("pt", False), ("h5", True), ("h5", False)])
def test_featurebags(tmp_path, fmt, split_column):
    root, lengths = _bag_tree(tmp_path, fmt, split_column)
    dm = MILDataModule(dataset="featurebags", root=str(root), batch_size=3)
    assert dm.class_names == ["normal", "tumor"] and dm.num_classes == 2
    assert dm.model_kwargs() == {"in_dim": 8}
    dm.setup()
    ids = [ds.bag_ids for ds in (dm.train_set, dm.val_set, dm.test_set)]
    assert sorted(sum(ids, [])) == sorted(lengths)  # every bag in exactly one split
    if split_column:
        assert ids[1] == ["slide_06", "slide_16"]
        assert ids[2] == ["slide_07", "slide_08", "slide_17", "slide_18"]
    else:  # seeded stratified split: 10% val, 20% test
        assert (len(ids[1]), len(ids[2])) == (2, 4)
        again = MILDataModule(dataset="featurebags", root=str(root), batch_size=3)
        again.setup()
        assert again.test_set.bag_ids == ids[2] and again.val_set.bag_ids == ids[1]
    start = 0
    for bags, mask, y in dm.test_dataloader():
        n = [lengths[b] for b in dm.test_set.bag_ids[start:start + len(y)]]
        assert bags.dtype == torch.float32 and bags.shape == (len(y), max(n), 8)
        assert mask.dtype == torch.bool and mask.sum(1).tolist() == n and y.dtype == torch.long
        assert (bags[~mask] == 0).all()
        start += len(y)
    coords = dm.test_set.coords(0)
    if fmt == "h5":
        assert coords.shape == (lengths[dm.test_set.bag_ids[0]], 2)
    else:
        assert coords is None


def test_featurebags_int_labels_and_both_folders(tmp_path):
    root, lengths = _bag_tree(tmp_path, "h5", False, n_bags=10)
    (root / "pt_files").mkdir()
    for b in list(lengths)[:5]:  # features from pt where present, coords still from h5
        torch.save(torch.ones(lengths[b], 8), root / "pt_files" / f"{b}.pt")
    (root / "labels.csv").write_text("bag_id,label\n" + "".join(f"{b},{i % 3}\n" for i, b in enumerate(lengths)))
    dm = MILDataModule(dataset="featurebags", root=str(root), labels="labels.csv", batch_size=2)
    dm.setup()
    assert dm.class_names == ["0", "1", "2"]
    ds = dm.train_set
    for i, b in enumerate(ds.bag_ids):
        x, _ = ds[i]
        assert x.shape == (lengths[b], 8) and ds.coords(i).shape == (lengths[b], 2)
        assert ds.files[i].suffix == (".pt" if b in list(lengths)[:5] else ".h5")


def test_featurebags_errors(tmp_path):
    root, lengths = _bag_tree(tmp_path, "pt", True)
    with open(root / "labels.csv", "a") as f:
        f.write("slide_99,tumor,train\n")
    with pytest.raises(DataFormatError) as err:
        MILDataModule(dataset="featurebags", root=str(root), batch_size=2).setup()
    assert "slide_99" in str(err.value) and str(root / "pt_files") in str(err.value)

    root, lengths = _bag_tree(tmp_path / "b", "pt", True)
    torch.save(torch.zeros(0, 8), root / "pt_files" / "slide_07.pt")  # a test bag
    torch.save(torch.zeros(4, 5), root / "pt_files" / "slide_08.pt")  # wrong D
    dm = MILDataModule(dataset="featurebags", root=str(root), batch_size=1)
    dm.setup()
    with pytest.raises(DataFormatError, match="slide_07"):
        dm.test_set[0]
    with pytest.raises(DataFormatError, match="slide_08.pt"):
        dm.test_set[1]

    with pytest.raises(DatasetNotFoundError) as err:
        MILDataModule(dataset="featurebags", root=str(tmp_path / "nope"), batch_size=1).setup()
    assert str(tmp_path / "nope") in str(err.value) and "pt_files" in str(err.value)


def test_collate_pads_and_rejects_empty_bags():
    bags, mask, y = collate_bags([(torch.ones(3, 4), 1), (torch.ones(1, 4), 0)])
    assert bags.shape == (2, 3, 4) and mask.tolist() == [[True] * 3, [True, False, False]]
    assert y.tolist() == [1, 0] and bags[1, 1:].abs().sum() == 0
    with pytest.raises(DataFormatError, match="empty"):
        collate_bags([(torch.ones(3, 4), 1), (torch.ones(0, 4), 0)])


def test_datamodules_share_one_constructor_list():
    """The options every datamodule takes are declared once (ZooDataModule) and saved, with their defaults,
    next to each task's own; the config check knows them and still refuses a misspelt key."""
    import inspect

    from zoo.data import ClassificationDataModule, MILDataModule, SegmentationDataModule
    from zoo.data.common import ZooDataModule
    from zoo.validate import ConfigError, check_kwargs

    shared = [n for n in inspect.signature(ZooDataModule.__init__).parameters if n != "self"]
    for cls, own in ((ClassificationDataModule, "resize_ratio"), (SegmentationDataModule, "value_map"),
                     (MILDataModule, "labels")):
        dm = cls()
        assert set(shared) | {own} <= set(dm.hparams), cls.__name__
        assert dm.hparams.val_fraction == 0.1 and dm.hparams.interpolation is None
        check_kwargs("data", cls, {"img_size": 32, "crop_pct": 0.9, own: None})
        with pytest.raises(ConfigError, match="img_sise"):
            check_kwargs("data", cls, {"img_sise": 32})
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        ClassificationDataModule(in_chans=2)
