"""Re-identification datasets read from their published layouts, and the embedded ``digit_reid`` demo.

Every reader returns :class:`ReIDRecords`: ``train`` / ``query`` / ``gallery`` lists of
``(path, pid, camid)`` with the ORIGINAL identity ids and 0-based camera ids (the datamodule relabels
the training ids). The protocols follow torchreid (``torchreid/data/datasets/image/*.py``) and TransReID
(``datasets/*.py``):

- Market-1501 / DukeMTMC-reID: ``0002_c1s1_000451_03.jpg`` -> pid 2, camid 0 (``c1``). pid -1 (junk) is
  dropped everywhere, as both codes do; pid 0 (Market's distractors) is kept in the gallery only, where
  it can never match a query (documented choice: the two codes keep it in the gallery; a 0 in train or
  query would be an identity nobody trains on or can retrieve, so it is dropped there).
- MSMT17: ``list_{train,val,query,gallery}.txt`` with lines ``relative/path.jpg pid``; train/val images
  under ``train/``, query/gallery under ``test/`` (``mask_train_v2/``, ``mask_test_v2/`` for V2); the
  camera is the third ``_`` field of the file name, 1-based (``0000_000_01_0303morning_0015_0.jpg`` -> 0).
  ``combine_val=True`` adds ``list_val.txt`` to training as TransReID does (the published 32,621
  training images are list_train + list_val; torchreid leaves val out unless ``combineall``).
- VeRi-776: ``image_{train,query,test}/`` with ``name_{train,query,test}.txt`` listing the files;
  ``0001_c001_00016450_0.jpg`` -> pid 1, camid 0. A name list is authoritative when present (every listed
  file must exist); without one the folder's ``*.jpg`` are read, as torchreid and TransReID do.

A missing folder or list, an empty folder, or a listed file that is absent (a half-unpacked archive) is
a :class:`~zoo.errors.DatasetNotFoundError` naming the path and drawing the layout; a file name the
protocol cannot parse is a :class:`~zoo.errors.DataFormatError` naming the file.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from zoo.errors import DataFormatError, DatasetNotFoundError

from .common import require_dir

Record = tuple  # (path or item index, pid, camid)


@dataclasses.dataclass
class ReIDRecords:
    """One dataset's records with original pids; ``root`` is the folder that was read."""

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    root: Path | None = None


MARKET_LAYOUT = """\
root/                              (or root/Market-1501-v15.09.15/, root/market1501/)
  bounding_box_train/0002_c1s1_000451_03.jpg   pid 0002, camera c1; -1 = junk (dropped)
  query/0001_c1s1_001051_00.jpg
  bounding_box_test/0000_c1s1_000151_01.jpg    0000 = distractor (gallery only), -1 = junk
"""
DUKE_LAYOUT = """\
root/                              (or root/DukeMTMC-reID/, root/dukemtmc-reid/DukeMTMC-reID/)
  bounding_box_train/0001_c2_f0046182.jpg      pid 0001, camera c2
  query/0005_c2_f0046985.jpg
  bounding_box_test/0002_c1_f0044158.jpg
"""
MSMT_LAYOUT = """\
root/                              (or root/MSMT17_V1/, root/MSMT17_V2/, root/MSMT17/)
  list_train.txt                   lines 'PID/FILE.jpg PID', e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'
  list_val.txt                     optional (added to training with combine_val=true)
  list_query.txt  list_gallery.txt
  train/0000/0000_000_01_0303morning_0015_0.jpg  camera = 3rd '_' field (1-based); V2: mask_train_v2/
  test/0000/0000_000_01_0303morning_0036_0.jpg                                       V2: mask_test_v2/
"""
VERI_LAYOUT = """\
root/                              (or root/VeRi/)
  image_train/0001_c001_00016450_0.jpg         pid 0001, camera c001
  image_query/0002_c002_00030600_0.jpg
  image_test/0002_c003_00083155_0.jpg
  name_train.txt  name_query.txt  name_test.txt   one file name a line (optional: without them the
                                                  folders' *.jpg are read)
"""

_PID_CAM = re.compile(r"^([-\d]+)_c(\d+)")


def _locate(root: Path, marker: str, candidates: tuple[str, ...], what: str, layout: str) -> Path:
    """The folder holding ``marker``: ``root`` itself or one of the archives' usual subfolders."""
    root = Path(root).expanduser()
    for sub in ("", *candidates):
        if (root / sub / marker).exists():
            return root / sub
    tried = ", ".join(str(root / sub / marker) for sub in ("", *candidates))
    raise DatasetNotFoundError(f"{what}: not found under {root} (looked for {tried})\nExpected layout:\n"
                               f"{layout.rstrip()}")


def _jpgs(folder: Path, what: str, layout: str) -> list[Path]:
    require_dir(folder, what, layout)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
    if not files:
        raise DatasetNotFoundError(f"{what}: no .jpg images in {folder} (half-unpacked archive?)\n"
                                   f"Expected layout:\n{layout.rstrip()}")
    return files


def _pid_cam(path: Path, what: str) -> tuple[int, int]:
    m = _PID_CAM.match(path.name)
    if m is None or int(m.group(2)) < 1:
        raise DataFormatError(f"{what}: cannot read identity and camera from the file name {path} "
                              "(expected PID_cN..., e.g. 0002_c1s1_000451_03.jpg)")
    return int(m.group(1)), int(m.group(2)) - 1


def _check_listed(records: list[Record], listing: Path, what: str, layout: str) -> None:
    missing = [r[0] for r in records if not Path(r[0]).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{what}: {len(missing)} of the {len(records)} images listed in {listing} are missing, e.g. "
            f"{missing[0]} (half-unpacked archive?)\nExpected layout:\n{layout.rstrip()}")


def _filter(records: list[Record], *, keep_distractors: bool) -> list[Record]:
    """Junk (-1) dropped; distractors (0) kept only where asked (the gallery)."""
    return [r for r in records if r[1] != -1 and (keep_distractors or r[1] != 0)]


def _read_bounding_boxes(root, what: str, candidates: tuple[str, ...], layout: str) -> ReIDRecords:
    base = _locate(root, "bounding_box_train", candidates, what, layout)
    splits = {}
    for name, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        files = _jpgs(base / folder, what, layout)
        splits[name] = _filter([(str(p), *_pid_cam(p, what)) for p in files], keep_distractors=name == "gallery")
    return ReIDRecords(**splits, root=base)


def read_market1501(root) -> ReIDRecords:
    return _read_bounding_boxes(root, "market1501", ("Market-1501-v15.09.15", "market1501",
                                                     "market1501/Market-1501-v15.09.15"), MARKET_LAYOUT)


def read_dukemtmc(root) -> ReIDRecords:
    return _read_bounding_boxes(root, "dukemtmc", ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID",
                                                   "dukemtmc-reid"), DUKE_LAYOUT)


def _msmt_list(listing: Path, folder: Path) -> list[Record]:
    what = "msmt17"
    if not listing.is_file():
        raise DatasetNotFoundError(f"{what}: list file not found: {listing}\nExpected layout:\n{MSMT_LAYOUT.rstrip()}")
    records = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            rel, pid = fields[0], int(fields[1])
            cam = int(Path(rel).name.split("_")[2]) - 1
        except (IndexError, ValueError):
            raise DataFormatError(f"{what}: {listing} line {n} is {line!r}; expected 'PID/FILE.jpg PID' with the "
                                  "camera as the 3rd '_' field of FILE (0000_000_01_0303morning_0015_0.jpg)") from None
        if cam < 0:
            raise DataFormatError(f"{what}: {listing} line {n}: camera field of {rel} must be 1-based")
        records.append((str(folder / rel), pid, cam))
    if not records:
        raise DatasetNotFoundError(f"{what}: {listing} lists no images (half-unpacked archive?)")
    _check_listed(records, listing, what, MSMT_LAYOUT)
    return records


def read_msmt17(root, combine_val: bool = True) -> ReIDRecords:
    base = _locate(root, "list_train.txt", ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17/MSMT17_V1",
                                            "msmt17/MSMT17_V2", "msmt17"), "msmt17", MSMT_LAYOUT)
    train_dir, test_dir = base / "train", base / "test"
    if not train_dir.is_dir() and (base / "mask_train_v2").is_dir():  # MSMT17_V2's folder names
        train_dir, test_dir = base / "mask_train_v2", base / "mask_test_v2"
    for d in (train_dir, test_dir):
        require_dir(d, "msmt17", MSMT_LAYOUT)
    train = _msmt_list(base / "list_train.txt", train_dir)
    if combine_val and (base / "list_val.txt").is_file():
        train += _msmt_list(base / "list_val.txt", train_dir)
    return ReIDRecords(train=train, query=_msmt_list(base / "list_query.txt", test_dir),
                       gallery=_msmt_list(base / "list_gallery.txt", test_dir), root=base)


def read_veri776(root) -> ReIDRecords:
    what = "veri776"
    base = _locate(root, "image_train", ("VeRi", "veri", "VeRi-776"), what, VERI_LAYOUT)
    splits = {}
    for name, folder, listing in (("train", "image_train", "name_train.txt"), ("query", "image_query", "name_query.txt"),
                                  ("gallery", "image_test", "name_test.txt")):
        folder, listing = base / folder, base / listing
        if listing.is_file():
            require_dir(folder, what, VERI_LAYOUT)
            files = [folder / n.strip() for n in listing.read_text().splitlines() if n.strip()]
            if not files:
                raise DatasetNotFoundError(f"{what}: {listing} lists no images (half-unpacked archive?)")
            records = [(str(p), *_pid_cam(p, what)) for p in files]
            _check_listed(records, listing, what, VERI_LAYOUT)
        else:
            records = [(str(p), *_pid_cam(p, what)) for p in _jpgs(folder, what, VERI_LAYOUT)]
        splits[name] = _filter(records, keep_distractors=True)  # VeRi has no distractor id: only -1 is junk
    return ReIDRecords(**splits, root=base)


READERS: dict[str, Callable[..., ReIDRecords]] = {
    "market1501": read_market1501, "dukemtmc": read_dukemtmc, "msmt17": read_msmt17, "veri776": read_veri776,
}
LAYOUTS = {"market1501": MARKET_LAYOUT, "dukemtmc": DUKE_LAYOUT, "msmt17": MSMT_LAYOUT, "veri776": VERI_LAYOUT}


# --------------------------------------------------------------------------- digit_reid (embedded)
DIGIT_REID_SEED = 0  # the demo is one fixed dataset: the run's seed only moves the val split and the sampler
DIGIT_REID_HW = (64, 32)  # rendered as a 2:1 "pedestrian" frame
DIGIT_REID_CAMERAS = ("shifted", "tinted", "scaled+blurred", "rotated+noisy")


@dataclasses.dataclass(frozen=True)
class DigitReIDSpec:
    num_train_ids: int = 200
    num_test_ids: int = 100
    per_camera: int = 2  # images per (identity, camera): 4 cameras x 2 = 8 images per identity


def digit_reid_records(spec: DigitReIDSpec = DigitReIDSpec()) -> tuple[ReIDRecords, np.ndarray]:
    """The demo's records (the "path" of a record is its row in :func:`render_digit_reid`) and, per row,
    the two scikit-learn digits (indices into its 1,797) the identity is drawn from.

    An identity is a pair of handwritten digits stacked in a 2:1 frame (an "upper" and a "lower body"),
    pid = its number (train 0..num_train_ids-1, test after them); no digit image is used by two
    identities, so train and test identities share no handwriting. Query = the first image of every
    (test identity, camera), gallery = the rest: each query has cross-camera matches."""
    from .embedded import _digit_arrays

    n_ids = spec.num_train_ids + spec.num_test_ids
    n_digits = len(_digit_arrays()[1])
    if 2 * n_ids > n_digits:
        raise ValueError(f"digit_reid: {n_ids} identities need {2 * n_ids} of the {n_digits} digits")
    pairs = np.random.default_rng(DIGIT_REID_SEED).permutation(n_digits)[: 2 * n_ids].reshape(n_ids, 2)
    out: dict[str, list] = {"train": [], "query": [], "gallery": []}
    base = []
    for pid in range(n_ids):
        for cam in range(len(DIGIT_REID_CAMERAS)):
            for k in range(spec.per_camera):
                row = len(base)
                base.append(pairs[pid])
                split = "train" if pid < spec.num_train_ids else ("query" if k == 0 else "gallery")
                out[split].append((row, pid, cam))
    return ReIDRecords(**out), np.stack(base)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of ``x [N, C, H, W]`` with ``sigma [N]`` (one depthwise convolution)."""
    n, c, h, w = x.shape
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k1 = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # [N*C, 1, 7, 7]
    out = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="replicate"), k2, groups=n * c)
    return out.reshape(n, c, h, w)


@functools.lru_cache(maxsize=2)
def render_digit_reid(spec: DigitReIDSpec = DigitReIDSpec()) -> tuple[torch.Tensor, ReIDRecords]:
    """All demo images, ``uint8 [N, 3, 64, 32]``, and their records. Each camera is a fixed augmentation
    family whose parameters are drawn per image from a generator seeded by (identity, camera, index):

    - cam 0 *shifted*: moved up to 8 px vertically and 4 px horizontally, grey ink;
    - cam 1 *tinted*: a colour cast (per-channel gains 0.35-1) and contrast 0.6-1 on a lit background;
    - cam 2 *scaled+blurred*: scaled 0.75-1.15 and Gaussian-blurred (sigma 0.7-1.6);
    - cam 3 *rotated+noisy*: rotated +-20 degrees with additive noise (sd 0.1).

    Every image also gets a small jitter (+-2 px, +-4 degrees, scale +-5 %), so no two are identical.
    """
    from .embedded import _digit_arrays

    records, base = digit_reid_records(spec)
    digits = torch.from_numpy(_digit_arrays()[0][base.reshape(-1)]).unsqueeze(1)  # [2N, 1, 8, 8] in [0, 1]
    h, w = DIGIT_REID_HW
    glyph = F.interpolate(digits, size=(h // 2, w), mode="bilinear", align_corners=False).clamp(0, 1)
    canvas = glyph.reshape(len(base), 2, 1, h // 2, w).transpose(1, 2).reshape(len(base), 1, h, w)  # stacked
    n = len(base)
    cams = np.empty(n, np.int64)
    for split in (records.train, records.query, records.gallery):
        for row, _, cam in split:
            cams[row] = cam
    # per-image parameters, each from its own (pid, camera, index) stream
    params = np.empty((n, 12), np.float64)
    seen: dict[tuple[int, int], int] = {}
    for row in range(n):
        key = (row // (len(DIGIT_REID_CAMERAS) * spec.per_camera), int(cams[row]))  # (pid, camera)
        k = seen[key] = seen.get(key, -1) + 1
        params[row] = np.random.default_rng([DIGIT_REID_SEED, key[0], key[1], k]).uniform(0, 1, 12)
    u = torch.from_numpy(params).float()
    cam = torch.from_numpy(cams)
    # geometry: jitter for all, then the camera's own family
    dy = (u[:, 0] * 4 - 2) / (h / 2)
    dx = (u[:, 1] * 4 - 2) / (w / 2)
    angle = torch.deg2rad(u[:, 2] * 8 - 4)
    scale = 0.95 + 0.1 * u[:, 3]
    dy = torch.where(cam == 0, (u[:, 4] * 16 - 8) / (h / 2), dy)
    dx = torch.where(cam == 0, (u[:, 5] * 8 - 4) / (w / 2), dx)
    scale = torch.where(cam == 2, 0.75 + 0.4 * u[:, 4], scale)
    angle = torch.where(cam == 3, torch.deg2rad(u[:, 4] * 40 - 20), angle)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    aspect = h / w  # rotate in pixel space, not in the [-1, 1] box of a 2:1 frame
    theta = torch.stack([torch.stack([cos, -sin * aspect, -dx], 1), torch.stack([sin / aspect, cos, -dy], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    ink = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    blurred = _gaussian_blur(ink, 0.7 + 0.9 * u[:, 6])
    ink = torch.where((cam == 2)[:, None, None, None], blurred, ink)
    # photometry: ink colour over a background, per camera
    bg = (0.05 + 0.1 * u[:, 7])[:, None].repeat(1, 3)
    colour = torch.full((n, 3), 0.9)
    tint = 0.35 + 0.65 * u[:, 8:11]
    contrast = 0.6 + 0.4 * u[:, 11]
    is1 = (cam == 1)[:, None]
    colour = torch.where(is1, tint * contrast[:, None], colour)
    bg = torch.where(is1, 0.25 + 0.2 * u[:, 9:10].repeat(1, 3) * tint, bg)
    img = bg[:, :, None, None] + (colour - bg)[:, :, None, None] * ink
    noise = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(DIGIT_REID_SEED)) * 0.1
    img = img + torch.where((cam == 3)[:, None, None, None], noise, torch.zeros(()))
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8), records
