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


# ---------------------------------------------------------------- item 7: ranges and mandatory values
@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", r"data.batch_size=0 is out of range; data.batch_size must be >= 1"),
    ("data.num_workers=-1", r"data.num_workers=-1 is out of range; data.num_workers must be >= 0"),
    ("data.val_fraction=1.5", r"data.val_fraction=1.5 is out of range; data.val_fraction must be in \[0, 1\)"),
    ("+data.test_fraction=-0.1", r"data.test_fraction=-0.1 is out of range"),
    ("+data.test_fraction=0.6", r"data.val_fraction=.* and data.test_fraction=0.6 leave nothing to train on"),
    ("optim.lr=0", r"optim.lr=0 is out of range; optim.lr must be > 0"),
    ("optim.lr=-0.001", r"optim.lr=-0.001 is out of range"),
    ("optim.scheduler=linear", r"optim.scheduler='linear' is not valid; choose one of cosine, step, none"),
    ("optim.lr_decay_at=[1.5]", r"optim.lr_decay_at=\[1.5\] is not valid; it takes a list of fractions"),
    ("optim.lr_decay_rate=2", r"optim.lr_decay_rate=2 is out of range; optim.lr_decay_rate must be in \(0, 1\]"),
    ("trainer.max_epochs=0", r"trainer.max_epochs=0 is out of range; trainer.max_epochs must be >= 1, or -1"),
])
def test_values_out_of_range_are_named_before_data_loads(override, message, compose_cfg, tmp_path):
    from zoo.validate import ConfigError

    from train import check_config, train

    # the data folder does not exist: the config error must come first
    extra = ["data.val_fraction=0.5"] if "test_fraction=0.6" in override else []
    cfg = compose_cfg("train", ["data=imagefolder", f"data.root={tmp_path / 'missing'}", *extra, override])
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    with pytest.raises(ConfigError, match=message.split(" is out")[0].split(" and")[0]):
        check_config(compose_cfg("evaluate", ["data=imagefolder", "ckpt_path=x.ckpt",
                                              f"data.root={tmp_path / 'missing'}", *extra, override]),
                     training="optim" in override or "trainer" in override)


def test_unlimited_epochs_and_zero_fractions_pass(compose_cfg):
    from train import check_config

    check_config(compose_cfg("train", ["data=imagefolder", "data.root=/x", "trainer.max_epochs=-1",
                                       "data.val_fraction=0.0", "+data.test_fraction=0.0"]))


@pytest.mark.parametrize("config,overrides,keys", [
    ("train", ["data=imagefolder"], ["data.root"]),
    ("train", ["data=segfolder", "model=fpn_tiny"], ["data.num_classes", "data.root"]),
    ("train", ["data=featurebags", "model=abmil"], ["data.labels", "data.root"]),
    ("evaluate", [], ["ckpt_path"]),
    ("evaluate", ["data=segfolder", "data.root=/x"], ["ckpt_path", "data.num_classes"]),
])
def test_missing_mandatory_value_is_named_with_what_to_set(config, overrides, keys, compose_cfg):
    from zoo.validate import ConfigError

    from train import check_config

    with pytest.raises(ConfigError, match="no value") as e:
        check_config(compose_cfg(config, overrides), training=config == "train")
    msg = str(e.value)
    assert msg.startswith(", ".join(keys)) and "MissingMandatoryValue" not in msg and "wrong type" not in msg
    for key in keys:
        assert f"{key}=" in msg  # what to set, as a command-line override
    if config == "evaluate":
        from evaluate import evaluate

        with pytest.raises(ConfigError, match="ckpt_path"):
            evaluate(compose_cfg(config, overrides))


def test_cli_out_of_range_exits_2_with_one_line_naming_the_key(tmp_path):
    # configs/data/digits.yaml (the default) has no val_fraction key: the data config that has one
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data=imagefolder", f"data.root={tmp_path / 'missing'}",
         "data.val_fraction=1.5", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.val_fraction=1.5" in lines[0] and "[0, 1)" in lines[0], out
    assert "Traceback" not in out and not (tmp_path / "run" / "checkpoints").exists()
