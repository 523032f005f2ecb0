"""JPEG decoding on the training device (``data.gpu_decode=true``): the loader's workers only read the files.

When JPEG decoding is what bounds a run (``python -m zoo bench-pipeline`` says ``loader-bound``), the workers
send the encoded bytes and the datamodule's ``transfer_batch_to_device`` decodes the whole batch at once with
``torchvision.io.decode_jpeg(..., device=<the trainer's device>)`` (nvJPEG on CUDA), then crops, flips,
resizes and normalises each image on that device with the same torchvision v2 transforms the CPU path uses.
The batch the task sees is the usual ``(image float[B, C, H, W], label long[B])`` on the device.

Documented choices:

* Files that are not JPEG (PNG, TIFF, ...) are decoded by PIL in the worker, as the CPU path does, and join
  the batch as ``uint8`` tensors; only the JPEGs are decoded on the device.
* On a CPU trainer the same path runs with ``decode_jpeg(device="cpu")`` in the main process (the tests
  use it); it helps only on an accelerator.
* The v2 transforms are the CPU path's, applied to tensors. On CPU the decoded batch equals the CPU path's
  (tested); nvJPEG's inverse DCT may differ from libjpeg-turbo's by rounding.
* An unreadable file follows ``data.bad_images``: in training it is replaced by the next readable image of the
  same batch and counted (as the CPU path replaces it by the next readable item); in val/test it is a
  DataFormatError naming the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from zoo.errors import DataFormatError

log = logging.getLogger("zoo.data")

JPEG_MAGIC = b"\xff\xd8"


class EncodedBatch(NamedTuple):
    """A collated batch before decoding: ``images`` holds 1-d ``uint8`` JPEG bytes or decoded ``uint8
    [C, H, W]`` tensors (other formats), ``paths`` the files (named in errors), ``train`` the split's policy."""

    images: list[torch.Tensor]
    labels: torch.Tensor
    paths: list[str]
    train: bool


def read_encoded(path, in_chans: int, open_image: Callable) -> torch.Tensor:
    """A file as the worker sends it: a JPEG's bytes (1-d ``uint8``), any other image decoded by ``open_image``
    (PIL) into ``uint8 [C, H, W]``. Raises ValueError for an empty or truncated JPEG (no end marker)."""
    data = Path(path).read_bytes()
    if not data.startswith(JPEG_MAGIC):
        return v2.functional.pil_to_tensor(open_image(path, in_chans))
    if b"\xff\xd9" not in data[-16:]:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def collate_encoded(items: list[tuple[torch.Tensor, int, str, bool]]) -> EncodedBatch:
    images, labels, paths, train = zip(*items)
    return EncodedBatch(list(images), torch.as_tensor(labels, dtype=torch.long), list(paths), bool(train[0]))


class DeviceDecoder:
    """Decodes an :class:`EncodedBatch` on ``device`` and applies ``geometry[train]`` (v2 transforms on uint8
    tensors) to each image, then scales to float and normalises the stacked batch."""

    def __init__(self, geometry: dict[bool, Callable], mean, std, in_chans: int) -> None:
        self.geometry, self.in_chans = geometry, in_chans
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        self.skipped: set[str] = set()

    @property
    def mode(self) -> ImageReadMode:
        return ImageReadMode.GRAY if self.in_chans == 1 else ImageReadMode.RGB

    def _decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        """Every image decoded (None for an unreadable one in training; val/test raise naming the file)."""
        jpegs = [i for i, t in enumerate(batch.images) if t.ndim == 1]
        out: list[torch.Tensor | None] = [None] * len(batch.images)
        try:
            decoded = decode_jpeg([batch.images[i] for i in jpegs], mode=self.mode, device=device) if jpegs else []
            for i, img in zip(jpegs, decoded):
                out[i] = img
        except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
            for i in jpegs:
                try:
                    out[i] = decode_jpeg(batch.images[i], mode=self.mode, device=device)
                except RuntimeError as e:
                    self._unreadable(batch, i, e)
        for i, t in enumerate(batch.images):
            if t.ndim == 3:
                out[i] = t.to(device, non_blocking=True)
        return out

    def _unreadable(self, batch: EncodedBatch, i: int, error: Exception) -> None:
        path, why = batch.paths[i], str(error).splitlines()[0][:200]
        if not batch.train:
            raise DataFormatError(f"cannot decode image {path} on the device ({why}); fix or remove it, or set "
                                  "data.bad_images=skip to leave unreadable images out of evaluation") from None
        if path not in self.skipped:
            self.skipped.add(path)
            log.warning("skipped undecodable image %s (%s); %d skipped so far", path, why, len(self.skipped))

    def __call__(self, batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self._decode(batch, device)
        good = [i for i, img in enumerate(decoded) if img is not None]
        if not good:
            raise DataFormatError(f"no image of a training batch could be decoded (first: {batch.paths[0]})")
        # training: an undecodable image is replaced by the next readable one of the batch (and its label)
        take = [i if decoded[i] is not None else min((g for g in good if g > i), default=good[0])
                for i in range(len(decoded))]
        geo = self.geometry[batch.train]
        images = torch.stack([geo(decoded[i]) for i in take])
        return self.normalize(images), batch.labels[take].to(device, non_blocking=True)
