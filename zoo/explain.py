"""Attention maps -> PNG overlays, and loading a trained network back from a Lightning checkpoint.

A model with attention worth looking at defines ``attention_maps(x) -> {name: Tensor [B, K, h, w]}``
(K heads, regions, parts or subspaces). This module turns those into pictures:

>>> x = normalised_images                                   # [B, C, H, W]
>>> maps = net.attention_maps(x)
>>> save_attention_maps(denormalize(x, spec.mean, spec.std), maps, "out/")

Headless (matplotlib's Agg canvas, no pyplot state); matplotlib is imported only when drawing, so
:func:`load_net_from_checkpoint` stays cheap. No Lightning import: checkpoints are read as plain dicts.
"""
from __future__ import annotations

import math

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError

__all__ = [
    "overlay", "gaussian_blur", "save_attention_maps", "denormalize", "normalize", "load_image",
    "load_net_from_checkpoint", "MAX_PANELS",
]

MAX_PANELS = 16  # overlay panels per PNG (heads / regions / subspaces beyond these are left out)


# ---------------------------------------------------------------------------------------- tensors
def _to_tensor(a: Any) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.detach().float().cpu()


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(x - mean) / std`` on ``[C, H, W]`` or ``[B, C, H, W]``; the result is clamped to 0..1."""
    x = _to_tensor(x)
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(shape)
    return (x * std_t + mean_t).clamp(0, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` on ``[C, H, W]`` or ``[B, C, H, W]`` images in 0..1."""
    shape = (-1, 1, 1)
    return (x - torch.as_tensor(mean, dtype=x.dtype).view(shape)) / torch.as_tensor(std, dtype=x.dtype).view(shape)


def load_image(path: str | Path, size: int | tuple[int, int], channels: int = 3) -> torch.Tensor:
    """An image file -> float ``[C, H, W]`` in 0..1, resized (bilinear, no crop) to ``size``."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((w, h), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


# ---------------------------------------------------------------------------------------- drawing
def _image_hwc(image: Any) -> np.ndarray:
    img = _to_tensor(image)
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(img.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] > 3:
        img = img[:3]
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def gaussian_blur(m: torch.Tensor, ksize: int) -> torch.Tensor:
    """``[h, w]`` blurred by a ``ksize x ksize`` Gaussian with OpenCV's default sigma for that size
    (``0.3 ((ksize - 1) / 2 - 1) + 0.8``) and its default border (reflect-101)."""
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    r = torch.arange(ksize, dtype=m.dtype) - (ksize - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    pad = ksize // 2
    x = F.pad(m[None, None], (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))[0, 0]


def overlay(image: Any, amap: Any, alpha: float = 0.5, cmap: str = "jet", *, interpolation: str = "bilinear",
            blur: int = 0) -> np.ndarray:
    """Blend an attention map over an image.

    ``image``: ``[C, H, W]`` float in 0..1 (C = 1 or 3); ``amap``: ``[h, w]`` of any range. The map is
    min-max normalised (a constant map becomes 0), resized bilinearly to ``H x W``, coloured with the
    matplotlib colour map ``cmap`` and blended: ``(1 - alpha) * image + alpha * colour``.
    Returns ``np.uint8 [H, W, 3]``.

    ``interpolation`` other than bilinear (e.g. ``"bicubic"``) or ``blur > 0`` draw as Prompt-CAM's
    ``SuperImposeHeatmap``: resize first, then min-max normalise, then a ``blur x blur`` Gaussian blur.
    """
    import matplotlib

    img = _image_hwc(image)
    h, w = img.shape[:2]
    m = _to_tensor(amap)
    if m.ndim != 2:
        m = m.squeeze()
        if m.ndim != 2:
            raise ValueError(f"attention map must be [h, w], got shape {tuple(_to_tensor(amap).shape)}")
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    if interpolation != "bilinear" or blur:
        m = F.interpolate(m[None, None], size=(h, w), mode=interpolation,
                          **({} if interpolation == "nearest" else {"align_corners": False}))[0, 0]
    lo, hi = m.min(), m.max()
    m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    if blur:
        m = gaussian_blur(m, int(blur))
    m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    heat = matplotlib.colormaps[cmap](m.numpy())[..., :3]
    out = (1.0 - alpha) * img + alpha * heat
    return (out.clip(0, 1) * 255.0 + 0.5).astype(np.uint8)


def bag_mosaic(bags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Image bags ``[B, N, C, h, w]`` -> one picture per bag ``[B, C, s*h, s*w]``: instances in a square
    grid in bag order (``s = ceil(sqrt(N))``), padded slots black; matches ACMIL's ``square_grid`` layout."""
    B, N, C, h, w = bags.shape
    side = math.ceil(math.sqrt(N))
    tiles = bags if mask is None else bags * mask[..., None, None, None]
    canvas = tiles.new_zeros(B, side * side, C, h, w)
    canvas[:, :N] = tiles
    return canvas.view(B, side, side, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, side * h, side * w)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "map"


def save_attention_maps(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    prefix: str = "sample",
    max_images: int = 8,
    titles: Sequence[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    panel_labels: Mapping[str, Sequence[str]] | None = None,
    dpi: int = 100,
    interpolation: str = "bilinear",
    blur: int = 0,
) -> list[Path]:
    """Write one PNG per image and map: the input image, then one overlay per map channel.

    ``images``: ``[B, C, H, W]`` in 0..1 (already de-normalised, see :func:`denormalize`).
    ``maps``: ``{name: [B, K, h, w]}`` (``[B, h, w]`` is read as K = 1); at most :data:`MAX_PANELS`
    channels are drawn. Files are ``out_dir/{prefix}_{i:03d}_{name}.png`` or, with ``names`` (one per
    image), ``out_dir/{names[i]}_{name}.png``. ``titles`` (one per image) head each figure.
    ``panel_labels``: optional ``{name: [label per channel]}`` (default ``"{name} {k}"``).
    ``interpolation`` / ``blur``: see :func:`overlay` (a model's ``overlay_style`` dict gives its own).
    Returns the paths written, image by image.
    """
    from matplotlib.figure import Figure

    imgs = _to_tensor(images)
    if imgs.ndim == 3:
        imgs = imgs.unsqueeze(0)
    if imgs.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(imgs.shape)}")
    b = imgs.shape[0]
    prepared: dict[str, torch.Tensor] = {}
    for name, m in maps.items():
        t = _to_tensor(m)
        if t.ndim == 3:
            t = t.unsqueeze(1)
        if t.ndim != 4 or t.shape[0] != b:
            raise ValueError(f"map {name!r} must be [B={b}, K, h, w], got shape {tuple(t.shape)}")
        prepared[name] = t
    for seq, what in ((titles, "titles"), (names, "names")):
        if seq is not None and len(seq) < min(b, max_images):
            raise ValueError(f"{what} has {len(seq)} entries for {min(b, max_images)} images")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i in range(min(b, max_images)):
        img = imgs[i]
        stem = _safe(names[i]) if names is not None else f"{_safe(prefix)}_{i:03d}"
        for name, m in prepared.items():
            k = min(m.shape[1], MAX_PANELS)
            labels = list(panel_labels.get(name, [])) if panel_labels else []
            fig = Figure(figsize=(2.2 * (k + 1), 2.6), dpi=dpi)
            axes = fig.subplots(1, k + 1, squeeze=False)[0]
            axes[0].imshow(_image_hwc(img))
            axes[0].set_title("input", fontsize=9)
            for j in range(k):
                axes[j + 1].imshow(overlay(img, m[i, j], alpha=alpha, cmap=cmap, interpolation=interpolation, blur=blur))
                label = labels[j] if j < len(labels) else (f"{name} {j}" if m.shape[1] > 1 else name)
                axes[j + 1].set_title(label, fontsize=9)
            for ax in axes:
                ax.axis("off")
            head = f"{titles[i]}: {name}" if titles is not None else name
            if m.shape[1] > k:
                head += f" (first {k} of {m.shape[1]})"
            fig.suptitle(head, fontsize=10)
            fig.tight_layout()
            path = out / f"{stem}_{_safe(name)}.png"
            fig.savefig(path)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------- checkpoints
def load_net_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network of a Lightning checkpoint written by a zoo task module, or of a Hub folder
    (a folder path, ``local-dir:DIR`` or ``hf-hub:ORG/NAME``; :func:`zoo.hub.load_folder`).

    The checkpoint is read with ``torch.load(weights_only=True)`` (no code runs); its
    ``hyper_parameters`` must hold ``model = {"name": ..., "kwargs": {...}}`` (or just the name) and
    ``num_classes``; its ``state_dict`` keys are the task module's, ``net.``-prefixed. Returns
    ``(net in eval mode, hyper_parameters)``. Raises :class:`zoo.WeightsError` when the file is not
    such a checkpoint or its weights do not fit the rebuilt network.
    """
    from .hub import is_hub_source, load_folder
    from .registry import create_model
    from .weights import safe_load

    if is_hub_source(path):
        return load_folder(path, map_location=map_location)
    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{path} is not a Lightning checkpoint (no 'state_dict'); for a plain weights "
                           "file use --model NAME --pretrained-file FILE")
    hp = dict(ckpt.get("hyper_parameters") or {})
    model = hp.get("model")
    if isinstance(model, str):
        name, kwargs = model, {}
    elif isinstance(model, Mapping) and model.get("name"):
        name, kwargs = model["name"], dict(model.get("kwargs") or {})
    else:
        raise WeightsError(
            f"{path}: its hyper_parameters have no model={{'name': ..., 'kwargs': {{...}}}} "
            f"(found keys: {sorted(hp)}); was it written by a zoo task module?"
        )
    kwargs.pop("pretrained", None)  # the checkpoint has the weights: download nothing
    kwargs.pop("pretrained_file", None)
    if hp.get("num_classes") is not None:
        kwargs["num_classes"] = hp["num_classes"]
    net = create_model(name, **kwargs)

    sd = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not sd:
        raise WeightsError(f"{path}: no 'net.'-prefixed weights in its state_dict")
    if all(k.startswith("_orig_mod.") for k in sd):  # saved from a torch.compile'd net
        sd = {k[len("_orig_mod."):]: v for k, v in sd.items()}
    try:
        result = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{path} does not fit {name}({kwargs}): {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path} does not fit {name}({kwargs}): missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return net.eval(), hp
