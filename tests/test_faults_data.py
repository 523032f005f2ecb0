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
