"""Issue #18, items 4 (bags) and 7: labels that would change the class list, and config values out of
range or missing, are errors naming the file and row, or the key, before anything trains."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

from zoo.data import MILDataModule
from zoo.errors import DataFormatError


# ---------------------------------------------------------------- item 4: featurebags labels
def _bags(root, labels: list[str]) -> list[str]:
    """``root/pt_files/b<i>.pt`` and ``root/labels.csv`` with the given raw labels; returns the bag ids."""
    (root / "pt_files").mkdir(parents=True, exist_ok=True)
    ids = [f"b{i}" for i in range(len(labels))]
    for i, b in enumerate(ids):
        torch.save(torch.randn(3, 4, generator=torch.Generator().manual_seed(i)), root / "pt_files" / f"{b}.pt")
    (root / "labels.csv").write_text("bag_id,label\n" + "".join(f"{b},{v}\n" for b, v in zip(ids, labels)))
    return ids


def _classes(root, **kw):
    dm = MILDataModule(dataset="featurebags", root=str(root), num_workers=0, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("labels,declared,bad_line,bad", [
    (["normal", "tumor", "normal", "tumr"], dict(class_names=["normal", "tumor"]), 5, "'tumr'"),
    (["0", "1", "0", ""], dict(class_names=["normal", "tumor"]), 5, "''"),
    (["0", "1", "2", "1"], dict(class_names=["normal", "tumor"]), 4, "'2'"),
    (["0", "1", "2", "1"], dict(num_classes=2), 4, "'2'"),
    (["0", "1", "tumor", "1"], dict(num_classes=2), 4, "'tumor'"),
])
def test_label_outside_declared_classes_names_csv_and_row(tmp_path, labels, declared, bad_line, bad):
    """Today these make classes ['0', '1', 'tumor'] or a third class and shift the ids."""
    _bags(tmp_path, labels)
    with pytest.raises(DataFormatError, match="not one of the declared classes") as e:
        _classes(tmp_path, **declared)
    msg = str(e.value)
    assert str(tmp_path / "labels.csv") in msg and f"line {bad_line} " in msg and bad in msg


def test_declared_classes_keep_their_ids(tmp_path):
    ids = _bags(tmp_path, ["tumor", "normal", "0", "1", "tumor", "normal"])
    dm = _classes(tmp_path, class_names=["tumor", "normal"], val_fraction=0.0, test_fraction=0.0)
    assert dm.class_names == ["tumor", "normal"]  # by name, not by sorted order (which would swap them)
    got = dict(zip(dm.train_set.bag_ids, dm.train_set.labels))
    assert [got[b] for b in ids] == [0, 1, 0, 1, 0, 1]
    # a declared class that no bag has yet keeps the class count (ids 0..C-1)
    _bags(tmp_path / "few", ["0", "1", "0", "1"])
    assert _classes(tmp_path / "few", num_classes=3).class_names == ["0", "1", "2"]


def test_label_map_unknown_label_names_row(tmp_path):
    _bags(tmp_path, ["0", "3", "5", "7", "1"])
    with pytest.raises(DataFormatError, match="not in data.label_map") as e:
        _classes(tmp_path, label_map={0: 0, 1: 0, 3: 1, 5: 2})
    assert str(tmp_path / "labels.csv") in str(e.value) and "line 5 (bag 'b3')" in str(e.value)
    # the map's targets are the classes: 0..2 though no bag maps to 2 here
    _bags(tmp_path / "ok", ["0", "1", "3", "1", "0", "3"])
    assert _classes(tmp_path / "ok", label_map={0: 0, 1: 0, 3: 1, 5: 2}).num_classes == 3


def test_undeclared_labels_mixed_or_empty_are_refused(tmp_path):
    _bags(tmp_path / "mix", ["0", "1", "tumor", "0", "1", "tumor"])
    with pytest.raises(DataFormatError, match="mix class ids and names") as e:
        _classes(tmp_path / "mix")
    assert "line 2 (bag 'b0')" in str(e.value) and "line 4 (bag 'b2')" in str(e.value)
    _bags(tmp_path / "empty", ["a", "b", "", "a", "b", "a"])
    with pytest.raises(DataFormatError, match="empty label") as e:
        _classes(tmp_path / "empty")
    assert str(tmp_path / "empty" / "labels.csv") in str(e.value) and "line 4 (bag 'b2')" in str(e.value)
    # today's inference stays: names in sorted order, integer ids as they are
    _bags(tmp_path / "names", ["tumor", "normal"] * 3)
    assert _classes(tmp_path / "names").class_names == ["normal", "tumor"]
    _bags(tmp_path / "ids", ["0", "2", "1"] * 2)
    assert _classes(tmp_path / "ids").class_names == ["0", "1", "2"]


def test_h5_group_label_past_class_count_names_group(tmp_path):
    import h5py

    with h5py.File(tmp_path / "f.h5", "w") as f:
        for i, label in enumerate([0, 1, 0, 2]):
            g = f.create_group(f"slide_{i}")
            g["feat"] = torch.randn(3, 4).numpy()
            g.attrs["label"] = label
    with pytest.raises(DataFormatError, match="not one of the declared classes") as e:
        _classes(tmp_path, h5_file="f.h5", class_names=["normal", "tumor"])
    assert str(tmp_path / "f.h5") in str(e.value) and "'slide_3'" in str(e.value)
