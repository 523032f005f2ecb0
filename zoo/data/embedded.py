"""Datasets that need no download: scikit-learn's digits, drawn shapes, bags of digits.

They let every model train and every test run offline, on CPU, in seconds.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

DIGIT_CLASSES = [str(d) for d in range(10)]
SHAPE_CLASSES = ["background", "circle", "square", "triangle"]
BAG_CLASSES = ["negative", "positive"]


@functools.lru_cache(maxsize=1)
def _digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def load_digits_tensor(size: int, in_chans: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``float [N, in_chans, size, size]`` in [0, 1] + labels ``long [N]``.

    Resized once here (bilinear) so that per-item work is only augmentation.
    """
    images, labels = _digit_arrays()
    x = torch.tensor(images).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0, 1).repeat(1, in_chans, 1, 1).contiguous(), torch.tensor(labels)


# --------------------------------------------------------------------------- shapes
def make_shapes(
    n: int, *, size: int = 64, seed: int = 0, max_shapes: int = 4, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes: ``uint8 [n, 3, size, size]`` images and ``uint8 [n, size, size]`` masks
    (0 background, 1 circle, 2 square, 3 triangle; later shapes cover earlier ones).

    Every random number is drawn up front or from a per-chunk generator, so the result
    depends only on (n, size, seed, max_shapes).
    """
    rng = np.random.default_rng(seed)
    m = max_shapes
    count = rng.integers(1, m + 1, n)
    active = np.arange(m)[None] < count[:, None]
    kind = rng.integers(1, 4, (n, m))
    cx, cy = rng.uniform(0.15, 0.85, (2, n, m)) * size
    radius = rng.uniform(0.08, 0.2, (n, m)) * size
    angle = rng.uniform(0, 2 * math.pi, (n, m))
    bg = rng.uniform(0.15, 0.85, (n, 3))
    # a colour at least 0.3 away from the background in every channel keeps shapes visible
    colour = (bg[:, None] + rng.uniform(0.3, 0.7, (n, m, 3))) % 1.0
    wave_f = rng.uniform(1, 6, (n, 2)) * 2 * math.pi / size
    wave_dir = rng.uniform(0, math.pi, (n, 2))
    wave_phase = rng.uniform(0, 2 * math.pi, (n, 2))
    wave_amp = rng.uniform(0.03, 0.1, (n, 2))

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((n, 3, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    tri = np.deg2rad([90.0, 210.0, 330.0])  # counter-clockwise vertices of an upright triangle
    for start in range(0, n, chunk):
        s = slice(start, min(start + chunk, n))
        c = s.stop - s.start
        # textured background: two oriented sinusoids
        proj = (np.cos(wave_dir[s])[..., None, None] * xx + np.sin(wave_dir[s])[..., None, None] * yy)
        texture = (wave_amp[s][..., None, None] * np.sin(wave_f[s][..., None, None] * proj
                                                          + wave_phase[s][..., None, None])).sum(1)
        img = bg[s][:, :, None, None] + texture[:, None]
        mask = masks[s]
        for j in range(m):
            dx = xx[None] - cx[s, j, None, None]
            dy = yy[None] - cy[s, j, None, None]
            r = radius[s, j, None, None]
            cos, sin = np.cos(angle[s, j])[:, None, None], np.sin(angle[s, j])[:, None, None]
            u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # shape-aligned coordinates
            circle = dx**2 + dy**2 <= r**2
            square = (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
            triangle = np.ones_like(circle)
            for a0, a1 in zip(tri, np.roll(tri, -1)):
                p0 = 1.25 * r * np.cos(a0), 1.25 * r * np.sin(a0)
                p1 = 1.25 * r * np.cos(a1), 1.25 * r * np.sin(a1)
                cross = (p1[0] - p0[0]) * (v - p0[1]) - (p1[1] - p0[1]) * (u - p0[0])
                triangle &= cross >= 0
            k = kind[s, j, None, None]
            inside = np.where(k == 1, circle, np.where(k == 2, square, triangle))
            inside &= active[s, j, None, None]
            img = np.where(inside[:, None], colour[s, j][:, :, None, None], img)
            mask[inside] = np.broadcast_to(k, inside.shape)[inside]
        noise = np.random.default_rng([seed, start]).normal(0, 0.04, (c, 3, size, size))
        images[s] = np.clip((img + noise) * 255 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(masks)


class ShapesDataset(Dataset):
    """Generated scenes; ``indices`` are scene numbers (disjoint between splits)."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, indices, transform=None):
        self.images, self.masks = images, masks
        self.indices = np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img, mask = tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i])
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


# --------------------------------------------------------------------------- digit bags
def make_digit_bags(
    digit_labels: np.ndarray,
    pool: np.ndarray,
    *,
    num_bags: int,
    target: int,
    mean_len: float,
    std_len: float,
    max_len: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[int]]:
    """The MNIST-bags protocol (Ilse et al. 2018, ``mnist_bags_loader.py``) on a digit pool.

    Bags alternate positive/negative. A positive bag is drawn at random (with replacement)
    until one holds the target, a fresh length each try; a negative bag is filled with
    non-target digits only. Returns bags as arrays of global digit indices, and bag labels.
    """
    pool = np.asarray(pool)
    is_target = digit_labels[pool] == target
    if not is_target.any() or is_target.all():
        raise ValueError(f"digit pool must hold both target ({target}) and other digits")
    negatives = pool[~is_target]

    def length() -> int:
        return int(np.clip(np.floor(rng.normal(mean_len, std_len)), 1, max_len))

    bags, labels = [], []
    for b in range(num_bags):
        if b % 2 == 0:
            for _ in range(10_000):
                idx = rng.choice(pool, length())
                if (digit_labels[idx] == target).any():
                    break
            else:  # only reachable with tiny bags and rare targets; keep it bounded
                idx[rng.integers(len(idx))] = rng.choice(pool[is_target])
            labels.append(1)
        else:
            idx = rng.choice(negatives, length())
            labels.append(0)
        bags.append(idx)
    return bags, labels


class DigitBagsDataset(Dataset):
    """Image bags ``float [N, C, H, W]`` + bag label. ``bag_indices[i]`` are the global digit
    indices of bag ``i`` and ``instance_labels[i]`` their digits, for checks and heatmaps."""

    def __init__(self, images: torch.Tensor, digit_labels: np.ndarray, bags, labels, target: int):
        self.images = images
        self.bag_indices = [np.asarray(b) for b in bags]
        self.instance_labels = [torch.as_tensor(digit_labels[b]) for b in self.bag_indices]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.target = target

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[torch.as_tensor(self.bag_indices[i])], self.labels[i]
