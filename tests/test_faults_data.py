"""Issue 18, data faults: unreadable evaluation images are never substituted, empty class folders are
refused, non-finite evaluation inputs/losses stop the run naming the files, 16-bit images are scaled."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _png(path: Path, value=0, size=(8, 8), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype)).save(path)
    return path


# ---------------------------------------------------------------- 16-bit images
def _ramp16(path: Path) -> Path:
    """A 16-bit grey ramp 0..63000: all but the first pixel would clip to 255 if read as 8-bit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(path)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_classification_images_scaled_by_their_range(tmp_path, suffix):
    from zoo.data.folders import ImageList

    path = _ramp16(tmp_path / f"ramp{suffix}")
    expected = np.rint(np.arange(64).reshape(8, 8) * 1000 * 255 / 65535)
    for chans in (1, 3):
        img, _ = ImageList([(str(path), 0)], in_chans=chans)[0]
        arr = np.asarray(img).astype(float).reshape(8, 8, -1)
        assert arr.shape[-1] == chans
        assert (arr == 255).mean() < 0.05  # today: 63 of 64 pixels clipped to 255
        np.testing.assert_allclose(arr[..., 0], expected, atol=1)


def test_16bit_segmentation_image_scaled_and_16bit_mask_stays_labels(tmp_path):
    from zoo.data.folders import SegFolderDataset

    img = _ramp16(tmp_path / "images" / "a.png")
    labels = (np.arange(64).reshape(8, 8) % 3).astype(np.uint16)
    mask = tmp_path / "masks" / "a.png"
    mask.parent.mkdir(parents=True)
    Image.fromarray(labels).save(mask)
    assert Image.open(mask).mode.startswith("I")  # a 16-bit mask file
    x, m = SegFolderDataset([(img, mask)], num_classes=3, in_chans=1)[0]
    expected = np.rint(np.arange(64).reshape(8, 8) * 1000 * 255 / 65535)
    np.testing.assert_allclose(x[0].numpy().astype(float), expected, atol=1)
    assert m.dtype == torch.long and torch.equal(m, torch.from_numpy(labels.astype(np.int64)))


# ---------------------------------------------------------------- empty class folders
def _imagefolder(root: Path, classes=("a", "b"), n=6, splits=("train",)) -> Path:
    for split in splits:
        for k, c in enumerate(classes):
            for i in range(n):
                _png(root / split / c / f"{c}{i}.png", value=40 * k + i)
    return root


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    from zoo.data import ClassificationDataModule
    from zoo.errors import DataFormatError

    root = _imagefolder(tmp_path / "data")
    (root / "train" / "phantom").mkdir()
    (root / "train" / "phantom" / "notes.txt").write_text("no images here")
    dm = ClassificationDataModule(dataset="imagefolder", root=str(root), img_size=8, batch_size=4)
    with pytest.raises(DataFormatError, match="phantom") as e:
        dm.num_classes  # today: 3 classes, one of them without a sample
    assert "allow_empty_classes" in str(e.value)
    with pytest.raises(DataFormatError, match="phantom"):
        dm.setup("fit")


def test_empty_class_folder_allowed_with_a_loud_warning(tmp_path, caplog):
    from zoo.data import ClassificationDataModule

    root = _imagefolder(tmp_path / "data")
    (root / "train" / "phantom").mkdir()
    dm = ClassificationDataModule(dataset="imagefolder", root=str(root), img_size=8, batch_size=4,
                                  allow_empty_classes=True)
    with caplog.at_level("WARNING", logger="zoo.data"):
        assert dm.class_names == ["a", "b", "phantom"]
    assert "EMPTY CLASS" in caplog.text and str(root / "train" / "phantom") in caplog.text


# ---------------------------------------------------------------- unreadable evaluation images
def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:40], "zero": b"", "garbage": b"not an image"}[how])


def _classification_dm(root: Path, **kw):
    from zoo.data import ClassificationDataModule

    dm = ClassificationDataModule(dataset="imagefolder", root=str(root), img_size=8, batch_size=4, augment=False,
                                  in_chans=1, mean=[0.5], std=[0.5], **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("how", ["truncated", "zero", "garbage"])
def test_unreadable_eval_image_is_an_error_by_default(tmp_path, split, how):
    from zoo.errors import DataFormatError

    root = _imagefolder(tmp_path / "data", splits=("train", "val", "test"), n=3)
    bad = root / split / "b" / "b1.png"
    _corrupt(bad, how)
    dm = _classification_dm(root)
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    with pytest.raises(DataFormatError, match="b1.png") as e:  # today: replaced by b2.png and scored
        list(loader)
    assert "data.bad_images=skip" in str(e.value)


def test_unreadable_eval_image_left_out_with_skip_never_replaced(tmp_path, caplog):
    root = _imagefolder(tmp_path / "data", splits=("train", "val", "test"), n=3)
    bad = root / "test" / "a" / "a0.png"
    _corrupt(bad, "truncated")
    with caplog.at_level("WARNING", logger="zoo.data"):
        dm = _classification_dm(root, bad_images="skip")
    assert dm.test_set.left_out == [str(bad)] and len(dm.test_set) == 5
    assert str(bad) not in [p for p, _ in dm.test_set.samples]
    labels = torch.cat([y for _, y in dm.test_dataloader()]).tolist()
    assert sorted(labels) == [0, 0, 1, 1, 1]  # today: 6 items, a0 replaced by a1 (scored twice)
    assert "a0.png" in caplog.text and "1 of 6 items left out" in caplog.text
    assert dm.val_set.left_out == [] and len(dm.val_set) == 6
    # training keeps replace-and-count
    _corrupt(root / "train" / "a" / "a0.png", "garbage")
    dm = _classification_dm(root)
    assert len(dm.train_set) == 6 and dm.train_set.bad_images == "skip" and dm.train_set.split == "train"
    assert len(list(dm.train_dataloader())) == 2


def test_unreadable_segmentation_eval_pair_error_or_left_out(tmp_path):
    from zoo.data import SegmentationDataModule
    from zoo.errors import DataFormatError

    root = tmp_path / "seg"
    for split in ("train", "val", "test"):
        for i in range(3):
            _png(root / split / "images" / f"{i}.png", 10 * i)
            _png(root / split / "masks" / f"{i}.png", i % 2)
    _corrupt(root / "test" / "masks" / "1.png", "truncated")
    kw = dict(dataset="segfolder", root=str(root), num_classes=2, img_size=8, batch_size=2, in_chans=1,
              mean=[0.5], std=[0.5])
    dm = SegmentationDataModule(**kw)
    dm.setup("fit")
    with pytest.raises(DataFormatError, match="1.png"):
        list(dm.test_dataloader())
    dm = SegmentationDataModule(bad_images="skip", **kw)
    dm.setup("fit")
    assert dm.test_set.left_out == [str(root / "test" / "images" / "1.png")]
    assert [str(p[0].name) for p in dm.test_set.pairs] == ["0.png", "2.png"]


def test_skipped_count_reaches_metrics_json(tmp_path):
    """``test/skipped`` in evaluate.py's metrics.json (and train.py's), the file names in the log."""
    import json

    from conftest import compose
    from train import train

    root = _imagefolder(tmp_path / "data", splits=("train", "val", "test"), n=4)
    _corrupt(root / "test" / "b" / "b3.png", "garbage")
    run = tmp_path / "run"
    overrides = ["model=halonet_tiny", "data=imagefolder", f"data.root={root}", "data.bad_images=skip",
                 "data.img_size=32", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
                 "+trainer.limit_train_batches=1", "+trainer.num_sanity_val_steps=0",
                 "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]
    metrics = train(compose("train", overrides, run))
    assert metrics["test/skipped"] == 1.0
    assert json.loads((run / "metrics.json").read_text())["test/skipped"] == 1.0
