"""``python -m zoo prepare chaos``: a tiny CHAOS MR release written with pydicom (2 patients x 3 slices of
8x8, real DICOM files, PNG ground truth at CHAOS's grey values) -> the layout data=chaos reads, its
labels, slice order and spacing, and the volume metrics on it through the segmentation task."""
import json
import sys

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zoo.__main__ import main
from zoo.errors import DataFormatError, ZooError
from zoo.prepare import prepare_chaos, split_patients
from zoo.tasks import SegmentationTask

pydicom = pytest.importorskip("pydicom")

RAW = {0: 0, 1: 60, 2: 120, 3: 180, 4: 245}  # class -> a grey value inside CHAOS's range for it
LEVEL = {0: 0, 1: 63, 2: 126, 3: 189, 4: 252}
DZ, DY, DX = 7.7, 1.5, 1.25


def labels_of(patient: int, k: int) -> np.ndarray:
    """Slice k's organs: a different picture per slice, so a misordered slice or mask shows."""
    lab = np.zeros((8, 8), np.uint8)
    lab[1:4, 1:5] = 1
    lab[5:7, 1 + k:3 + k] = 2
    lab[5:7, 5:7] = 3
    lab[0, 6 + (k + patient) % 2] = 4
    return lab


def write_dicom(path, pixels: np.ndarray, number: int, z: float) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [DY, DX], 6.0, 9.0  # dz comes from the positions
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-10.0, 20.0, z]
    ds.InstanceNumber = number
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom 3
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


@pytest.fixture
def chaos_release(tmp_path):
    """CHAOS_Train_Sets/Train_Sets/MR/<patient>/...: the in-phase DICOMs share the Ground PNGs' names, the
    opposed-phase ones do not (paired by name order); slice positions run downwards (z decreasing)."""
    mr = tmp_path / "CHAOS_Train_Sets" / "Train_Sets" / "MR"
    for patient in (1, 5):
        base = mr / str(patient)
        for k in range(3):
            lab = labels_of(patient, k)
            pixels = lab.astype(np.int64) * 100 + 7  # intensity encodes the organ: min-max scaling keeps it
            z = 40.0 - DZ * k
            write_dicom(base / "T1DUAL" / "DICOM_anon" / "InPhase" / f"IMG-0004-{2 * k + 2:05d}.dcm", pixels, 2 * k + 2, z)
            write_dicom(base / "T1DUAL" / "DICOM_anon" / "OutPhase" / f"IMG-0004-{2 * k + 1:05d}.dcm", pixels,
                        2 * k + 1, z)
            write_dicom(base / "T2SPIR" / "DICOM_anon" / f"IMG-0002-{k + 1:05d}.dcm", pixels, k + 1, z)
            raw = np.vectorize(RAW.get)(lab).astype(np.uint8)
            for seq, name in (("T1DUAL", f"IMG-0004-{2 * k + 2:05d}.png"), ("T2SPIR", f"IMG-0002-{k + 1:05d}.png")):
                (base / seq / "Ground").mkdir(parents=True, exist_ok=True)
                Image.fromarray(raw).save(base / seq / "Ground" / name)
    return tmp_path


def test_prepare_writes_the_chaos_layout_with_labels_order_and_spacing(chaos_release, tmp_path):
    out = tmp_path / "chaos"
    assert main(["prepare", "chaos", str(chaos_release), "--out", str(out), "--test-patients", "5",
                 "--val-fraction", "0"]) == 0
    doc = json.loads((out / "spacing.json").read_text())
    assert sorted(doc["volumes"]) == ["1", "5"] and doc["volumes"]["5"]["split"] == "test"
    for patient, split in ((1, "train"), (5, "test")):
        info = doc["volumes"][str(patient)]
        assert info["spacing"] == pytest.approx([DZ, DY, DX]) and info["shape"] == [3, 8, 8]
        assert info["dz_source"] == "ImagePositionPatient" and info["sequence"] == "T1DUAL_in"
        for k in range(3):
            name = f"Subj_{patient}slice_{k + 1}.png"
            gt = np.array(Image.open(out / split / "GT" / name))
            img = np.array(Image.open(out / split / "Img" / name))
            lab = labels_of(patient, k)
            assert np.array_equal(gt, np.vectorize(LEVEL.get)(lab))  # CHAOS ranges -> exact levels
            scaled = np.rint(lab * 100.0 * (255 / 400)).astype(np.uint8)  # the volume's min-max scaling (7..407)
            assert np.array_equal(img, scaled)
    assert not (out / "val").exists() and sorted(p.name for p in out.iterdir()) == ["spacing.json", "test", "train"]

    # never replaced without --overwrite; --overwrite replaces it whole (no stale slices)
    assert main(["prepare", "chaos", str(chaos_release), "--out", str(out)]) == 2
    assert (out / "test" / "GT" / "Subj_5slice_1.png").is_file()
    assert main(["prepare", "chaos", str(chaos_release), "--out", str(out), "--overwrite", "--sequences",
                 "T1DUAL_out,T2SPIR", "--test-patients", "1", "--val-fraction", "0"]) == 0
    doc = json.loads((out / "spacing.json").read_text())
    assert sorted(doc["volumes"]) == ["1_T1DUAL_out", "1_T2SPIR", "5_T1DUAL_out", "5_T2SPIR"]
    assert not (out / "test" / "GT" / "Subj_5slice_1.png").exists()
    for k in range(3):  # opposed phase: paired with the shared masks by name order
        gt = np.array(Image.open(out / "test" / "GT" / f"Subj_1_T1DUAL_outslice_{k + 1}.png"))
        assert np.array_equal(gt, np.vectorize(LEVEL.get)(labels_of(1, k)))


class LevelNet(nn.Module):
    """Per pixel, the class whose prepared grey level (class x 255 / 4) is nearest the input's."""

    def forward(self, x):
        grey = x[:, :1] * 255
        return -torch.cat([(grey - k * 255 / 4) ** 2 for k in range(5)], 1)


def test_data_chaos_reads_the_output_and_scores_volumes(chaos_release, tmp_path, compose_cfg):
    from hydra.utils import instantiate

    out = tmp_path / "chaos"
    prepare_chaos(chaos_release, out, test_patients=["5"], val_fraction=0)
    cfg = compose_cfg("train", ["model=fpn_tiny", "data=chaos", f"data.root={out}", "data.img_size=8",
                                "data.num_workers=0", "data.batch_size=2"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert len(dm.test_set) == 3 and dm.test_set.volumes.spacing["5"] == pytest.approx((DZ, DY, DX))
    names = dm.class_names
    task = SegmentationTask(LevelNet(), model={"name": "x", "kwargs": {}}, num_classes=5,
                            data_info={"class_names": names})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    got = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert got["test/volumes"] == 1
    for organ in names[1:]:  # images and masks still belong together, slice by slice
        assert got[f"test/volume_dice/{organ}"] == 1 and got[f"test/volume_hd95/{organ}"] == 0
    assert got["test/volume_vs"] == 1 and got["test/volume_msd"] == 0


def test_bad_ground_truth_and_missing_masks_are_errors(chaos_release, tmp_path):
    gt_dir = chaos_release / "CHAOS_Train_Sets" / "Train_Sets" / "MR" / "1" / "T1DUAL" / "Ground"
    bad = gt_dir / "IMG-0004-00004.png"
    arr = np.array(Image.open(bad))
    arr[0, 0] = 90  # between the liver and right-kidney ranges
    Image.fromarray(arr).save(bad)
    with pytest.raises(DataFormatError, match="IMG-0004-00004.png has grey values \\[90\\]"):
        prepare_chaos(chaos_release, tmp_path / "a")
    bad.unlink()  # the opposed phase now has 3 slices for 2 masks
    with pytest.raises(DataFormatError, match="3 DICOM slices .* but 2 ground-truth PNGs"):
        prepare_chaos(chaos_release, tmp_path / "b", sequences=["T1DUAL_out"])
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.partial-*"))  # nothing half-written


def test_missing_pydicom_says_how_to_install(monkeypatch, chaos_release, tmp_path):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` raises ImportError
    with pytest.raises(ZooError, match=r"pip install attention-zoo\[chaos\]"):
        prepare_chaos(chaos_release, tmp_path / "out")


def test_patient_split_is_seeded_and_by_patient():
    patients = [str(p) for p in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)]
    a = split_patients(patients, val_fraction=0.1, test_fraction=0.25, seed=0)
    assert a == split_patients(patients, val_fraction=0.1, test_fraction=0.25, seed=0)
    assert sorted(a) == sorted(patients) and [list(a.values()).count(s) for s in ("train", "val", "test")] == [13, 2, 5]
    b = split_patients(patients, val_fraction=0.1, test_fraction=0.25, seed=0, test=["36", "37"])
    assert [p for p, s in b.items() if s == "test"] == ["36", "37"] and list(b.values()).count("val") == 2
    with pytest.raises(ZooError, match="lacks"):
        split_patients(patients, val_fraction=0, test_fraction=0, seed=0, test=["99"])
