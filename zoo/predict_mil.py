"""``zoo predict`` for MIL checkpoints: bag files and tile folders -> ``bag_scores.csv`` (+ attention maps).

A bag is a feature file (``.pt`` tensor or ``.h5`` ``features``, read as the featurebags dataset reads
them) or a folder of tile images. Tiles are the bag for nets with an instance encoder (image bags);
for feature nets they first go through the backbone that extracted the training features (the
checkpoint's ``data_info.features``, from ``zoo extract-features``' ``features.json``) or ``--backbone``.
With ``maps``: ``maps/<bag>.csv`` (attention per instance, per branch) and ``maps/<bag>.png`` (a heatmap
on the tile grid where tile coordinates are known, else a bar plot in instance order).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .contract import capabilities
from .errors import ZooError
from .predict import MAIN_CSV, Item, Outputs, as_list, collect_inputs, fmt, image_files, progress, why

BAG_SUFFIXES = (".pt", ".h5")


def bag_inputs(folder: Path) -> list[Path]:
    """Bag files under ``folder``, and every folder (itself included) that directly holds tile images."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in BAG_SUFFIXES)
    return files + sorted({p.parent for p in image_files(folder)})


class BagInputs(Dataset):
    """Items -> ``(index, bag or None, error or None, tile coords or None, instance names)``; a feature
    bag is ``[N, D]``, a tile folder ``[N, C, H, W]`` (``tile_tf`` applied)."""

    def __init__(self, items: list[Item], in_dim: int | None, tile_tf, in_chans: int):
        self.items, self.in_dim, self.tile_tf, self.in_chans = items, in_dim, tile_tf, in_chans

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from .data.bags import read_bag_coords, read_bag_features
        from .data.folders import open_image
        from .features import IMAGE_EXTS, tile_coords

        path = self.items[i].path
        try:
            if path.is_dir():
                tiles = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
                if not tiles:
                    raise ValueError(f"no tile images directly in {path}")
                x = torch.stack([self.tile_tf(open_image(t, self.in_chans)) for t in tiles])
                return i, x, None, tile_coords(tiles), [t.name for t in tiles]
            if self.in_dim is None:
                raise ValueError("this net takes image bags (tile folders), not feature files")
            x = read_bag_features(path, self.items[i].name, self.in_dim)
            coords = read_bag_coords(path) if path.suffix.lower() == ".h5" else None
            return i, x, None, coords, [str(k) for k in range(len(x))]
        except (OSError, SyntaxError, ValueError) as e:  # DataFormatError is a ValueError
            return i, None, why(e), None, None


def _extractor(info: dict, backbone: str | None, backbone_file: str | None):
    """(net, transform) that turns tiles into the checkpoint's instance features."""
    from .features import build_backbone, tile_transform

    recorded = info.get("features") or {}
    if backbone:
        net, mean, std, size = build_backbone(backbone, pretrained=not backbone_file, pretrained_file=backbone_file)
    elif recorded.get("model"):
        net, mean, std, size = build_backbone(recorded["model"], bool(recorded.get("pretrained")),
                                              recorded.get("pretrained_file"))
        size = recorded.get("img_size") or size
    else:
        raise ZooError("tile folders need the feature extractor the training features came from, and this "
                       "checkpoint does not record one; pass --backbone NAME (and --backbone-file FILE for local "
                       "weights), the model you gave `zoo extract-features`")
    return net.eval(), tile_transform(size, mean, std), (backbone or recorded["model"])


@torch.no_grad()
def predict_bags(inputs, *, task, run, outputs: Outputs, device, batch_size: int, num_workers: int, maps: bool,
                 backbone: str | None, backbone_file: str | None, show_progress: bool) -> dict[str, Any]:
    from .data.bags import collate_bags

    net, hp = task.net, task.hparams
    if maps and not capabilities(net).attention_weights:
        raise ZooError(f"{hp.model['name']} declares no attention_weights; --maps needs a net that does")
    model = hp.model if isinstance(hp.model, dict) else {}
    in_dim = (model.get("kwargs") or {}).get("in_dim")
    items = collect_inputs(inputs, bag_inputs)
    extractor, tile_tf, chans, name = None, None, run.in_chans or 3, ""
    if any(it.path.is_dir() for it in items):
        if in_dim is None:  # image bags: tiles preprocessed as the net's instances
            from .features import tile_transform

            tile_tf = tile_transform(run.img_size, run.mean, run.std)
        else:
            extractor, tile_tf, name = _extractor(hp.get("data_info") or {}, backbone, backbone_file)
            extractor, chans = extractor.to(device), 3
    loader = DataLoader(BagInputs(items, in_dim, tile_tf, chans), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=as_list)
    names = list(task.class_names)
    rows, errors, written = [], [], []
    with progress() as bar:
        job = bar.add_task(f"predict ({hp.model['name']})", total=len(items), visible=show_progress)
        for batch in loader:
            errors += [(str(items[b[0]].path), b[2]) for b in batch if b[1] is None]
            good = [b for b in batch if b[1] is not None]
            if good:
                bags = [_features(b[1], extractor, in_dim, batch_size, device, name) if extractor is not None
                        and items[b[0]].path.is_dir() else b[1] for b in good]
                x, mask, _ = collate_bags([(bag, 0) for bag in bags])
                x, mask = x.to(device), mask.to(device)
                prob = task.eval_forward(x, mask=mask).float().softmax(-1).cpu()
                for b, p in zip(good, prob):
                    rows.append([str(items[b[0]].path), names[int(p.argmax())], *map(fmt, p.tolist())])
                if maps:
                    weights = net.attention_weights(x, mask).float().cpu()
                    for b, w, m in zip(good, weights, mask.cpu()):
                        written += save_bag_map(outputs, items[b[0]], w[:, m], b[3], b[4])
            bar.advance(job, len(batch))
    files = [outputs.csv(MAIN_CSV["mil"], ["path", "label", *[f"prob_{c}" for c in names]], rows), *written]
    files.append(outputs.csv("errors.csv", ["path", "error"], errors))
    return {"predicted": len(rows), "errors": errors, "files": files}


def _features(tiles: torch.Tensor, net, in_dim: int, batch_size: int, device, name: str) -> torch.Tensor:
    feats = torch.cat([net(c.to(device)).float().cpu() for c in tiles.split(batch_size)])
    if feats.shape[1] != in_dim:
        raise ZooError(f"backbone {name} gives {feats.shape[1]}-d features but the checkpoint's net takes "
                       f"in_dim={in_dim}; pass the --backbone its training features came from")
    return feats


def save_bag_map(outputs: Outputs, item: Item, weights: torch.Tensor, coords, instances) -> list[Path]:
    """``weights [K, N]`` -> ``maps/<bag>.csv`` (instance, x, y, mean attention, one column per branch)
    and ``maps/<bag>.png``."""
    mean = weights.mean(0)
    k = weights.shape[0]
    xy = coords.tolist() if coords is not None else None
    branches = range(k) if k > 1 else []  # one branch: its column is the mean
    header = ["instance", *(["x", "y"] if xy else []), "attention", *[f"attention_{j}" for j in branches]]
    rows = [[inst, *(xy[n] if xy else []), fmt(mean[n]), *[fmt(weights[j, n]) for j in branches]]
            for n, inst in enumerate(instances)]
    table = outputs.csv(str(Path("maps") / f"{item.name}.csv"), header, rows)
    png = outputs.file("maps", f"{item.name}.png")
    _draw(mean.numpy(), coords, item.path.name, png)
    return [table, png]


def _draw(attn: np.ndarray, coords, title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    from .layers import tile_grid
    from .weights import atomic_write

    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.subplots()
    if coords is not None:  # a heatmap on the slide's tile grid (empty grid cells stay blank)
        rows, cols, (h, w) = tile_grid(torch.as_tensor(coords)[None])
        grid = np.full((h, w), np.nan)
        grid[rows.numpy(), cols.numpy()] = attn
        fig.colorbar(ax.imshow(grid, cmap="jet", interpolation="nearest"), ax=ax, label="attention")
        ax.axis("off")
    else:
        ax.bar(np.arange(len(attn)), attn)
        ax.set_xlabel("instance (bag order)")
        ax.set_ylabel("attention")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), what="the attention map")
