"""`python -m zoo predict`: per task, predictions equal evaluation's for the same images; unreadable inputs
are listed in errors.csv (never replaced); outputs are not overwritten unasked; CSV inputs; exit codes."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.__main__ import main
from zoo.runner import data_info, net_input_kwargs, prepare_data


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint(tmp_path: Path, dm, name: str, **kwargs) -> Path:
    """A checkpoint as train.py writes it for ``dm`` (random weights: predictions still have to match)."""
    prepare_data(dm, name)
    kwargs = {**kwargs, **net_input_kwargs(name, dm)}
    torch.manual_seed(0)
    net = zoo.create_model(name, num_classes=dm.num_classes, **kwargs)
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": {"name": name, "kwargs": kwargs}, "num_classes": dm.num_classes,
                                     "data_info": data_info(dm)}}, path)
    return path


def _image(path: Path, size=(40, 30), seed=0, mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":  # a 16-bit grey image: read scaled by its range, as the datasets read it
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def _bad_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    corrupt, empty = folder / "corrupt.png", folder / "empty.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    empty.write_bytes(b"")
    return [corrupt, empty]


def _reference(ckpt: Path, dm) -> list[torch.Tensor]:
    """Evaluation's logits per test item: the checkpoint's input given to the datamodule, the task's test step."""
    from zoo.runner import load_task
    from zoo.spec import stored_input

    task = load_task(str(ckpt)).eval()
    prepare_data(dm, task.hparams.model["name"], stored=stored_input(task.hparams))
    out = []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            x, _, kw = task.unpack(batch)
            out += list(task.eval_forward(x, **kw).float())
    return out


# ---------------------------------------------------------------------------------------- classification
@pytest.fixture
def cls_setup(tmp_path):
    from zoo.data import ClassificationDataModule

    root = tmp_path / "ds"
    for k, c in enumerate(("ant", "bee", "cat")):
        _image(root / "train" / c / "t.png", seed=10 + k)
        _image(root / "test" / c / "a.png", size=(40 + 7 * k, 30), seed=k)
    _image(root / "test" / "bee" / "deep.png", size=(36, 36), seed=5, mode="I;16")
    bad = _bad_files(root / "test" / "cat")
    kw = dict(dataset="imagefolder", root=str(root), img_size=32, batch_size=2, bad_images="skip")
    ckpt = _checkpoint(tmp_path, ClassificationDataModule(**kw), "halonet_tiny")
    return ckpt, root, bad, lambda: ClassificationDataModule(**kw)


def test_classification_equals_evaluation_and_lists_unreadable(cls_setup, tmp_path, capsys):
    ckpt, root, bad, make_dm = cls_setup
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(ckpt), str(root / "test"), "--out", str(out), "--top-k", "2",
                 "--batch-size", "3", "--explain"]) == 0
    assert "2 input(s) could not be read" in " ".join(capsys.readouterr().err.split())
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2"]
    assert sorted(r["path"] for r in _rows(out / "errors.csv")) == sorted(map(str, bad))
    dm = make_dm()
    ref = _reference(ckpt, dm)
    paths = dm.test_set.item_names(range(len(dm.test_set)))  # the readable ones, in the dataset's order
    got = {r["path"]: r for r in rows}
    assert sorted(got) == sorted(paths) and len(rows) == 4
    names = dm.class_names
    for path, logits in zip(paths, ref):
        prob, idx = logits.softmax(-1).topk(2)
        r = got[path]
        assert [r["label_1"], r["label_2"]] == [names[i] for i in idx]
        np.testing.assert_allclose([float(r["prob_1"]), float(r["prob_2"])], prob.numpy(), atol=1e-5)
    assert len(list((out / "explain").glob("*.png"))) == 4  # zoo explain's overlays, one per readable image


def test_refuses_to_overwrite_and_reads_a_csv_of_paths(cls_setup, tmp_path, capsys):
    ckpt, root, bad, _ = cls_setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("earlier\n")
    table = tmp_path / "list.csv"
    table.write_text("path,note\nds/test/ant/a.png,x\n"  # relative to the CSV, absolute, unreadable
                     f"{root / 'test' / 'bee' / 'a.png'},y\nds/test/cat/empty.png,z\n")
    args = ["predict", "--ckpt", str(ckpt), str(table), "--out", str(out)]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "predictions.csv already exists" in err and "--overwrite" in err
    assert (out / "predictions.csv").read_text() == "earlier\n"
    assert main(args + ["--overwrite"]) == 0
    rows = _rows(out / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["a.png", "a.png"] and len(rows[0]) == 1 + 2 * 3
    assert [Path(r["path"]).name for r in _rows(out / "errors.csv")] == ["empty.png"]


def test_exit_code_2_when_nothing_is_readable(cls_setup, tmp_path, capsys):
    ckpt, root, bad, _ = cls_setup
    assert main(["predict", "--ckpt", str(ckpt), *map(str, bad), "--out", str(tmp_path / "o")]) == 2
    assert "none of the 2 inputs could be read" in " ".join(capsys.readouterr().err.split())
    assert len(_rows(tmp_path / "o" / "errors.csv")) == 2
    assert main(["predict", "--ckpt", str(ckpt), str(tmp_path / "nope.png"), "--out", str(tmp_path / "p")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["predict", "--ckpt", str(ckpt), str(root), "--out", str(tmp_path / "q"), "--maps"]) == 2
    assert "--maps is for MIL bags" in capsys.readouterr().err and not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------- segmentation
def test_segmentation_masks_at_image_size_equal_evaluation(tmp_path):
    from zoo.data import SegmentationDataModule

    root = tmp_path / "seg"
    sizes = [(40, 30), (32, 32), (50, 20)]
    for split in ("train", "test"):
        for k, size in enumerate(sizes):
            _image(root / split / "images" / f"s{k}.png", size=size, seed=k)
            Image.fromarray(np.zeros(size[::-1], np.uint8)).save(_mkdir(root / split / "masks") / f"s{k}.png")
    bad = _bad_files(root / "test" / "images")
    for b in bad:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "test" / "masks" / f"{b.stem}.png")
    kw = dict(dataset="segfolder", root=str(root), num_classes=3, img_size=32, batch_size=2, bad_images="skip")
    ckpt = _checkpoint(tmp_path, SegmentationDataModule(**kw), "fpn_tiny")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(ckpt), str(root / "test" / "images"), "--out", str(out)]) == 0
    assert sorted(r["path"] for r in _rows(out / "errors.csv")) == sorted(map(str, bad))
    dm = SegmentationDataModule(**kw)
    ref = _reference(ckpt, dm)
    areas = {Path(r["path"]).stem: r for r in _rows(out / "class_areas.csv")}
    assert sorted(areas) == ["s0", "s1", "s2"]
    for k, (size, logits) in enumerate(zip(sizes, ref)):
        want = torch.nn.functional.interpolate(logits[None], size=size[::-1], mode="bilinear")[0].argmax(0).numpy()
        with Image.open(out / "masks" / f"s{k}.png") as im:
            assert im.mode == "P" and im.size == size
            mask = np.array(im)
        np.testing.assert_array_equal(mask, want)
        np.testing.assert_allclose([float(areas[f"s{k}"][c]) for c in dm.class_names],
                                   np.bincount(want.ravel(), minlength=3) / want.size, atol=1e-6)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------------------------------- MIL
def test_mil_bag_scores_equal_evaluation_and_attention_maps(tmp_path):
    import h5py

    from zoo.data import MILDataModule

    root = tmp_path / "bags"
    rng = np.random.default_rng(0)
    lines = ["bag_id,label,split"]
    for k in range(5):
        feats = torch.from_numpy(rng.normal(size=(3 + 2 * k, 16)).astype(np.float32))
        torch.save(feats, _mkdir(root / "pt_files") / f"b{k}.pt")
        lines.append(f"b{k},{k % 2},{['train', 'val', 'test', 'test', 'test'][k]}")
    with h5py.File(_mkdir(root / "h5_files") / "b4.h5", "w") as f:  # coords: a heatmap on the tile grid
        f.create_dataset("features", data=torch.load(root / "pt_files" / "b4.pt").numpy())
        f.create_dataset("coords", data=np.array([[x * 256, y * 256] for y in range(3) for x in range(4)][:11]))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    kw = dict(dataset="featurebags", root=str(root), batch_size=1)
    ckpt = _checkpoint(tmp_path, MILDataModule(**kw), "abmil")
    inputs = tmp_path / "in"
    for k in (2, 3, 4):
        (_mkdir(inputs) / f"b{k}.pt").write_bytes((root / "pt_files" / f"b{k}.pt").read_bytes())
    (inputs / "b4.h5").write_bytes((root / "h5_files" / "b4.h5").read_bytes())
    (inputs / "corrupt.pt").write_bytes(b"PK\x03\x04 not a tensor")
    (inputs / "empty.h5").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(ckpt), str(inputs), "--out", str(out), "--maps", "--batch-size", "4"]) == 0
    assert sorted(Path(r["path"]).name for r in _rows(out / "errors.csv")) == ["corrupt.pt", "empty.h5"]
    rows = {Path(r["path"]).name: r for r in _rows(out / "bag_scores.csv")}
    assert sorted(rows) == ["b2.pt", "b3.pt", "b4.h5", "b4.pt"]
    ref = _reference(ckpt, MILDataModule(**kw))  # test split: b2, b3, b4, one bag per batch (no padding)
    for k, logits in zip((2, 3, 4), ref):
        prob = logits.softmax(-1).numpy()
        r = rows[f"b{k}.pt"]
        assert r["label"] == str(int(prob.argmax()))
        np.testing.assert_allclose([float(r["prob_0"]), float(r["prob_1"])], prob, atol=1e-5)
    attn = _rows(out / "maps" / "b4.csv")
    assert len(attn) == 11 and list(attn[0]) == ["instance", "x", "y", "attention"]
    assert abs(sum(float(a["attention"]) for a in attn) - 1) < 1e-5
    assert len(_rows(out / "maps" / "b3.csv")) == 9 and (out / "maps" / "b3.png").is_file()
    with Image.open(out / "maps" / "b4.png") as im:
        assert im.size[0] > 100


def test_mil_tile_folders_as_image_bags(tmp_path):
    from zoo.data import MILDataModule

    ckpt = _checkpoint(tmp_path, MILDataModule(dataset="digit_bags", num_train=4, num_val=2, num_test=2), "abmil")
    tiles = tmp_path / "tiles"
    for bag in ("slide_a", "slide_b"):
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(_mkdir(tiles / bag) / f"{bag}_x{i * 64}_y0.png")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(ckpt), str(tiles), "--out", str(out), "--maps"]) == 0
    rows = _rows(out / "bag_scores.csv")
    assert [Path(r["path"]).name for r in rows] == ["slide_a", "slide_b"]
    assert {a["instance"]: a["x"] for a in _rows(out / "maps" / "slide_a.csv")} == {
        f"slide_a_x{x}_y0.png": str(x) for x in (0, 64, 128)}  # coordinates from the tile names
    assert (out / "maps" / "slide_b.png").is_file() and not _rows(out / "errors.csv")


def test_mil_tile_folders_through_the_recorded_backbone_equal_their_extracted_bags(tmp_path):
    from zoo.data import MILDataModule
    from zoo.features import extract_features

    weights = tmp_path / "backbone.pt"
    torch.manual_seed(1)
    torch.save(zoo.create_model("halonet_tiny").state_dict(), weights)
    tiles = tmp_path / "tiles"
    for k, bag in enumerate(("s0", "s1", "s2")):
        for i in range(2 + k):
            _image(tiles / bag / f"{i * 32}_0.png", size=(24, 24), seed=10 * k + i)
    feats = tmp_path / "feats"
    extract_features(tiles, feats, "halonet_tiny", pretrained_file=str(weights), progress=False)
    (feats / "labels.csv").write_text("bag_id,label,split\ns0,0,train\ns1,1,val\ns2,0,test\n")
    ckpt = _checkpoint(tmp_path, MILDataModule(dataset="featurebags", root=str(feats)), "abmil")
    for src, out in ((tiles, "from_tiles"), (feats / "pt_files", "from_bags")):
        assert main(["predict", "--ckpt", str(ckpt), str(src), "--out", str(tmp_path / out)]) == 0
    a, b = (_rows(tmp_path / o / "bag_scores.csv") for o in ("from_tiles", "from_bags"))
    assert [Path(r["path"]).stem for r in a] == [Path(r["path"]).stem for r in b] == ["s0", "s1", "s2"]
    np.testing.assert_allclose([[float(r["prob_0"]), float(r["prob_1"])] for r in a],
                               [[float(r["prob_0"]), float(r["prob_1"])] for r in b], atol=1e-5)


@pytest.mark.parametrize("size", [32, 48])
def test_cifar_files_get_the_cifar_eval_transform(size, tmp_path):
    from zoo.data import ClassificationDataModule
    from zoo.data.folders import open_image

    dm = ClassificationDataModule(dataset="cifar10", img_size=size)
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8))
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    got = dm.eval_transform()(open_image(tmp_path / "x.png", 3))
    torch.testing.assert_close(got, dm._cifar_transforms(False)(img))  # resized, never centre-cropped


def test_a_checkpoint_train_py_wrote_predicts_as_it_evaluates(cls_setup, compose_cfg, tmp_path):
    from train import train

    _, root, _, make_dm = cls_setup
    run = tmp_path / "run"
    train(compose_cfg("train", ["model=halonet_tiny", "data=imagefolder", f"data.root={root}", "data.bad_images=skip", "data.img_size=32",
                                "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=1",
                                "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "test_last=false"],
                      out_dir=run))
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(ckpt), str(root / "test"), "--out", str(out), "--top-k", "1"]) == 0
    dm = make_dm()
    logits = _reference(ckpt, dm)
    ref = dict(zip(dm.test_set.item_names(range(4)), (lg.softmax(-1) for lg in logits)))
    for r in _rows(out / "predictions.csv"):
        assert r["label_1"] == dm.class_names[int(ref[r["path"]].argmax())]
        assert float(r["prob_1"]) == pytest.approx(float(ref[r["path"]].max()), abs=1e-5)


def test_model_from_a_saved_folder_predicts_as_its_checkpoint(cls_setup, tmp_path):
    """``zoo save`` then ``predict --model local-dir:DIR``: the same rows as ``--ckpt`` (classes, preprocessing)."""
    ckpt, root, _, _ = cls_setup
    folder = tmp_path / "saved"
    assert main(["save", str(ckpt), "--out", str(folder)]) == 0
    by_ckpt, by_folder = tmp_path / "a", tmp_path / "b"
    assert main(["predict", "--ckpt", str(ckpt), str(root / "test"), "--out", str(by_ckpt), "--top-k", "3"]) == 0
    assert main(["predict", "--model", f"local-dir:{folder}", str(root / "test"), "--out", str(by_folder),
                 "--top-k", "3"]) == 0
    a, b = _rows(by_ckpt / "predictions.csv"), _rows(by_folder / "predictions.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        assert [ra[f"label_{k}"] for k in (1, 2, 3)] == [rb[f"label_{k}"] for k in (1, 2, 3)]
        np.testing.assert_allclose([float(ra[f"prob_{k}"]) for k in (1, 2, 3)],
                                   [float(rb[f"prob_{k}"]) for k in (1, 2, 3)], atol=1e-6)
