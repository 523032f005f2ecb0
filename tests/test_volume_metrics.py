"""Volume-level segmentation metrics: known values on synthetic volumes, the empty-mask rules, the slice
index (gaps, repeats, spacing) and the test metrics through the segmentation task on a segfolder of slices."""
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from zoo.data import SegmentationDataModule
from zoo.errors import DataFormatError
from zoo.tasks import SegmentationTask
from zoo.volume_metrics import VolumeIndex, index_volumes, volume_metrics, volume_scores


def reference_surface(p: np.ndarray, t: np.ndarray, spacing) -> tuple[float, float]:
    """HD95 and MSD written out with scipy: 6-connected borders, Euclidean distance transforms in mm."""
    st = ndimage.generate_binary_structure(3, 1)
    bp, bt = p ^ ndimage.binary_erosion(p, st), t ^ ndimage.binary_erosion(t, st)
    d_pt = ndimage.distance_transform_edt(~bt, sampling=spacing)[bp]
    d_tp = ndimage.distance_transform_edt(~bp, sampling=spacing)[bt]
    return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), float(np.concatenate([d_pt, d_tp]).mean())


def box(shape, z, y, x, value=1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return a


def test_shifted_boxes_with_anisotropic_spacing():
    spacing = (3.0, 0.8, 0.5)  # dz, dy, dx in mm
    gt = box((12, 20, 20), (2, 8), (5, 15), (5, 15))        # 6 x 10 x 10 voxels
    pred = box((12, 20, 20), (4, 10), (5, 15), (5, 17))     # shifted 2 slices, 2 columns longer: 6 x 10 x 12
    s = volume_scores(pred, gt, [1], spacing)
    a, b, inter = 6 * 10 * 12, 6 * 10 * 10, 4 * 10 * 10    # by hand: the overlap is 4 x 10 x 10
    assert s["dice"][0] == pytest.approx(2 * inter / (a + b))
    assert s["vs"][0] == pytest.approx(1 - abs(a - b) / (a + b))
    hd95, msd = reference_surface(pred.astype(bool), gt.astype(bool), spacing)
    assert s["hd95"][0] == pytest.approx(hd95, rel=1e-5) and s["msd"][0] == pytest.approx(msd, rel=1e-5)
    assert 0 < s["msd"][0] < s["hd95"][0]


def test_parallel_slabs_distance_is_the_slice_shift():
    """Two one-voxel-thick slabs 3 slices apart: every border voxel is exactly 3 dz from the other slab."""
    spacing = (2.5, 0.7, 0.9)
    gt, pred = box((8, 6, 6), (2, 3), (0, 6), (0, 6)), box((8, 6, 6), (5, 6), (0, 6), (0, 6))
    s = volume_scores(pred, gt, [1], spacing)
    assert s["dice"][0] == 0 and s["vs"][0] == 1
    assert s["hd95"][0] == pytest.approx(3 * 2.5, rel=1e-6) and s["msd"][0] == pytest.approx(3 * 2.5, rel=1e-6)


def test_empty_masks_and_ignored_voxels():
    gt = box((4, 8, 8), (0, 4), (0, 4), (0, 4), 1)
    gt[:, 6:, 6:] = 255  # ignored
    pred = gt.copy()
    pred[pred == 255] = 2  # class 2 predicted only where the truth is ignored: not a false positive
    pred[0, 7, 0] = 3      # class 3: in the prediction only
    s = volume_scores(pred, gt, [1, 2, 3, 4])
    assert s["dice"][0] == 1 and s["hd95"][0] == 0 and s["msd"][0] == 0
    assert all(math.isnan(s[k][1]) for k in s)  # class 2: absent from both (ignored voxels belong to neither)
    assert s["dice"][2] == 0 and s["vs"][2] == 0 and math.isnan(s["hd95"][2]) and math.isnan(s["msd"][2])
    assert all(math.isnan(s[k][3]) for k in s)  # class 4: absent from both


def _index(vols, slices, spacing, tmp_path, size=8):
    paths = []
    for v, k in zip(vols, slices):
        p = tmp_path / f"{v}_{k}.png"
        Image.fromarray(np.zeros((size, size), np.uint8)).save(p)
        paths.append(str(p))
    return VolumeIndex(list(vols), list(slices), paths, dict(spacing))


def test_means_over_volumes_per_class_and_over_classes(tmp_path):
    """Volume A: liver Dice 1, kidney Dice 0.5; volume B: liver Dice 0.5, no kidney anywhere (left out)."""
    names = ["bg", "liver", "kidney"]
    a_gt = box((2, 8, 8), (0, 2), (0, 4), (0, 4), 1) + box((2, 8, 8), (0, 2), (5, 7), (0, 4), 2)
    a_pred = a_gt.copy()
    a_pred[:, 5:7, 2:4] = 0  # half the kidney missed
    b_gt = box((2, 8, 8), (0, 2), (0, 4), (0, 4), 1)
    b_pred = box((2, 8, 8), (0, 2), (0, 4), (2, 6), 1)  # half overlaps
    index = _index(["a", "a", "b", "b"], [1, 2, 1, 2], {"a": (1, 1, 1), "b": (2, 1, 1)}, tmp_path)
    items = {0: (a_pred[0], a_gt[0]), 1: (a_pred[1], a_gt[1]), 2: (b_pred[0], b_gt[0]), 3: (b_pred[1], b_gt[1])}
    m = volume_metrics(items, index, names)
    dice_kidney_a = 2 * 8 / (8 + 16)
    assert m["volume_dice/liver"] == pytest.approx((1 + 0.5) / 2)
    assert m["volume_dice/kidney"] == pytest.approx(dice_kidney_a)  # volume b has no kidney: left out
    assert m["volume_dice"] == pytest.approx(((1 + 0.5) / 2 + dice_kidney_a) / 2)
    assert m["volumes"] == 2 and m["volume_surface_undefined"] == 0 and "volume_dice/bg" not in m
    assert volume_metrics({0: items[0]}, index, names) == {}  # a partial pass scores no volume


def test_slice_index_gaps_repeats_order_and_spacing(tmp_path):
    root = tmp_path

    def paths(*names):
        return [str(root / "test" / "images" / n) for n in names]

    key = r"(?P<volume>p\d+)_s(?P<slice>\d+)"
    idx = index_volumes(paths("p1_s2.png", "p1_s1.png", "p2_s1.png"), root, key, spacing=[2.0, 1.0, 0.5])
    assert idx.volumes == ["p1", "p1", "p2"] and idx.slices == [2, 1, 1] and idx.members()["p1"] == [1, 0]
    assert idx.spacing["p2"] == (2.0, 1.0, 0.5) and idx.units == "mm"
    with pytest.raises(DataFormatError, match="'p1' lacks slice"):
        index_volumes(paths("p1_s1.png", "p1_s3.png"), root, key)
    with pytest.raises(DataFormatError, match="slice 1 twice"):
        index_volumes(paths("p1_s1.png", "p1_s01.png"), root, key)
    with pytest.raises(DataFormatError, match="does not match"):
        index_volumes(paths("p1_s1.png", "other.png"), root, key)
    with pytest.raises(DataFormatError, match=r"data.spacing=\[dz, dy, dx\]"):
        index_volumes(paths("p1_s1.png"), root, key, spacing=[0.5, 0.5])
    # no slice group: the natural order of the names (s2 before s10)
    idx = index_volumes(paths("p1_s10.png", "p1_s2.png"), root, r"(p\d+)_")
    assert idx.slices == [1, 0] and idx.units == "voxels" and idx.spacing["p1"] == (1.0, 1.0, 1.0)
    side = root / "spacing.json"
    side.write_text(json.dumps({"volumes": {"p1": {"spacing": [5.0, 0.7, 0.7], "shape": [3, 8, 8]}}}))
    with pytest.raises(DataFormatError, match="has 2 slices but"):
        index_volumes(paths("p1_s1.png", "p1_s2.png"), root, key, sidecar=side)
    with pytest.raises(DataFormatError, match="'p2' is not in"):
        index_volumes(paths("p1_s1.png", "p1_s2.png", "p1_s3.png", "p2_s1.png"), root, key, sidecar=side)
    side.write_text(json.dumps({"volumes": {"p1": {"spacing": [5.0, 0.7]}}}))
    with pytest.raises(DataFormatError, match="not a volume sidecar"):
        index_volumes(paths("p1_s1.png"), root, key, sidecar=side)


def test_eval_spacing_follows_the_evaluated_size(tmp_path):
    index = _index(["v"], [0], {"v": (4.0, 0.8, 0.6)}, tmp_path, size=8)
    assert index.eval_spacing("v", 16, 32) == pytest.approx((4.0, 0.4, 0.15))  # files 8x8 evaluated at 16x32
    index.stated["v"] = (10, 10)
    with pytest.raises(DataFormatError, match="spacing of volume 'v' is for 10x10"):
        index.eval_spacing("v", 8, 8)


# ============================================================ through the task, on a folder of slices
LEVEL = 60  # image grey = LEVEL x the class the net will predict there


class GreyToClass(nn.Module):
    """Predicts, per pixel, the class whose grey level (LEVEL x class) is closest to the input's."""

    def forward(self, x):
        grey = x[:, :1] * 255
        return -torch.stack([(grey[:, 0] - LEVEL * k) ** 2 for k in range(3)], 1)


def write_volumes(root, split, vols: dict, spacing: dict | None = None):
    """vols: id -> (pred [D, H, W], truth [D, H, W]); slices written as ``{id}_s{k}.png``, k from 1."""
    for v, (pred, gt) in vols.items():
        for k in range(len(gt)):
            for sub, arr in (("images", pred[k] * LEVEL), ("masks", gt[k])):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(root / split / sub / f"{v}_s{k + 1}.png")


def _volume(seed, shift):
    rng = np.random.default_rng(seed)
    gt = np.zeros((3, 8, 8), np.uint8)
    gt[0:3, 1:5, 1:5] = 1
    gt[1:3, 5:8, 4:8] = 2
    pred = np.roll(gt, shift, axis=2)
    pred[rng.random(pred.shape) < 0.05] = 0
    return pred, gt


def test_volume_metrics_through_the_task(tmp_path):
    vols = {"p1": _volume(0, 1), "p2": _volume(1, 0)}
    write_volumes(tmp_path, "train", {"t1": _volume(2, 0)})
    write_volumes(tmp_path, "val", {"v1": _volume(3, 0)})
    write_volumes(tmp_path, "test", vols)
    spacing = {"p1": [3.0, 0.8, 0.8], "p2": [2.0, 1.0, 1.0]}
    (tmp_path / "spacing.json").write_text(json.dumps({"volumes": {v: {"spacing": s, "shape": [3, 8, 8]}
                                                                   for v, s in spacing.items()}}))
    names = ["bg", "liver", "kidney"]
    dm = SegmentationDataModule(dataset="segfolder", root=str(tmp_path), num_classes=3, class_names=names,
                                in_chans=1, img_size=8, mean=[0.0], std=[1.0], batch_size=4, augment=False,
                                volume_key=r"(?P<volume>p\d+)_s(?P<slice>\d+)")
    task = SegmentationTask(GreyToClass(), model={"name": "x", "kwargs": {}}, num_classes=3,
                            data_info={"class_names": names})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    got = trainer.test(task, datamodule=dm, verbose=False)[0]
    ref = {}
    for v, (pred, gt) in vols.items():
        for c, n in ((1, "liver"), (2, "kidney")):
            p, t = pred == c, gt == c
            hd95, msd = reference_surface(p, t, spacing[v])
            a, b = p.sum(), t.sum()
            for key, value in (("dice", 2 * (p & t).sum() / (a + b)), ("vs", 1 - abs(a - b) / (a + b)),
                               ("hd95", hd95), ("msd", msd)):
                ref.setdefault(f"test/volume_{key}/{n}", []).append(value)
    for key, values in ref.items():
        assert got[key] == pytest.approx(np.mean(values), rel=1e-4), key
    for score in ("dice", "vs", "hd95", "msd"):
        assert got[f"test/volume_{score}"] == pytest.approx(
            (np.mean(ref[f"test/volume_{score}/liver"]) + np.mean(ref[f"test/volume_{score}/kidney"])) / 2, rel=1e-4)
    assert got["test/volumes"] == 2 and got["test/volume_dice/liver"] < 1  # the shifted volume is imperfect
    assert "test/miou" in got  # the slice metrics are still there


def test_segfolder_volumes_split_whole_and_gaps_fail_at_setup(tmp_path):
    write_volumes(tmp_path, "train", {f"p{i}": _volume(i, 0) for i in range(1, 6)})
    key = r"(?P<volume>p\d+)_s(?P<slice>\d+)"
    kw = dict(dataset="segfolder", root=str(tmp_path), num_classes=3, in_chans=1, img_size=8, volume_key=key,
              val_fraction=0.2, test_fraction=0.2)
    dm = SegmentationDataModule(**kw)
    dm.setup()
    parts = [{p.name.split("_")[0] for p, _ in ds.pairs} for ds in (dm.train_set, dm.val_set, dm.test_set)]
    assert [len(p) for p in parts] == [3, 1, 1] and not (parts[0] & parts[1] or parts[0] & parts[2])
    assert len(dm.test_set) == 3 and sorted(dm.test_set.volumes.slices) == [1, 2, 3]  # the whole volume
    write_volumes(tmp_path, "test", {"p9": _volume(9, 0)})
    (tmp_path / "test" / "images" / "p9_s2.png").unlink()
    (tmp_path / "test" / "masks" / "p9_s2.png").unlink()
    with pytest.raises(DataFormatError, match="'p9' lacks slice"):
        SegmentationDataModule(**kw).setup()
