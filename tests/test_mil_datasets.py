"""CAMELYON16 and BRACS feature bags in the layouts users have: CLAM folders, ACMIL's single HDF5, official splits."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from zoo.data import MILDataModule
from zoo.errors import DataFormatError, DatasetNotFoundError

D = 8
BRACS_MERGE = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}


def _feat(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def write_acmil_h5(path, slides: dict[str, int]) -> None:
    """ACMIL's layout: one group per slide, datasets feat [N, D] and coords [N, 2], attrs['label']."""
    with h5py.File(path, "w") as f:
        for k, (name, label) in enumerate(slides.items()):
            g = f.create_group(name)
            n = 3 + k % 4
            g.create_dataset("feat", data=_feat(n, k))
            g.create_dataset("coords", data=np.stack([np.arange(n) * 512, np.zeros(n)], 1).astype(np.int64))
            g.attrs["label"] = label


CAMELYON = {**{f"normal_{i:03d}": 0 for i in range(1, 9)}, **{f"tumor_{i:03d}": 1 for i in range(1, 7)},
            **{f"test_{i:03d}": i % 2 for i in range(1, 7)}}


def test_acmil_single_h5_camelyon_rule_splits(tmp_path):
    write_acmil_h5(tmp_path / "feats.h5", CAMELYON)
    dm = MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="feats.h5", class_names=["normal", "tumor"])
    dm.setup()
    assert dm.num_classes == 2 and dm.in_dim == D
    assert sorted(dm.test_set.bag_ids) == sorted(b for b in CAMELYON if b.startswith("test"))
    assert len(dm.train_set) + len(dm.val_set) == 14 and len(dm.val_set) >= 1
    x, y = dm.test_set[0]
    assert x.shape[1] == D and y == CAMELYON[dm.test_set.bag_ids[0]]
    assert dm.test_set.coords(0).shape == (x.shape[0], 2)
    bags, mask, labels = next(iter(dm.train_dataloader()))
    assert bags.shape[-1] == D and mask.dtype == torch.bool


def test_official_split_json_is_followed(tmp_path):
    write_acmil_h5(tmp_path / "feats.h5", CAMELYON)
    names = sorted(CAMELYON)
    split = {"train_names": names[:10], "val_names": names[10:13], "test_names": names[13:]}
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "split_1.json").write_text(json.dumps(split))
    dm = MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="feats.h5", split_file="splits/split_1.json")
    dm.setup()
    assert (sorted(dm.train_set.bag_ids), sorted(dm.val_set.bag_ids), sorted(dm.test_set.bag_ids)) == \
        (names[:10], names[10:13], names[13:])


def test_clam_folders_with_acmil_camelyon_csv_and_split_json(tmp_path):
    (tmp_path / "pt_files").mkdir()
    (tmp_path / "h5_files").mkdir()
    rows = ["case_id,slide_id,label"]
    for k, (name, label) in enumerate(CAMELYON.items()):
        if k % 2:
            torch.save(torch.from_numpy(_feat(4, k)), tmp_path / "pt_files" / f"{name}.pt")
        else:
            with h5py.File(tmp_path / "h5_files" / f"{name}.h5", "w") as f:
                f.create_dataset("features", data=_feat(4, k))
                f.create_dataset("coords", data=np.zeros((4, 2), dtype=np.int64))
        rows.append(f"patient_{k},{name},{label}")
    (tmp_path / "camelyon16.csv").write_text("\n".join(rows) + "\n")
    names = sorted(CAMELYON)
    (tmp_path / "split_2.json").write_text(json.dumps(
        {"train_names": names[:12], "val_names": names[12:15], "test_names": names[15:]}))
    dm = MILDataModule(dataset="featurebags", root=str(tmp_path), labels="camelyon16.csv", split_file="split_2.json")
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 3, 5)
    assert dm.train_set[0][0].shape == (4, D)


def test_bracs_acmil_h5_with_official_csv_and_7_to_3_merge(tmp_path):
    slides = {f"BRACS_{1000 + i}": i % 7 for i in range(21)}
    write_acmil_h5(tmp_path / "bracs_feats.h5", slides)
    split = ["train"] * 14 + ["val"] * 3 + ["test"] * 4
    lines = [",case_id,slide_id,split_info,full_path,label"]
    for i, (name, label) in enumerate(slides.items()):  # ACMIL's dataset_csv/bracs.csv columns
        lines.append(f"{i},patient_{i},{name},{split[i]},/mnt/x/{name}.svs,{label}")
    (tmp_path / "bracs.csv").write_text("\n".join(lines) + "\n")
    dm = MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="bracs_feats.h5", labels="bracs.csv",
                       label_map=BRACS_MERGE, class_names=["benign", "atypical", "malignant"])
    dm.setup()
    assert dm.num_classes == 3 and (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (14, 3, 4)
    for ds in (dm.train_set, dm.test_set):
        for i, b in enumerate(ds.bag_ids):
            assert ds.labels[i] == BRACS_MERGE[slides[b]]


def test_bracs_config_composes_with_acmil_files(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    slides = {f"BRACS_{1000 + i}": i % 7 for i in range(14)}
    write_acmil_h5(tmp_path / "f.h5", slides)
    (tmp_path / "bracs.csv").write_text("slide_id,split_info,label\n" + "\n".join(
        f"{b},{'test' if i >= 10 else 'train'},{v}" for i, (b, v) in enumerate(slides.items())) + "\n")
    cfg = compose_cfg("train", ["model=acmil", "data=bracs", f"data.root={tmp_path}", "data.h5_file=f.h5",
                                "data.num_workers=0"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert dm.class_names == ["benign", "atypical", "malignant"] and len(dm.test_set) == 4


def test_truncated_or_wrong_h5_names_the_file(tmp_path):
    write_acmil_h5(tmp_path / "feats.h5", CAMELYON)
    data = (tmp_path / "feats.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataFormatError, match="cut.h5"):
        MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="cut.h5").setup()
    with h5py.File(tmp_path / "nolabel.h5", "w") as f:
        f.create_group("slide_1").create_dataset("feat", data=_feat(3, 0))
    with pytest.raises(DataFormatError, match="label"):
        MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="nolabel.h5").setup()
    with pytest.raises(DatasetNotFoundError, match="missing.h5"):
        MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="missing.h5").setup()


def test_split_file_naming_unknown_slides_is_an_error(tmp_path):
    write_acmil_h5(tmp_path / "feats.h5", CAMELYON)
    (tmp_path / "s.json").write_text(json.dumps({"train_names": ["nope_1"], "val_names": [], "test_names": []}))
    with pytest.raises(DataFormatError, match="nope_1"):
        MILDataModule(dataset="featurebags", root=str(tmp_path), h5_file="feats.h5", split_file="s.json").setup()
