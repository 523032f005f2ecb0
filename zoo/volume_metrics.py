"""Segmentation metrics per 3-D volume, for datasets whose 2-D slices belong to volumes (CHAOS patients).

The test split's predicted label maps are stacked back into volumes, and every volume is scored per
foreground class, as the multi-scale guided segmenter's paper reports CHAOS (each organ's score averaged
over patients):

- Dice: MONAI's ``compute_dice``; volumetric similarity ``VS = 1 - |A - B| / (A + B)`` (A, B: voxel counts
  of prediction and truth; neither library has it);
- HD95: MONAI's ``compute_hausdorff_distance(percentile=95)`` (the larger of the two directed 95th
  percentiles); MSD: ``compute_average_surface_distance(symmetric=True)`` (the mean of both directions'
  border distances pooled, CHAOS's ASSD). Borders are ``mask XOR erosion(mask)`` (6-connected), distances
  are Euclidean between border voxel centres in millimetres with the voxel spacing ``(dz, dy, dx)``.

Empty masks, a documented choice:

- a class absent from both the prediction and the truth of a volume has no score there: that volume is
  left out of the class's means (NaN). The official code scores 3-D Dice with ``medpy.metric.dc``, which
  returns 0 in that case; CHAOS volumes hold all four organs, so the two agree on CHAOS.
- a class in only one of the two: Dice 0 and VS 0 count; HD95 and MSD are undefined (MONAI returns inf), so
  that volume is left out of the class's HD95 / MSD means and counted in ``volume_surface_undefined``.
- truth pixels of value 255 (ignore) belong to neither mask.

Spacing. ``(dz, dy, dx)`` per volume is given for the files' pixel grid (a sidecar ``spacing.json`` or
``data.spacing``); when evaluation resizes the slices, dy and dx are scaled by file size / evaluated size,
so distances stay in millimetres. Without any spacing the distances are in voxels (the paper's choice:
it reports CHAOS "on voxels", the slice spacing being unknown to it), with a warning.

Slices are identified by a regex over each image's path relative to ``data.root`` (``data.volume_key``:
named group ``volume``, else the first group; ``slice`` group or ``data.slice_key`` for the slice index,
else the natural order of the file names). A volume with a missing slice index, a repeated one, or another
slice count than its sidecar states is an error naming the volume.
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataFormatError

log = logging.getLogger("zoo.data")

SIDECAR = "spacing.json"
IGNORE = 255
SCORES = ("dice", "vs", "hd95", "msd")


def natural_key(text: str) -> list:
    """``slice_2`` before ``slice_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- scores of one volume
def volume_scores(pred: np.ndarray, gt: np.ndarray, classes: Sequence[int],
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
    """Dice, VS, HD95, MSD of label volumes ``pred``, ``gt`` ``[D, H, W]`` for each of ``classes``:
    ``{score: float64[len(classes)]}``, NaN where a score is undefined (see the module docstring)."""
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be volumes [D, H, W] of one shape")
    spacing = [float(s) for s in spacing]
    valid = gt != IGNORE
    out = {k: np.full(len(classes), np.nan) for k in SCORES}
    for k, c in enumerate(classes):
        p, t = (pred == c) & valid, gt == c
        a, b = int(p.sum()), int(t.sum())
        if a == 0 and b == 0:
            continue  # absent from both: no score for this volume
        out["vs"][k] = 1.0 - abs(a - b) / (a + b)
        yp, yt = torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None]
        out["dice"][k] = float(compute_dice(yp, yt, include_background=True, ignore_empty=False))
        if a and b:
            with warnings.catch_warnings():  # MONAI 1.5+ passes its own deprecated always_return_as_numpy inside
                warnings.simplefilter("ignore", FutureWarning)
                out["hd95"][k] = float(compute_hausdorff_distance(yp, yt, include_background=True, percentile=95,
                                                                  spacing=spacing))
                out["msd"][k] = float(compute_average_surface_distance(yp, yt, include_background=True,
                                                                       symmetric=True, spacing=spacing))
    return out


# --------------------------------------------------------------------------- which slice is where
@dataclass
class VolumeIndex:
    """Per dataset item: its volume id and slice index (``volumes[i]``, ``slices[i]``, ``paths[i]``); per
    volume: its spacing ``(dz, dy, dx)`` for the files' pixel grid, and the ``(rows, cols)`` a sidecar states
    for them (``stated``, checked against the files). ``units``: ``mm`` or ``voxels``."""

    volumes: list[str]
    slices: list[int]
    paths: list[str]
    spacing: dict[str, tuple[float, float, float]]
    stated: dict[str, tuple[int, int]] = field(default_factory=dict)
    units: str = "mm"

    def members(self) -> dict[str, list[int]]:
        """Volume id -> its item indices in slice order."""
        out: dict[str, list[int]] = {}
        for i in sorted(range(len(self.volumes)), key=lambda i: self.slices[i]):
            out.setdefault(self.volumes[i], []).append(i)
        return out

    def eval_spacing(self, volume: str, rows: int, cols: int) -> tuple[float, float, float]:
        """The spacing of ``volume`` on the evaluated grid (``rows`` x ``cols`` per slice): dy and dx scaled
        by the files' size (read from the first slice's header) over the evaluated size."""
        from PIL import Image

        first = self.paths[self.members()[volume][0]]
        with Image.open(first) as im:  # the header only
            grid = (im.height, im.width)
        if volume in self.stated and self.stated[volume] != grid:
            raise DataFormatError(f"{first} is {grid[0]}x{grid[1]} (rows x cols) but the {SIDECAR} spacing of volume "
                                  f"{volume!r} is for {self.stated[volume][0]}x{self.stated[volume][1]} slices; "
                                  "re-run the conversion or fix the sidecar")
        dz, dy, dx = self.spacing[volume]
        return dz, dy * grid[0] / rows, dx * grid[1] / cols


def _relative(path: str, root: Path | None) -> str:
    p = Path(path)
    if root is not None:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def volume_of(path: str, root: Path | None, volume_key: str) -> tuple[str, int | None, str]:
    """(volume id, slice index or None, relative path) of one image file, by ``volume_key``."""
    rx = re.compile(volume_key)
    rel = _relative(path, root)
    m = rx.search(rel)
    if m is None:
        raise DataFormatError(f"data.volume_key {volume_key!r} does not match {rel!r} (the path of {path} relative "
                              "to data.root); every image of a volume dataset must name its volume")
    vol = m.group("volume") if "volume" in rx.groupindex else (m.group(1) if rx.groups else m.group(0))
    sl = m.group("slice") if "slice" in rx.groupindex else None
    return vol, _slice_number(sl, path, volume_key) if sl is not None else None, rel


def _slice_number(text: str | None, path: str, pattern: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise DataFormatError(f"the slice index {text!r} that {pattern!r} finds in {path} is not an integer") from None


def read_sidecar(path: Path) -> dict[str, dict]:
    """``{"volumes": {id: {"spacing": [dz, dy, dx], "shape": [slices, rows, cols] (optional)}}}`` ->
    the ``volumes`` dict, checked."""
    try:
        doc = json.loads(path.read_text())
        vols = doc["volumes"]
        if not isinstance(vols, dict):
            raise TypeError("volumes is not an object")
        for v, info in vols.items():
            sp = [float(s) for s in info["spacing"]]
            if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
                raise ValueError(f"volume {v}: spacing {info['spacing']} is not three positive numbers [dz, dy, dx]")
            if "shape" in info and len(info["shape"]) != 3:
                raise ValueError(f"volume {v}: shape {info['shape']} is not [slices, rows, cols]")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: not a volume sidecar ({type(e).__name__}: {e}); expected "
                              '{"volumes": {"<id>": {"spacing": [dz, dy, dx], "shape": [slices, rows, cols]}}}') from None
    return vols


def index_volumes(paths: Sequence[str], root: Path | None, volume_key: str, *, slice_key: str | None = None,
                  spacing: float | Sequence[float] | None = None, sidecar: Path | None = None,
                  split: str = "test") -> VolumeIndex:
    """Volume id and slice index of every image in ``paths`` (a split's items, in dataset order), checked
    (no repeated or missing slice index, the sidecar's slice count), with each volume's spacing:
    ``data.spacing`` of one number (isotropic) or ``[dz, dy, dx]`` wins; else the sidecar; ``[dy, dx]``
    alone gives no slice spacing (an error); none at all: voxel units, with a warning."""
    rows = [volume_of(p, root, volume_key) for p in paths]
    if slice_key is not None:
        srx = re.compile(slice_key)
        numbered = []
        for (vol, _, rel), p in zip(rows, paths):
            m = srx.search(rel)
            if m is None:
                raise DataFormatError(f"data.slice_key {slice_key!r} does not match {rel!r} ({p})")
            text = m.group("slice") if "slice" in srx.groupindex else (m.group(1) if srx.groups else m.group(0))
            numbered.append((vol, _slice_number(text, p, slice_key), rel))
        rows = numbered
    volumes = [r[0] for r in rows]
    slices: list[int | None] = [r[1] for r in rows]
    if any(s is None for s in slices):  # no slice index in the names: their natural order within the volume
        by_vol: dict[str, list[int]] = {}
        for i, v in enumerate(volumes):
            by_vol.setdefault(v, []).append(i)
        for items in by_vol.values():
            for k, i in enumerate(sorted(items, key=lambda i: natural_key(rows[i][2]))):
                slices[i] = k
    seen: dict[tuple[str, int], str] = {}
    for v, s, p in zip(volumes, slices, paths):
        if (v, s) in seen:
            raise DataFormatError(f"{split}: volume {v!r} has slice {s} twice: {seen[(v, s)]} and {p}")
        seen[(v, s)] = p
    side = read_sidecar(sidecar) if sidecar is not None and sidecar.is_file() else None
    index = VolumeIndex(volumes, [int(s) for s in slices], [str(p) for p in paths], {})
    for v, members in index.members().items():
        got = [index.slices[i] for i in members]
        missing = sorted(set(range(got[0], got[-1] + 1)) - set(got))
        if missing:
            raise DataFormatError(
                f"{split}: volume {v!r} lacks slice(s) {missing[:10]} between {got[0]} and {got[-1]} "
                f"(e.g. next to {paths[members[0]]}); volume metrics need every slice: restore the missing file(s)")
        info = (side or {}).get(v)
        if side is not None and info is None and _from_sidecar(spacing):
            raise DataFormatError(f"{split}: volume {v!r} is not in {sidecar}; add its spacing there")
        if info is not None and "shape" in info and int(info["shape"][0]) != len(got):
            raise DataFormatError(f"{split}: volume {v!r} has {len(got)} slices but {sidecar} says "
                                  f"{int(info['shape'][0])}; a volume metric needs every slice")
        index.spacing[v] = _spacing_of(v, spacing, info)
        if info is not None and "shape" in info and _from_sidecar(spacing):
            index.stated[v] = (int(info["shape"][1]), int(info["shape"][2]))
    if spacing is None and side is None:
        index.units = "voxels"
        log.warning("%s: no data.spacing and no %s: volume HD95 / MSD are in voxels, not millimetres", split, SIDECAR)
    return index


def _from_sidecar(spacing) -> bool:
    """Whether the volume spacing comes from the sidecar, given ``data.spacing``."""
    return spacing is None or (not np.isscalar(spacing) and len(spacing) == 2)


def _spacing_of(volume: str, spacing, info: dict | None) -> tuple[float, float, float]:
    if spacing is not None and (np.isscalar(spacing) or len(spacing) == 1):
        s = float(spacing if np.isscalar(spacing) else spacing[0])
        return (s, s, s)
    if spacing is not None and len(spacing) == 3:
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]
    if info is not None:
        return tuple(float(s) for s in info["spacing"])  # type: ignore[return-value]
    if spacing is not None:
        raise DataFormatError(f"data.spacing={list(spacing)} is a pixel size (dy, dx) without the slice spacing "
                              f"the volume metrics need (volume {volume!r}): give data.spacing=[dz, dy, dx] or a "
                              f"{SIDECAR} with each volume's spacing")
    return (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- accumulation and the means
class VolumeStore:
    """The test split's predicted and true label maps by dataset index, on the CPU (uint8 at the evaluated
    resolution); :meth:`gathered` unites the DDP ranks' parts (every rank then holds all of them)."""

    def __init__(self, num_classes: int) -> None:
        self.dtype = np.uint8 if num_classes <= IGNORE else np.int16  # class ids and 255 (ignore)
        self.items: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, indices: Sequence[int], pred: torch.Tensor, target: torch.Tensor) -> None:
        p = pred.detach().cpu().numpy().astype(self.dtype)
        t = target.detach().cpu().numpy().astype(self.dtype)
        for i, pi, ti in zip(indices, p, t):
            self.items[int(i)] = (pi, ti)

    def reset(self) -> None:
        self.items = {}

    def gathered(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Every rank's items (a DistributedSampler's padding repeats some indices: the same slice twice)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return self.items
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.items)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged


def volume_metrics(items: dict[int, tuple[np.ndarray, np.ndarray]], index: VolumeIndex, class_names: Sequence[str],
                   classes: Sequence[int] | None = None) -> dict[str, float]:
    """Means over volumes per class (``volume_dice/<class>``, ...) and over classes (``volume_dice``, ...) of
    ``classes`` (default: all but 0); ``volumes`` and ``volume_surface_undefined`` counts. Empty when the
    pass did not see every slice of the split (``limit_test_batches``): a partial volume would be scored
    as if whole."""
    if set(items) != set(range(len(index.volumes))):
        log.warning("the test pass saw %d of the %d slices (limit_test_batches?): no volume metrics",
                    len(set(items) & set(range(len(index.volumes)))), len(index.volumes))
        return {}
    classes = list(range(1, len(class_names)) if len(class_names) > 1 else [0]) if classes is None else list(classes)
    per_volume = []
    for vol, members in index.members().items():
        shapes = {items[i][0].shape for i in members}
        if len(shapes) != 1:
            raise DataFormatError(f"volume {vol!r}: its slices were evaluated at different sizes {sorted(shapes)}; "
                                  "give its slice files one size")
        pred = np.stack([items[i][0] for i in members])
        gt = np.stack([items[i][1] for i in members])
        per_volume.append(volume_scores(pred, gt, classes, index.eval_spacing(vol, *pred.shape[1:])))
    out: dict[str, float] = {"volumes": float(len(per_volume))}
    undefined = sum(int(np.sum(np.isnan(s["hd95"]) & ~np.isnan(s["dice"]))) for s in per_volume)
    with warnings.catch_warnings():  # the mean of a class no volume scores is NaN by definition, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        for score in SCORES:
            table = np.stack([s[score] for s in per_volume])  # [volumes, classes]
            per_class = np.nanmean(table, 0)
            out[f"volume_{score}"] = float(np.nanmean(per_class)) if not np.isnan(per_class).all() else math.nan
            out.update({f"volume_{score}/{class_names[c]}": float(v) for c, v in zip(classes, per_class)})
    out["volume_surface_undefined"] = float(undefined)
    return out
