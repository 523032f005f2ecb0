"""Bags for multiple-instance learning: feature bags on disk, and the padding collate."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.errors import DataFormatError

FEATUREBAGS_LAYOUT = """\
root/
  pt_files/<bag_id>.pt      float tensor N x D (torch.save)            (CLAM's layout)
  h5_files/<bag_id>.h5      datasets 'features' N x D, optional 'coords' N x 2
  labels.csv                header bag_id,label[,split]; split in train/val/test
                            (CLAM/ACMIL columns slide_id and split_info are read too)
or ACMIL's single HDF5 file (data.h5_file=FILE): one group per slide with datasets 'feat' N x D,
'coords' N x 2 and attribute 'label'; splits from data.split_file (split_<seed>.json with
train_names/val_names/test_names) or a CSV's split column.
"""
ALIASES = {"slide_id": "bag_id", "split_info": "split"}  # CLAM / ACMIL CSV column names
SPLITS = ("train", "val", "test")


def collate_bags(batch):
    """[(bag [N_i, ...], label)] -> (bags [B, Nmax, ...] zero padded, mask bool [B, Nmax], labels)."""
    bags, labels = zip(*batch)
    lengths = [b.shape[0] for b in bags]
    if min(lengths) == 0:
        raise DataFormatError(f"empty bag at position {lengths.index(0)} of the batch")
    tail = bags[0].shape[1:]
    if any(b.shape[1:] != tail for b in bags):
        raise DataFormatError(f"bags of different instance shapes in one batch: {[tuple(b.shape) for b in bags]}")
    out = bags[0].new_zeros((len(bags), max(lengths), *tail))
    mask = torch.zeros(len(bags), max(lengths), dtype=torch.bool)
    for i, (bag, n) in enumerate(zip(bags, lengths)):
        out[i, :n] = bag
        mask[i, :n] = True
    return out, mask, torch.as_tensor(labels, dtype=torch.long)


def read_bag_table(path: Path, with_lines: bool = False):
    """``bag_id,label[,split]`` rows -> ids, raw labels, splits (None without the column), and with
    ``with_lines`` each row's line number in the file (for errors that name the row)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, lines = [], []
        for r in reader:
            rows.append(r)
            lines.append(reader.line_num)
    if not rows:
        raise DataFormatError(f"{path} has no rows; expected a header bag_id,label[,split]")
    cols = {ALIASES.get(c.strip(), c.strip()) for c in rows[0] if c is not None}
    if not {"bag_id", "label"} <= cols:
        raise DataFormatError(f"{path} has columns {sorted(cols)}; expected bag_id,label[,split] "
                              "(or CLAM's slide_id,label[,split_info])")
    rows = [{ALIASES.get(k.strip(), k.strip()): (v or "").strip() for k, v in r.items() if k is not None}
            for r in rows]
    ids = [r["bag_id"] for r in rows]
    dup = sorted({b for b in ids if ids.count(b) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise DataFormatError(f"{path} lists bags more than once: {dup[:5]}")
    splits = None
    if "split" in cols:
        splits = [r["split"].lower() for r in rows]
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise DataFormatError(f"{path}: split values {bad} are not train/val/test")
    labels = [r["label"] for r in rows]
    return (ids, labels, splits, lines) if with_lines else (ids, labels, splits)


def _int_label(v: str) -> int | None:
    try:
        return int(v)
    except ValueError:
        return None


def encode_labels(raw: list[str], class_names: list[str] | None = None,
                  where: Callable[[int], str] | None = None) -> tuple[list[int], list[str]]:
    """Raw labels -> class ids and the class names.

    With ``class_names`` declared, a label is one of the names or a class id ``0..C-1``; any other
    label (unknown, empty, an id past the class count) is a :class:`DataFormatError` naming its row
    (``where(i)``: the file and row of label ``i``). Nothing declared: integer labels are class ids as
    they are, names map to ids in sorted order; empty labels and a mix of ids and names are refused.
    """
    where = where or (lambda i: f"row {i + 1}")
    if class_names is not None:
        names = [str(c) for c in class_names]
        index = {n: k for k, n in enumerate(names)}
        ids = []
        for i, v in enumerate(raw):
            k = index.get(v, _int_label(v))
            if k is None or not 0 <= k < len(names):
                raise DataFormatError(
                    f"{where(i)}: label {v!r} is not one of the declared classes {names[:10]} (nor a class id "
                    f"0..{len(names) - 1}); fix the row, or declare the class in data.class_names / data.label_map")
            ids.append(k)
        return ids, names
    empty = [i for i, v in enumerate(raw) if not v]
    if empty:
        raise DataFormatError(f"{where(empty[0])}: empty label ({len(empty)} rows have none); give every bag a label")
    ints = [_int_label(v) for v in raw]
    if all(k is None for k in ints):
        names = sorted(set(raw))
        return [names.index(v) for v in raw], names
    if any(k is None for k in ints):
        a = next(i for i, k in enumerate(ints) if k is not None)
        b = next(i for i, k in enumerate(ints) if k is None)
        raise DataFormatError(
            f"labels mix class ids and names: {where(a)} has {raw[a]!r}, {where(b)} has {raw[b]!r}; use one "
            "kind, or declare the classes (data.class_names, data.label_map or data.num_classes)")
    if min(ints) < 0:
        i = ints.index(min(ints))
        raise DataFormatError(f"{where(i)}: negative label {raw[i]!r}; class ids are 0..C-1")
    return ints, [str(i) for i in range(max(ints) + 1)]


def read_bag_features(path: Path, bag_id: str, in_dim: int | None = None, in_dim_source: str = "other bags") -> torch.Tensor:
    """One bag file -> float ``[N, D]``: a ``.pt`` tensor (``weights_only``) or an ``.h5`` ``features``
    dataset; an unreadable, empty or misshapen file is a :class:`DataFormatError` naming it."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            x = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(x, torch.Tensor):
                raise DataFormatError(f"{path} holds a {type(x).__name__}; expected a tensor N x D")
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise DataFormatError(f"{path} has no 'features' dataset (has {list(f)})")
                x = torch.from_numpy(f["features"][()])
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        if isinstance(e, DataFormatError):
            raise
        # truncated h5 / pt, or a pickle that wants to run code: name the file, not torch's internals
        raise DataFormatError(f"bag {bag_id!r}: cannot read {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); is it truncated or corrupt?") from None
    if x.numel() == 0:
        raise DataFormatError(f"bag {bag_id!r} is empty (0 instances in {path})")
    if x.ndim == 3 and x.shape[0] == 1:  # some pipelines save [1, N, D]
        x = x[0]
    if x.ndim != 2:
        raise DataFormatError(f"{path}: features of shape {tuple(x.shape)}; expected N x D")
    check_bag_features(x, bag_id, str(path), in_dim, in_dim_source)
    return x.float()


def check_bag_features(x: torch.Tensor, bag_id: str, where: str, in_dim: int | None = None,
                       in_dim_source: str = "other bags") -> None:
    """The feature size the net takes (``in_dim``, set by ``in_dim_source``) and finite values, or an error
    naming the bag."""
    if in_dim is not None and x.shape[1] != in_dim:
        raise DataFormatError(f"bag {bag_id!r} ({where}) has feature size {x.shape[1]}, but the "
                              f"{in_dim_source} have {in_dim}; was it extracted with another backbone?")
    bad = ~torch.isfinite(x.float()).all(1)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0].tolist()
        raise DataFormatError(f"bag {bag_id!r} ({where}) has non-finite (NaN/inf) features in "
                              f"{len(rows)} of its {len(x)} instances (rows {rows[:5]}{' ...' if len(rows) > 5 else ''}); "
                              "re-extract it or remove it from the labels CSV")


def read_bag_coords(path: Path) -> torch.Tensor | None:
    """The ``coords`` (``N x 2``, tile x and y) of an ``.h5`` bag file; None when it has none."""
    import h5py

    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["coords"][()]) if "coords" in f else None


class FeatureBagDataset(Dataset):
    """Pre-extracted instance features per bag; items are ``(float [N, D], label)``.

    Features come from ``pt_files/<bag>.pt`` when present, else ``h5_files/<bag>.h5``;
    ``coords(i)`` reads the h5 ``coords`` (for heatmaps) without touching the batch contract.
    """

    def __init__(self, root: Path, bag_ids: list[str], labels: list[int], in_dim: int | None = None):
        self.root = Path(root)
        self.bag_ids, self.labels = list(bag_ids), list(labels)
        self.in_dim = in_dim
        self.in_dim_source = "other bags"  # who set in_dim, for the error when a bag differs
        pt, h5 = self.root / "pt_files", self.root / "h5_files"
        self.files: list[Path] = []
        for b in self.bag_ids:
            found = [p for p in (pt / f"{b}.pt", h5 / f"{b}.h5") if p.is_file()]
            if not found:
                raise DataFormatError(
                    f"bag {b!r} from the labels CSV is missing: neither {pt / (b + '.pt')} "
                    f"nor {h5 / (b + '.h5')} exists (folder {self.root})"
                )
            self.files.append(found[0])

    def __len__(self) -> int:
        return len(self.bag_ids)

    def features(self, i: int) -> torch.Tensor:
        return read_bag_features(self.files[i], self.bag_ids[i], self.in_dim, self.in_dim_source)


    def item_names(self, indices) -> list[str]:
        return [f"bag {self.bag_ids[i]!r} ({self.files[i]})" for i in indices]

    def feature_dim(self, i: int) -> int:
        """Bag ``i``'s feature size D, read without loading its features where the format allows."""
        path = self.files[i]
        try:
            if path.suffix == ".pt":
                x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:
                import h5py

                with h5py.File(path, "r") as f:
                    x = f["features"]
                    return int(x.shape[-1]) if x.ndim >= 2 else self.features(i).shape[1]
        except Exception:  # noqa: BLE001 - unreadable or odd: features() raises the error that names it
            return self.features(i).shape[1]
        return int(x.shape[-1]) if isinstance(x, torch.Tensor) and x.ndim >= 2 else self.features(i).shape[1]

    def coords(self, i: int) -> torch.Tensor | None:
        path = self.root / "h5_files" / f"{self.bag_ids[i]}.h5"
        return read_bag_coords(path) if path.is_file() else None

    def __getitem__(self, i: int):
        return self.features(i), self.labels[i]


def read_h5_groups(path: Path) -> tuple[list[str], list[str]]:
    """ACMIL's single HDF5 file: slide names (its groups) and their ``label`` attributes."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ids = list(f.keys())
            missing = [k for k in ids if "label" not in f[k].attrs or "feat" not in f[k]]
            labels = [str(int(f[k].attrs["label"])) for k in ids if k not in missing]
    except OSError as err:
        raise DataFormatError(f"cannot read {path} ({err}): truncated or not an HDF5 file; re-create it") from err
    if missing:
        raise DataFormatError(f"{path}: groups {missing[:3]} lack a 'feat' dataset or a 'label' attribute "
                              "(ACMIL layout: <slide>/feat, <slide>/coords, attrs['label'])")
    if not ids:
        raise DataFormatError(f"{path} has no slide groups")
    return ids, labels


class H5GroupBagDataset(FeatureBagDataset):
    """Bags from ACMIL's single HDF5 file (``<slide>/feat``, ``<slide>/coords``); items ``(float [N, D], label)``."""

    def __init__(self, path: Path, bag_ids: list[str], labels: list[int], in_dim: int | None = None):
        self.path, self.root = Path(path), Path(path).parent
        self.bag_ids, self.labels, self.in_dim = list(bag_ids), list(labels), in_dim
        self.in_dim_source = "other bags"
        self.files = [self.path] * len(self.bag_ids)

    def _read(self, i: int, key: str):
        import h5py

        with h5py.File(self.path, "r") as f:  # opened per read: safe across DataLoader workers
            group = f[self.bag_ids[i]]
            return group[key][()] if key in group else None

    def feature_dim(self, i: int) -> int:
        import h5py

        with h5py.File(self.path, "r") as f:
            shape = f[self.bag_ids[i]]["feat"].shape
        return int(shape[-1]) if len(shape) == 2 else self.features(i).shape[1]

    def features(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self._read(i, "feat"))
        if x.ndim != 2 or x.shape[0] == 0:
            raise DataFormatError(f"{self.path}:{self.bag_ids[i]}/feat has shape {tuple(x.shape)}; expected N x D, N > 0")
        check_bag_features(x, self.bag_ids[i], f"{self.path}:{self.bag_ids[i]}", self.in_dim, self.in_dim_source)
        return x.float()

    def coords(self, i: int) -> torch.Tensor | None:
        c = self._read(i, "coords")
        return None if c is None or np.ndim(c) != 2 else torch.from_numpy(c)
