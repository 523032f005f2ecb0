"""Multiple-instance learning datamodule: batches ``(bags, mask, label)``.

``bags`` is ``float [B, Nmax, D]`` (feature bags) or ``float [B, Nmax, C, H, W]`` (image bags),
zero padded; ``mask`` is ``bool [B, Nmax]``, True for real instances; ``label`` ``long [B]``.
"""
from __future__ import annotations

import collections

from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.errors import DatasetNotFoundError, DataFormatError

from .bags import (
    FEATUREBAGS_LAYOUT,
    FeatureBagDataset,
    H5GroupBagDataset,
    collate_bags,
    encode_labels,
    read_bag_table,
    read_h5_groups,
)
from .common import DIGITS_MEAN, DIGITS_STD, ZooDataModule, require_dir, split_indices
from .embedded import BAG_CLASSES, DigitBagsDataset, _digit_arrays, load_digits_tensor, make_digit_bags


class MILDataModule(ZooDataModule):
    """``dataset``: ``digit_bags`` (embedded MNIST-bags protocol on scikit-learn digits) or
    ``featurebags``: CLAM's ``root/pt_files/<bag>.pt`` or ``root/h5_files/<bag>.h5`` + a ``labels`` CSV, or
    ACMIL's single HDF5 file (``h5_file``: a group per slide, labels in its attributes).

    Splits, first that applies: ``split_file`` (ACMIL/CLAM JSON ``{"train_names", "val_names",
    "test_names"}``, e.g. CAMELYON16 ``split_1.json``); the CSV's ``split`` / ``split_info`` column;
    for ``h5_file`` without either, ACMIL's rule (slides named ``*test*`` are the test set); otherwise
    seeded stratified splits (``val_fraction``, ``test_fraction``).
    """

    task = "mil"
    DATASETS = {
        "digit_bags": dict(img_size=28, mean=DIGITS_MEAN, std=DIGITS_STD, in_chans=1),
        "featurebags": dict(),
    }
    collate_fn = staticmethod(collate_bags)

    def __init__(
        self,
        *,
        dataset: str = "digit_bags",
        batch_size: int = 1,
        labels: str | None = None,
        label_map: dict | None = None,
        class_names: list | None = None,
        num_classes: int | None = None,
        target_digit: int = 9,
        mean_bag_length: float = 10,
        std_bag_length: float = 2,
        max_bag_length: int = 100,
        num_train: int = 400,
        num_val: int = 100,
        num_test: int = 200,
        h5_file: str | None = None,
        split_file: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(dataset=dataset, batch_size=batch_size, **common)
        # kept out of the saved hyper-parameters: Lightning refuses a datamodule num_classes that differs from
        # the task's (None when undeclared), and the task stores the real count
        self.declared_num_classes = self.hparams.pop("num_classes")
        self._hparams_initial.pop("num_classes", None)  # what Lightning logs and compares
        self._check_dataset()
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise DataFormatError(f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}")
        if num_classes is not None and num_classes < 1:
            raise DataFormatError(f"data.num_classes={num_classes}; a class count is >= 1")
        if not 0 <= target_digit <= 9:
            raise ValueError(f"target_digit must be a digit 0..9, got {target_digit}")
        self._in_dim: int | None = None
        self._in_dim_source = "other bags"
        self._table = None

    # ------------------------------------------------------------------ featurebags table
    @property
    def root(self) -> Path:
        if self.hparams.root is None:
            raise DatasetNotFoundError(f"dataset=featurebags needs data.root\nExpected layout:\n{FEATUREBAGS_LAYOUT}")
        return Path(self.hparams.root).expanduser()

    @property
    def labels_csv(self) -> Path:
        given = self.hparams.labels
        if given is None:
            return self.root / "labels.csv"
        path = Path(given).expanduser()
        return path if path.is_absolute() or path.exists() else self.root / path

    def _path(self, given: str) -> Path:
        path = Path(given).expanduser()
        return path if path.is_absolute() or path.exists() else self.root / path

    def _read_table(self):
        if self._table is None:
            hp = self.hparams
            require_dir(self.root, "featurebags", FEATUREBAGS_LAYOUT)
            splits = None
            if hp.h5_file:  # ACMIL: labels from the file; a CSV (e.g. bracs.csv) only for its split column
                h5 = self._path(hp.h5_file)
                if not h5.is_file():
                    raise DatasetNotFoundError(f"featurebags: data.h5_file not found: {h5}\nExpected layout:\n"
                                               f"{FEATUREBAGS_LAYOUT}")
                ids, raw = read_h5_groups(h5)
                where = lambda i: f"{h5} group {ids[i]!r}"  # noqa: E731
                if self.labels_csv.is_file():
                    csv_ids, _, csv_splits = read_bag_table(self.labels_csv)
                    if csv_splits is not None:
                        where_split = dict(zip(csv_ids, csv_splits))
                        missing = [b for b in ids if b not in where_split]
                        if missing:
                            raise DataFormatError(f"{self.labels_csv} gives no split for slides {missing[:3]} of {h5}")
                        splits = [where_split[b] for b in ids]
                if splits is None and any("test" in b for b in ids):
                    splits = ["test" if "test" in b else "train" for b in ids]  # ACMIL's CAMELYON16 rule
            else:
                if not self.labels_csv.is_file():
                    raise DatasetNotFoundError(
                        f"featurebags: labels CSV not found: {self.labels_csv}\nExpected layout:\n{FEATUREBAGS_LAYOUT}"
                    )
                ids, raw, splits, lines = read_bag_table(self.labels_csv, with_lines=True)
                where = lambda i: f"{self.labels_csv} line {lines[i]} (bag {ids[i]!r})"  # noqa: E731
            if hp.split_file:
                splits = self._splits_from_json(ids)
            y, names = encode_labels(*self._mapped(raw, where), where=where)
            self._table = (ids, y, splits, names)
        return self._table

    def _mapped(self, raw: list[str], where) -> tuple[list[str], list[str] | None]:
        """Labels through ``data.label_map``, and the declared classes: ``data.class_names``, else
        ids ``0..num_classes-1``, else the label map's targets; None: inferred from the labels."""
        hp = self.hparams
        declared = None
        if hp.label_map:  # e.g. BRACS' 7 subtypes -> 3 classes
            lm = {str(k): str(v) for k, v in hp.label_map.items()}
            unknown = [i for i, v in enumerate(raw) if v not in lm]
            if unknown:
                i = unknown[0]
                raise DataFormatError(f"{where(i)}: label {raw[i]!r} is not in data.label_map (keys {sorted(lm)[:10]}; "
                                      f"{len(unknown)} rows); add it to the map or fix the row")
            raw = [lm[v] for v in raw]
            targets = sorted(set(lm.values()))
            try:
                declared = [str(i) for i in range(max(int(v) for v in targets) + 1)]
            except ValueError:
                declared = targets
        if self.declared_num_classes is not None:
            declared = [str(i) for i in range(self.declared_num_classes)]
        if hp.class_names:
            declared = [str(c) for c in hp.class_names]
        return raw, declared

    def _splits_from_json(self, ids: list[str]) -> list[str]:
        """ACMIL / CLAM split file: ``{"train_names": [...], "val_names": [...], "test_names": [...]}``."""
        import json

        path = self._path(self.hparams.split_file)
        if not path.is_file():
            raise DatasetNotFoundError(f"data.split_file not found: {path}")
        try:
            data = json.loads(path.read_text())
            where = {b: s for s in ("train", "val", "test") for b in data[f"{s}_names"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataFormatError(f"{path}: expected JSON with train_names, val_names, test_names ({err})") from err
        unknown = sorted(set(where) - set(ids))
        if unknown:
            raise DataFormatError(f"{path} names bags that do not exist: {unknown[:3]}")
        # bags the file does not list take part in no split (ACMIL drops them too)
        return [where.get(b, "unused") for b in ids]

    def _load_classes(self) -> list[str]:
        if self.hparams.dataset == "digit_bags":
            return list(BAG_CLASSES)
        return self._read_table()[3]

    @property
    def features_manifest(self) -> dict | None:
        """``features.json`` of ``zoo extract-features`` in the bags folder (which backbone made the features)."""
        import json

        path = self.root / "features.json" if self.hparams.dataset == "featurebags" else None
        try:
            return json.loads(path.read_text()) if path is not None and path.is_file() else None
        except (OSError, ValueError):
            return None

    @property
    def in_dim(self) -> int | None:
        """Instance feature size D of feature bags (read from the first bag)."""
        if self.hparams.dataset != "featurebags":
            return None
        if self._in_dim is None:
            ids, y, *_ = self._read_table()
            # the size most of a few bags spread over the table have: a bag from another backbone is then
            # the one named as odd, even when it comes first
            picks = sorted({round(k * (len(ids) - 1) / 8) for k in range(9)})
            ds = self._dataset([ids[i] for i in picks], [y[i] for i in picks])
            dims = collections.Counter(ds.feature_dim(k) for k in range(len(picks)))
            self._in_dim, count = dims.most_common(1)[0]
            self._in_dim_source = f"{count} of {len(picks)} bags sampled across the table" if len(picks) > 1 else "first bag"
        return self._in_dim

    def model_kwargs(self) -> dict:
        if self.hparams.dataset == "featurebags":
            return {"in_dim": self.in_dim}
        return {"in_chans": self.in_chans}

    # ------------------------------------------------------------------ datasets
    def _build(self) -> None:
        if self.hparams.dataset == "digit_bags":
            self._build_digit_bags()
        else:
            self._build_featurebags()

    def _build_digit_bags(self) -> None:
        hp = self.hparams
        _, digits = _digit_arrays()
        # disjoint instance pools first, so no digit image is seen in two splits
        pools = split_indices(
            len(digits), digits, need_val=True, need_test=True,
            val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed,
        )
        x, _ = load_digits_tensor(self.img_size, self.in_chans)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std  # normalised once: bags index into this tensor
        sets = []
        for k, (pool, n) in enumerate(zip(pools, (hp.num_train, hp.num_val, hp.num_test))):
            bags, labels = make_digit_bags(
                digits, pool, num_bags=n, target=hp.target_digit, mean_len=hp.mean_bag_length,
                std_len=hp.std_bag_length, max_len=hp.max_bag_length,
                rng=np.random.default_rng([hp.seed, k]),
            )
            sets.append(DigitBagsDataset(x, digits, bags, labels, hp.target_digit))
        self.train_set, self.val_set, self.test_set = sets

    def _dataset(self, ids: list[str], y: list[int]) -> FeatureBagDataset:
        if self.hparams.h5_file:
            return H5GroupBagDataset(self._path(self.hparams.h5_file), ids, y)
        return FeatureBagDataset(self.root, ids, y)

    def _build_featurebags(self) -> None:
        hp = self.hparams
        ids, y, splits, names = self._read_table()
        y_arr = np.asarray(y)
        if splits is None:
            given = {s: np.arange(0) for s in ("val", "test")}
            pool = np.arange(len(ids))
        else:
            where = {s: np.flatnonzero(np.asarray(splits) == s) for s in ("train", "val", "test")}
            given, pool = {s: where[s] for s in ("val", "test")}, where["train"]
        tr, va, te = split_indices(
            len(pool), y_arr[pool], need_val=len(given["val"]) == 0, need_test=len(given["test"]) == 0,
            val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed,
        )
        parts = {
            "train": pool[tr],
            "val": given["val"] if len(given["val"]) else pool[va],
            "test": given["test"] if len(given["test"]) else pool[te],
        }
        made = {s: self._dataset([ids[i] for i in idx], [y[i] for i in idx]) for s, idx in parts.items()}
        for ds in made.values():
            ds.in_dim, ds.in_dim_source = self.in_dim, self._in_dim_source
        self.train_set, self.val_set, self.test_set = made["train"], made["val"], made["test"]
