"""``python -m zoo predict``: a trained checkpoint's predictions for image files, folders or a CSV of paths.

The net and its preprocessing are the checkpoint's: images are read as the datasets read them
(:func:`zoo.data.folders.open_image`: 16-bit scaled by range), go through the datamodule's own eval
transform and the task's ``eval_forward`` (sliding windows included), so a prediction is what
``evaluate.py`` computes for that image. Written under ``out``:

- classification: ``predictions.csv`` (path, label_1, prob_1, ..., label_k, prob_k);
- segmentation: ``masks/<relative path>.png`` (palette PNG, pixel = class id, at the image's own size:
  logits are resized bilinearly to it before the argmax) and ``class_areas.csv`` (pixel fraction per class);
- MIL (:mod:`zoo.predict_mil`): ``bag_scores.csv``, with ``maps`` the attention per instance in ``maps/``;
- always ``errors.csv`` (path, error): inputs that could not be read, left out and never replaced;
- with ``explain``, ``zoo explain``'s attention overlays in ``explain/``.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .contract import capabilities, overlay_style
from .errors import DataFormatError, ZooError

MAIN_CSV = {"classification": "predictions.csv", "segmentation": "class_areas.csv", "mil": "bag_scores.csv"}
FOLDERS = {"segmentation": ("masks",), "mil": ("maps",)}


@dataclass(frozen=True)
class Item:
    path: Path  # what is read
    name: str  # its name under the output folder (relative, posix, no suffix): masks/<name>.png


# ---------------------------------------------------------------------------------------- inputs
def _csv_paths(table: Path) -> list[str]:
    """A ``path`` column, else the first column (a header row is recognised by its ``path`` cell only)."""
    with open(table, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataFormatError(f"{table} has no rows; expected a column of paths (header 'path' optional)")
    head = [c.strip().lower() for c in rows[0]]
    col = head.index("path") if "path" in head else 0
    body = rows[1:] if "path" in head else rows
    return [r[col].strip() for r in body if len(r) > col and r[col].strip()]


def collect_inputs(inputs: Sequence[str | Path], expand: Callable[[Path], list[Path]]) -> list[Item]:
    """Files, folders (``expand`` lists what a folder holds) and CSV tables of paths (relative to the CSV)
    -> items with unique output names. A path a CSV names that does not exist is kept: reading it fails
    and it lands in ``errors.csv``; a missing path on the command line is an error."""
    found: list[tuple[Path, Path]] = []  # (path, the folder its output name is relative to)
    for given in map(Path, inputs):
        if given.is_file() and given.suffix.lower() == ".csv":
            for rel in _csv_paths(given):
                full = Path(rel).expanduser()
                full = full if full.is_absolute() else given.parent / full
                found += [(p, given.parent) for p in (expand(full) if full.is_dir() else [full])]
        elif given.is_dir():
            found += [(p, given) for p in expand(given)]
        elif given.exists():
            found.append((given, given.parent))
        else:
            raise ZooError(f"input not found: {given}")
    items, taken = [], set()
    for path, base in found:
        try:
            rel = path.relative_to(base)
        except ValueError:
            rel = Path(path.name)
        rel = Path(path.name) if rel == Path(".") else rel  # a tile folder given itself
        stem = (rel.with_suffix("") if path.suffix else rel).as_posix()
        name, n = stem, 1
        while name in taken:  # same-named inputs from different places
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        items.append(Item(path, name))
    if not items:
        raise ZooError(f"no inputs found in {', '.join(map(str, inputs))}")
    return items


def image_files(folder: Path) -> list[Path]:
    from .data.common import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def why(error: Exception) -> str:
    from .data.folders import _why

    return _why(error)


# ---------------------------------------------------------------------------------------- outputs
class Outputs:
    """The output folder: refuses to replace an earlier run's files unless ``overwrite``; CSVs atomically."""

    def __init__(self, out: str | Path, task: str, overwrite: bool = False, explain: bool = False):
        self.dir = Path(out)
        if self.dir.exists() and not self.dir.is_dir():
            raise ZooError(f"--out {self.dir} is a file; give a folder")
        names = [MAIN_CSV[task], "errors.csv", *FOLDERS.get(task, ()), *(["explain"] if explain else [])]
        there = [p for p in (self.dir / n for n in names) if p.is_file() or (p.is_dir() and any(p.iterdir()))]
        if there and not overwrite:
            raise ZooError(f"{there[0]} already exists (an earlier prediction?); pass --overwrite to replace "
                           "it, or choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)

    def csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        from .weights import atomic_write

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        path = self.dir / name
        atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()), what="the predictions file")
        return path

    def file(self, *parts: str) -> Path:
        path = self.dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def fmt(p: float) -> str:
    return f"{float(p):.9g}"


def progress():
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True))  # stdout stays for the summary line


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZooError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------- images
class ImageInputs(Dataset):
    """Items -> ``(index, eval input or None, error or None, (H, W) as read)``; an unreadable file is
    reported, never replaced (``zoo.data.folders.SkipsUnreadable``'s evaluation rule)."""

    def __init__(self, items: list[Item], transform, in_chans: int, tv_image: bool):
        self.items, self.transform, self.in_chans, self.tv_image = items, transform, in_chans, tv_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        from .data.folders import open_image

        try:
            img = open_image(self.items[i].path, self.in_chans)
        except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated, zero-byte
            return i, None, why(e), None
        size = (img.height, img.width)
        x = self.transform(tv_tensors.Image(TF.pil_to_tensor(img)) if self.tv_image else img)
        return i, x.as_subclass(torch.Tensor), None, size


def as_list(batch: list) -> list:
    return batch


def eval_transform(task: str, hp: dict, run) -> Any:
    """The datamodule's val/test transform for this checkpoint's run input (a datamodule for files, built
    from the checkpoint's ``data_info``; nothing is read from disk)."""
    info = hp.get("data_info") or {}
    if task == "classification":
        from .data.classification import ClassificationDataModule

        name = info.get("dataset") if info.get("dataset") in ClassificationDataModule.DATASETS else "imagefolder"
        dm = ClassificationDataModule(dataset=name, resize_ratio=info.get("resize_ratio"))
    else:
        from .data.segmentation import SegmentationDataModule

        dm = SegmentationDataModule(dataset="segfolder", num_classes=int(hp["num_classes"]),
                                    eval_resize=info.get("eval_resize") or "square")
    return dm.configure_input(run).eval_transform()


def palette(n: int = 256) -> list[int]:
    """PASCAL VOC's colour map (bit-interleaved class ids): class 0 black, neighbours far apart."""
    out = []
    for c in range(n):
        r = g = b = 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def save_mask(mask: np.ndarray, path: Path) -> None:
    from PIL import Image
    from .weights import atomic_write

    im = Image.fromarray(mask.astype(np.uint8))  # mode L: class ids as they are
    im.putpalette(palette())  # -> mode P, the same values with colours
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"), what="the mask")


def predict(src: str, inputs: Sequence[str | Path], out: str | Path, *, batch_size: int = 8, device: str = "cpu",
            top_k: int = 5, maps: bool = False, explain: bool = False, num_workers: int = 0,
            overwrite: bool = False, backbone: str | None = None, backbone_file: str | None = None,
            show_progress: bool = True) -> dict[str, Any]:
    """Predict ``inputs`` with the checkpoint (or Hub folder) ``src``; returns counts and the files written."""
    from .runner import load_task
    from .spec import resolve_run_input, stored_input

    task = load_task(src).eval()
    kind = task.task
    if explain and kind == "mil":
        raise ZooError("--explain draws overlays on single images; for MIL bags use --maps (attention per instance)")
    if explain and not capabilities(task.net).attention_maps:
        raise ZooError(f"{task.hparams.model['name']} defines no attention_maps(x); --explain needs a model that does")
    if maps and kind != "mil":
        raise ZooError("--maps is for MIL bags (attention per instance); for images use --explain")
    outputs = Outputs(out, kind, overwrite, explain)
    run = resolve_run_input(task.net.zoo_spec, {}, stored=stored_input(task.hparams))
    dev = resolve_device(device)
    task.to(dev)
    ctx = dict(task=task, run=run, outputs=outputs, device=dev, batch_size=batch_size, num_workers=num_workers,
               show_progress=show_progress)
    if kind == "mil":
        from .predict_mil import predict_bags

        result = predict_bags(inputs, maps=maps, backbone=backbone, backbone_file=backbone_file, **ctx)
    else:
        result = predict_images(inputs, top_k=top_k, explain=explain, **ctx)
    if not result["predicted"]:
        raise ZooError(f"none of the {len(result['errors'])} inputs could be read (see {result['files'][-1]}); "
                       f"first: {result['errors'][0][0]}: {result['errors'][0][1]}")
    return result


@torch.no_grad()
def predict_images(inputs, *, task, run, outputs: Outputs, device, batch_size: int, num_workers: int,
                   top_k: int, explain: bool, show_progress: bool) -> dict[str, Any]:
    from .explain import denormalize, save_attention_maps

    kind, names, n = task.task, list(task.class_names), int(task.hparams.num_classes)
    if kind == "segmentation" and n > 256:
        raise ZooError(f"the checkpoint has {n} classes; a palette PNG mask holds class ids 0..255")
    items = collect_inputs(inputs, image_files)
    transform = eval_transform(kind, task.hparams, run)
    data = ImageInputs(items, transform, run.in_chans or 3, tv_image=kind == "segmentation")
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=as_list)
    rows, errors, written = [], [], []
    with progress() as bar:
        job = bar.add_task(f"predict ({task.hparams.model['name']})", total=len(items), visible=show_progress)
        for batch in loader:
            errors += [(str(items[i].path), e) for i, x, e, _ in batch if x is None]
            good = [b for b in batch if b[1] is not None]
            for group in same_shape(good):  # native-size evaluation (eval_resize) leaves sizes unequal
                x = torch.stack([b[1] for b in group]).to(device)
                logits = task.eval_forward(x).float()
                group_items = [items[b[0]] for b in group]
                if kind == "classification":
                    rows += class_rows(group_items, logits.softmax(-1).cpu(), names, top_k)
                else:
                    for item, (_, _, _, size), lg in zip(group_items, group, logits):
                        mask = F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
                        save_mask(mask.cpu().numpy(), outputs.file("masks", f"{item.name}.png"))
                        area = torch.bincount(mask.flatten(), minlength=n).double() / mask.numel()
                        rows.append([str(item.path), *map(fmt, area.tolist())])
                if explain:
                    written += save_attention_maps(
                        denormalize(x.cpu(), run.mean, run.std), task.net.attention_maps(x),
                        outputs.dir / "explain", max_images=len(group), titles=[i.path.name for i in group_items],
                        names=[i.name for i in group_items], **overlay_style(task.net))
            bar.advance(job, len(batch))
    if kind == "classification":
        k = max(1, min(top_k, n))
        header = ["path"] + [c for j in range(1, k + 1) for c in (f"label_{j}", f"prob_{j}")]
    else:
        header = ["path", *names]
    files = [outputs.csv(MAIN_CSV[kind], header, rows), *written]
    files.append(outputs.csv("errors.csv", ["path", "error"], errors))
    return {"predicted": len(rows), "errors": errors, "files": files}


def same_shape(batch: list) -> list[list]:
    """Consecutive runs of items whose inputs share a shape (each run is stacked into one forward)."""
    groups: list[list] = []
    for b in batch:
        if groups and groups[-1][0][1].shape == b[1].shape:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def class_rows(items: list[Item], prob: torch.Tensor, names: list[str], top_k: int) -> list[list[str]]:
    conf, idx = prob.topk(max(1, min(top_k, prob.shape[-1])), dim=-1)
    label = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
    return [[str(it.path), *[v for c, p in zip(ci.tolist(), pi.tolist()) for v in (label(c), fmt(p))]]
            for it, ci, pi in zip(items, idx, conf)]
