"""A tiny Re-ID datamodule for the task tests: the batch contract of ``zoo.data.reid.ReIDDataModule``
(train ``(images, pids 0..N-1, camids)`` from P x K batches; one val/test loader over query then gallery,
``(images, pids, camids, is_query)``; ``split_sizes(stage)``), on synthetic identities.

Each identity is a fixed random 4 x 2 colour layout (upsampled to the image size) seen by a camera with its
own brightness offset, plus pixel noise: separable, but not trivially at the start of training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo.data.common import ZooDataModule


class _Items(Dataset):
    def __init__(self, images, pids, camids, is_query=None):
        self.images, self.pids, self.camids, self.is_query = images, pids, camids, is_query

    def __len__(self):
        return len(self.pids)

    def __getitem__(self, i):
        out = (self.images[i], self.pids[i], self.camids[i])
        return out if self.is_query is None else (*out, self.is_query[i])


class PKSampler(Sampler[list[int]]):
    """P identities x K images per batch (with replacement inside an identity that has fewer than K)."""

    def __init__(self, pids: torch.Tensor, p: int, k: int, seed: int = 0):
        self.by_id = [torch.nonzero(pids == i).flatten() for i in pids.unique()]
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.by_id) // self.p

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        ids = torch.randperm(len(self.by_id), generator=g)
        for b in range(len(self)):
            batch = []
            for i in ids[b * self.p:(b + 1) * self.p].tolist():
                pool = self.by_id[i]
                batch += pool[torch.randint(len(pool), (self.k,), generator=g)].tolist()
            yield batch


class FixtureReID(ZooDataModule):
    task = "reid"
    DATASETS = {"fixture_reid": {"img_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}}

    def __init__(self, *, train_ids: int = 8, test_ids: int = 6, per_cam: int = 3, cams: int = 2,
                 img_hw: tuple[int, int] = (32, 16), num_instances: int = 4, noise: float = 0.3, **common):
        common.setdefault("dataset", "fixture_reid")
        common.setdefault("batch_size", 16)
        super().__init__(**common)
        self._hw = tuple(img_hw)

    @property
    def img_hw(self):
        return self._hw

    def _load_classes(self):
        return [f"id{i:03d}" for i in range(self.hparams.train_ids)]

    def _make(self, ids: range, g: torch.Generator):
        hp = self.hparams
        H, W = self._hw
        looks = torch.rand(len(ids), 3, 4, 2, generator=g)
        imgs, pids, cams = [], [], []
        for j, pid in enumerate(ids):
            for c in range(hp.cams):
                for _ in range(hp.per_cam):
                    x = F.interpolate(looks[j][None], size=(H, W), mode="nearest")[0]
                    x = x + 0.15 * c + hp.noise * torch.randn(3, H, W, generator=g)
                    imgs.append((x - 0.5) / 0.5)
                    pids.append(pid)
                    cams.append(c)
        return torch.stack(imgs), torch.tensor(pids), torch.tensor(cams)

    def _build(self):
        g = torch.Generator().manual_seed(int(self.hparams.seed))
        n = self.hparams.train_ids
        self.train_set = _Items(*self._make(range(n), g))
        x, p, c = self._make(range(1000, 1000 + self.hparams.test_ids), g)
        first = torch.zeros(len(p), dtype=torch.bool)  # one query per identity and camera: its first image
        first[:: self.hparams.per_cam] = True
        order = torch.cat([torch.nonzero(first).flatten(), torch.nonzero(~first).flatten()])
        self.eval_set = _Items(x[order], p[order], c[order], first[order])
        self.val_set = self.test_set = self.eval_set

    def split_sizes(self, stage: str) -> dict[str, int]:
        self.setup(stage)
        q = int(self.eval_set.is_query.sum())
        return {"query": q, "gallery": len(self.eval_set) - q}

    def train_dataloader(self):
        self.setup("fit")
        k = self.hparams.num_instances
        sampler = PKSampler(self.train_set.pids, self.hparams.batch_size // k, k, int(self.hparams.seed))
        return DataLoader(self.train_set, batch_sampler=sampler)

    def val_dataloader(self):
        self.setup("validate")
        return DataLoader(self.eval_set, batch_size=self.hparams.batch_size)

    test_dataloader = val_dataloader
