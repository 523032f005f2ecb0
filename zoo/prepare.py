"""``python -m zoo prepare chaos SRC --out DIR``: the CHAOS MR release -> the slice layout ``data=chaos`` reads.

Input, as CHAOS publishes it (``CHAOS_Train_Sets.zip``; SRC may be any folder down to ``MR/``)::

    CHAOS_Train_Sets/Train_Sets/MR/<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm
                                            /T1DUAL/Ground/*.png        (one mask per slice, both phases)
                                            /T2SPIR/DICOM_anon/*.dcm
                                            /T2SPIR/Ground/*.png

Ground-truth grey levels (CHAOS): liver 63 (55-70), right kidney 126 (110-135), left kidney 189 (175-200),
spleen 252 (240-255), background 0; each range is written as its exact level, any other value is an error.

Output, the official multi-scale-attention layout (``configs/data/chaos.yaml``)::

    DIR/{train,val,test}/Img/Subj_<id>slice_<k>.png   8-bit grey slice, k = 1..N along the volume
    DIR/{train,val,test}/GT/Subj_<id>slice_<k>.png    grey levels 0/63/126/189/252
    DIR/spacing.json   per volume: spacing [dz, dy, dx] in mm, shape [N, rows, cols], split, patient, sequence

Choices (documented, not the paper's: it does not describe its conversion):

- Sequences: ``T1DUAL_in`` by default (the official repository's sample slice is a fat-bright T1 image
  without opposed-phase rims; the paper does not name the sequence); ``T1DUAL_out`` and ``T2SPIR`` on request.
  With several, each (patient, sequence) is its own volume, ``<id>`` = ``<patient>_<sequence>``.
- Slice order: DICOM InstanceNumber, which must agree with the natural order of the file names: CHAOS
  defines its slice order, and so which ground-truth PNG belongs to which DICOM, by the file names (a
  PNG with the DICOM's own stem is paired by name; otherwise the k-th PNG with the k-th DICOM).
- Spacing: dy, dx = PixelSpacing; dz = the distance between the first and last ImagePositionPatient along
  the slice normal over N - 1 (as CHAOS's evaluation code derives it), else SpacingBetweenSlices, else
  SliceThickness (``dz_source`` in spacing.json says which).
- Intensities: RescaleSlope/Intercept applied, then each volume scaled by its own min and max to 0..255.
  Slices keep their stored size (the datamodule resizes; the volume metrics rescale the spacing to match).
- Split: by patient, never by slice; seeded (``--val-fraction``, ``--test-fraction``: 13/2/5 of the 20
  training patients) or given (``--val-patients``, ``--test-patients``). An empty val split writes no
  ``val/`` (the datamodule then splits train by volume).
- ``--out`` is never replaced unless ``--overwrite``, and then only a folder this command wrote; the
  output is written beside it and moved into place when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import DataFormatError, DatasetNotFoundError, ZooError
from .volume_metrics import SIDECAR, natural_key

log = logging.getLogger("zoo.prepare")

FORMAT = "attention-zoo volume slices v1"
CHAOS_LEVELS = ((55, 70, 63), (110, 135, 126), (175, 200, 189), (240, 255, 252))  # lo, hi -> level
SEQUENCES = {  # name -> (DICOM folder, ground-truth folder) under a patient
    "T1DUAL_in": ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground"),
    "T1DUAL_out": ("T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground"),
    "T2SPIR": ("T2SPIR/DICOM_anon", "T2SPIR/Ground"),
}
CHAOS_LAYOUT = """\
  CHAOS_Train_Sets/Train_Sets/MR/<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm, T1DUAL/Ground/*.png
                                          /T2SPIR/DICOM_anon/*.dcm, T2SPIR/Ground/*.png
  (https://chaos.grand-challenge.org/Download/)"""


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ZooError("python -m zoo prepare chaos reads DICOM with pydicom, which is not installed: "
                       "pip install attention-zoo[chaos]  (or: pip install pydicom)") from None
    return pydicom


def _natural(p: Path) -> list:
    return natural_key(p.name)


def find_mr_root(src: Path) -> Path:
    """The ``MR`` folder (the one holding the patient folders) at or under ``src``."""
    for cand in (src / "CHAOS_Train_Sets" / "Train_Sets" / "MR", src / "Train_Sets" / "MR", src / "MR", src):
        if cand.is_dir() and any((p / "T1DUAL").is_dir() or (p / "T2SPIR").is_dir() for p in cand.iterdir()
                                 if p.is_dir()):
            return cand
    raise DatasetNotFoundError(f"no CHAOS MR patients (folders with T1DUAL/ or T2SPIR/) at or under {src}\n"
                               f"Expected layout:\n{CHAOS_LAYOUT}")


def map_ground(arr: np.ndarray, path: Path) -> np.ndarray:
    """CHAOS ground-truth grey values -> exactly 0/63/126/189/252; other values are an error."""
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise DataFormatError(f"ground truth {path} is a colour image; CHAOS masks are grey levels")
        arr = arr[..., 0]
    out = np.zeros(arr.shape, np.uint8)
    known = arr == 0
    for lo, hi, level in CHAOS_LEVELS:
        hit = (arr >= lo) & (arr <= hi)
        out[hit], known = level, known | hit
    if not known.all():
        raise DataFormatError(f"ground truth {path} has grey values {np.unique(arr[~known])[:8].tolist()} outside "
                              "CHAOS's organ ranges (0; 55-70 liver; 110-135 right kidney; 175-200 left kidney; "
                              "240-255 spleen)")
    return out


def _floats(ds, keyword: str) -> list[float] | None:
    """A DICOM number or multi-value as floats (None when absent or empty)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]


def read_series(dcm_dir: Path, gt_dir: Path, what: str) -> tuple[np.ndarray, np.ndarray, list[float], dict]:
    """One CHAOS series: (images uint8 [N, H, W], masks at the CHAOS levels [N, H, W], [dz, dy, dx] mm, info)."""
    pydicom = _pydicom()
    files = sorted(dcm_dir.glob("*.dcm"), key=_natural)
    pngs = sorted(gt_dir.glob("*.png"), key=_natural)
    if not files:
        raise DatasetNotFoundError(f"{what}: no .dcm files in {dcm_dir}\nExpected layout:\n{CHAOS_LAYOUT}")
    if not pngs:
        raise DatasetNotFoundError(f"{what}: no ground-truth .png in {gt_dir}\nExpected layout:\n{CHAOS_LAYOUT}")
    sets = []
    for f in files:
        try:
            sets.append(pydicom.dcmread(f))
        except Exception as e:  # noqa: BLE001 - pydicom's InvalidDicomError and friends
            raise DataFormatError(f"{what}: cannot read {f} as DICOM ({type(e).__name__}: {e})") from None
    numbers = [ds.get("InstanceNumber") for ds in sets]
    if all(n is not None and n != "" for n in numbers):
        order = sorted(range(len(files)), key=lambda i: int(numbers[i]))
        if order != list(range(len(files))):
            raise DataFormatError(f"{what}: the InstanceNumber order of {dcm_dir} is not the order of its file names, "
                                  "which CHAOS uses to pair slices with ground truth; cannot tell which mask is whose")
    by_stem = {p.stem: p for p in pngs}
    if all(f.stem in by_stem for f in files):
        pngs = [by_stem[f.stem] for f in files]  # the DICOM's own name
    elif len(pngs) != len(files):
        raise DataFormatError(f"{what}: {len(files)} DICOM slices in {dcm_dir} but {len(pngs)} ground-truth PNGs in "
                              f"{gt_dir}; every slice needs its mask")
    images, masks = [], []
    for f, ds, png in zip(files, sets, pngs):
        try:
            arr = ds.pixel_array.astype(np.float64)
        except Exception as e:  # noqa: BLE001 - compressed pixel data without a decoder, missing pixel data
            raise DataFormatError(f"{what}: cannot decode the pixels of {f} ({type(e).__name__}: {e})") from None
        if arr.ndim != 2:
            raise DataFormatError(f"{what}: {f} holds a {arr.shape} array, not one 2-D slice")
        images.append(arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0))
        with Image.open(png) as im:
            mask = map_ground(np.array(im), png)
        if mask.shape != arr.shape:
            raise DataFormatError(f"{what}: ground truth {png} is {mask.shape} but its slice {f} is {arr.shape}")
        masks.append(mask)
    if len({a.shape for a in images}) != 1:
        raise DataFormatError(f"{what}: the slices of {dcm_dir} differ in size {sorted({a.shape for a in images})}")
    spacing, info = _spacing(sets, files, what)
    vol = np.stack(images)
    lo, hi = float(vol.min()), float(vol.max())
    vol8 = np.zeros(vol.shape, np.uint8) if hi <= lo else np.rint((vol - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return vol8, np.stack(masks), spacing, info


def _spacing(sets, files, what: str) -> tuple[list[float], dict]:
    ps = [_floats(ds, "PixelSpacing") for ds in sets]
    if any(p is None or len(p) != 2 for p in ps):
        raise DataFormatError(f"{what}: {files[next(i for i, p in enumerate(ps) if p is None or len(p) != 2)]} has no "
                              "PixelSpacing (row, column mm); the distances in mm need it")
    if len({tuple(p) for p in ps}) != 1:
        raise DataFormatError(f"{what}: the slices' PixelSpacing differ ({sorted({tuple(p) for p in ps})})")
    thickness, between = _floats(sets[0], "SliceThickness"), _floats(sets[0], "SpacingBetweenSlices")
    info = {"slice_thickness": thickness[0] if thickness else None,
            "spacing_between_slices": between[0] if between else None}
    pos = [_floats(ds, "ImagePositionPatient") for ds in sets]
    ori = _floats(sets[0], "ImageOrientationPatient")
    dz, source = None, None
    if len(sets) > 1 and ori is not None and len(ori) == 6 and all(p is not None and len(p) == 3 for p in pos):
        normal = np.cross(ori[:3], ori[3:])
        along = np.array(pos) @ normal
        steps = np.diff(along)
        if (steps > 0).all() or (steps < 0).all():
            dz, source = abs(along[-1] - along[0]) / (len(sets) - 1), "ImagePositionPatient"
        else:
            log.warning("%s: slice positions are not monotonic in slice order; dz from the slice-spacing tags", what)
    if dz is None and between:
        dz, source = between[0], "SpacingBetweenSlices"
    if dz is None and thickness:
        dz, source = thickness[0], "SliceThickness"
    if dz is None or not dz > 0:
        raise DataFormatError(f"{what}: no slice spacing (ImagePositionPatient, SpacingBetweenSlices or "
                              f"SliceThickness) in {files[0].parent}")
    return [round(float(dz), 6), ps[0][0], ps[0][1]], {**info, "dz_source": source}


def split_patients(patients: Sequence[str], *, val_fraction: float, test_fraction: float, seed: int,
                   val: Sequence[str] | None = None, test: Sequence[str] | None = None) -> dict[str, str]:
    """Patient -> split. Given lists win; the rest: a seeded shuffle, ``round(fraction * n)`` patients each."""
    named = {"val": list(val or []), "test": list(test or [])}
    unknown = sorted(set(named["val"] + named["test"]) - set(patients), key=natural_key)
    if unknown:
        raise ZooError(f"--val-patients / --test-patients name patients that SRC lacks: {unknown} "
                       f"(it has {list(patients)})")
    if set(named["val"]) & set(named["test"]):
        raise ZooError(f"patients in both --val-patients and --test-patients: {sorted(set(named['val']) & set(named['test']))}")
    out = {p: "val" for p in named["val"]} | {p: "test" for p in named["test"]}
    n = len(patients)
    rest = [patients[i] for i in np.random.default_rng(seed).permutation(n) if patients[i] not in out]
    for split, frac, given in (("test", test_fraction, test), ("val", val_fraction, val)):
        if given is None:
            k = min(int(round(frac * n)), max(len(rest) - 1, 0))
            out.update({p: split for p in rest[:k]})
            rest = rest[k:]
    out.update({p: "train" for p in rest})
    if "train" not in out.values():
        raise ZooError(f"no patient left for training ({n} patients, splits {out})")
    return out


def prepare_chaos(src: str | Path, out: str | Path, *, sequences: Sequence[str] = ("T1DUAL_in",),
                  val_fraction: float = 0.1, test_fraction: float = 0.25, seed: int = 0,
                  val_patients: Sequence[str] | None = None, test_patients: Sequence[str] | None = None,
                  overwrite: bool = False) -> dict:
    """Convert the CHAOS MR release at ``src`` into ``out`` (see the module docstring); returns the
    spacing.json document."""
    _pydicom()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    bad = [s for s in sequences if s not in SEQUENCES]
    if bad or not sequences:
        raise ZooError(f"unknown CHAOS sequence(s) {bad}; choose from {sorted(SEQUENCES)}")
    _check_out(out, overwrite)
    mr = find_mr_root(src)
    patients = sorted((p.name for p in mr.iterdir() if p.is_dir() and ((p / "T1DUAL").is_dir() or
                                                                     (p / "T2SPIR").is_dir())), key=natural_key)
    split_of = split_patients(patients, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                              val=val_patients, test=test_patients)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))  # moved into place when complete
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would stay on the output
    doc = {"format": FORMAT, "source": "CHAOS MR", "spacing_order": ["dz", "dy", "dx"], "units": "mm",
           "levels": {"background": 0, "liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252},
           "volumes": {}}
    try:
        for patient in patients:
            split = split_of[patient]
            for seq in sequences:
                dcm_dir, gt_dir = (mr / patient / part for part in SEQUENCES[seq])
                what = f"patient {patient} {seq}"
                images, masks, spacing, info = read_series(dcm_dir, gt_dir, what)
                vid = patient if len(sequences) == 1 else f"{patient}_{seq}"
                for sub, arrays in (("Img", images), ("GT", masks)):
                    folder = tmp / split / sub
                    folder.mkdir(parents=True, exist_ok=True)
                    for k, a in enumerate(arrays, start=1):  # 1-based, unpadded: the official naming
                        Image.fromarray(a).save(folder / f"Subj_{vid}slice_{k}.png")
                doc["volumes"][vid] = {"spacing": spacing, "shape": list(images.shape), "split": split,
                                       "patient": patient, "sequence": seq, **info}
                log.info("%s -> %s/%s: %d slices, spacing %s mm", what, split, vid, len(images), spacing)
        (tmp / SIDECAR).write_text(json.dumps(doc, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return doc


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ZooError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose another folder")
    try:
        ours = json.loads((out / SIDECAR).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ZooError(f"--out {out} is not a folder this command wrote (no {SIDECAR} of ours); "
                       "--overwrite replaces only those: remove it yourself or choose another folder")


def main_chaos(args) -> dict:
    """The CLI's ``prepare chaos``."""
    def names(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    return prepare_chaos(args.src, args.out, sequences=names(args.sequences), val_fraction=args.val_fraction,
                         test_fraction=args.test_fraction, seed=args.seed, val_patients=names(args.val_patients),
                         test_patients=names(args.test_patients), overwrite=args.overwrite)
