"""Tile images -> per-bag instance features, written the way WSI pipelines (CLAM, ACMIL) write them.

``TILES_ROOT`` holds one folder of tile images per bag (split folders above them are fine). For each
bag this writes ``OUT/pt_files/<bag>.pt`` (float32 ``N x D``) and ``OUT/h5_files/<bag>.h5`` with
``features`` and, when tile names (``..._x512_y1024.png`` or ``512_1024.png``) or a ``coords.csv``
(``filename,x,y``) give them, ``coords`` (``N x 2``, x then y, in pixels). Files are written to a
temporary name and renamed, so an interrupted run never leaves a half bag; a rerun skips bags done.
``OUT/features.json`` records the backbone and tile size: a rerun with another backbone is refused
(it would mix two feature spaces in one folder) unless ``overwrite=True`` re-extracts every bag.
``OUT`` may not be ``TILES_ROOT`` or a folder inside it.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from .errors import DatasetNotFoundError, DataFormatError, ZooError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
_COORDS = re.compile(r"(?:^|[_-])x?(\d+)[_-]y?(\d+)$")


def find_bags(root: Path) -> dict[str, list[Path]]:
    """Every folder that directly holds images is a bag, named after the folder."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"tiles folder not found: {root}. Expected TILES_ROOT/[split/]<bag>/<tile>.png")
    bags: dict[str, list[Path]] = {}
    for folder in sorted({p.parent for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS}):
        if folder.name in bags:
            raise DataFormatError(f"two bag folders are named {folder.name!r} ({folder}); bag names must be unique")
        bags[folder.name] = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not bags:
        raise DatasetNotFoundError(f"no tile images under {root}. Expected TILES_ROOT/[split/]<bag>/<tile>.png")
    return bags


def tile_coords(tiles: list[Path]) -> torch.Tensor | None:
    """``coords.csv`` beside the tiles, else x/y parsed from every tile name; None if neither works."""
    table = tiles[0].parent / "coords.csv"
    if table.is_file():
        with table.open() as f:
            rows = {r["filename"]: (int(r["x"]), int(r["y"])) for r in csv.DictReader(f)}
        missing = [t.name for t in tiles if t.name not in rows]
        if missing:
            raise DataFormatError(f"{table} has no row for {missing[:3]}")
        return torch.tensor([rows[t.name] for t in tiles])
    parsed = [_COORDS.search(t.stem) for t in tiles]
    if all(parsed):
        return torch.tensor([(int(m.group(1)), int(m.group(2))) for m in parsed])
    return None


def build_backbone(name: str, pretrained: bool = False, pretrained_file: str | None = None):
    """A zoo classification model, or a timm model (``NAME`` timm has and the zoo does not, or ``timm:NAME``),
    returning pooled features -> (net, mean, std, size)."""
    from .validate import resolve_model_name

    name = resolve_model_name(name)
    if name.startswith("timm:"):
        import timm

        overlay = {"file": pretrained_file} if pretrained_file else None
        net = timm.create_model(name[5:], pretrained=pretrained or bool(pretrained_file), num_classes=0,
                                pretrained_cfg_overlay=overlay)
        cfg = net.pretrained_cfg
        return net, cfg.get("mean"), cfg.get("std"), cfg.get("input_size", (3, 224, 224))[-1]
    from . import create_model, get_spec

    spec = get_spec(name)
    if spec.task != "classification":
        raise ZooError(f"{name} is a {spec.task} model; feature extraction needs a classification backbone")
    net = create_model(name, pretrained=pretrained, pretrained_file=pretrained_file)
    net.reset_classifier(0)  # the classification contract: pooled pre-logits features
    return net, spec.mean, spec.std, spec.input_size[-1]


def _batches(tiles: list[Path], transform, batch_size: int) -> Iterator[torch.Tensor]:
    from .data.folders import open_image  # 16-bit tiles scaled by their range, as the datasets read them

    for i in range(0, len(tiles), batch_size):
        imgs = []
        for t in tiles[i: i + batch_size]:
            try:
                imgs.append(transform(open_image(t, 3)))
            except (OSError, SyntaxError, ValueError) as e:
                raise DataFormatError(f"cannot read tile {t}: {e}") from None
        yield torch.stack(imgs)


def tile_transform(size: int, mean, std):
    """A tile (PIL image) -> the backbone's normalised ``[C, size, size]`` input."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def _save_atomic(path: Path, write) -> None:
    from .weights import atomic_write

    atomic_write(path, write, what="the features file")


@torch.no_grad()
def extract_features(
    tiles_root: str | Path,
    out_dir: str | Path,
    model: str = "timm:resnet18",
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    img_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, int]:
    """Extract features for every bag under ``tiles_root``; returns counts of bags written and skipped."""
    import h5py

    bags = find_bags(Path(tiles_root))
    out = Path(out_dir)
    root = Path(tiles_root).resolve()
    if out.resolve() == root or root in out.resolve().parents:
        raise ZooError(f"--out {out} is inside the tiles folder {tiles_root}; write the features elsewhere")
    if out.exists() and not out.is_dir():
        raise ZooError(f"--out {out} is a file; give a folder (it gets pt_files/ and h5_files/)")
    manifest = {"model": model, "img_size": img_size, "pretrained": bool(pretrained),
                "pretrained_file": str(pretrained_file) if pretrained_file else None}
    manifest_path = out / "features.json"
    if manifest_path.is_file() and not overwrite:
        try:
            before = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            before = None
        if before != manifest:
            raise ZooError(f"{out} holds features extracted with {before}, not {manifest}; pass --overwrite "
                           "(overwrite=True) to re-extract every bag, or choose another --out")
    (out / "pt_files").mkdir(parents=True, exist_ok=True)
    (out / "h5_files").mkdir(parents=True, exist_ok=True)
    _save_atomic(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    todo = {b: t for b, t in bags.items() if overwrite
            or not ((out / "pt_files" / f"{b}.pt").is_file() and (out / "h5_files" / f"{b}.h5").is_file())}
    counts = {"bags": len(bags), "written": 0, "skipped": len(bags) - len(todo)}
    if not todo:
        return counts
    net, mean, std, size = build_backbone(model, pretrained, pretrained_file)
    net = net.eval().to(device)
    size = img_size or size
    transform = tile_transform(size, mean, std)
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"features ({model})", total=len(todo))
        for bag, tiles in todo.items():
            feats = torch.cat([net(x.to(device)).float().cpu() for x in _batches(tiles, transform, batch_size)])
            coords = tile_coords(tiles)
            _save_atomic(out / "pt_files" / f"{bag}.pt", lambda p: torch.save(feats, p))

            def write_h5(p: Path) -> None:
                with h5py.File(p, "w") as f:
                    f.create_dataset("features", data=feats.numpy())
                    if coords is not None:
                        f.create_dataset("coords", data=coords.numpy())

            _save_atomic(out / "h5_files" / f"{bag}.h5", write_h5)
            counts["written"] += 1
            bar.advance(task)
    return counts

