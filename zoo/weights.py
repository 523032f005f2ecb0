"""Safe loading of weights files: safetensors, or ``torch.load(weights_only=True)``; never a pickle that runs code."""
from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import WeightsError

_WRAPPERS = ("state_dict", "model", "model_state_dict", "model_ema", "state_dict_ema", "module", "net")


def safe_load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint or weights file without executing code from it (``mmap``: tensors stay on
    disk until touched, for a cheap look at a large checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as e:
        if not _looks_like_pickle(path):
            raise WeightsError(_not_a_checkpoint(path)) from None
        raise WeightsError(
            f"refused to load {path}: it is not a plain weights file (its pickle asks to run or build "
            f"objects: {str(e).splitlines()[0][:200]}). The zoo only loads weights with "
            "weights_only=True or safetensors. If you trust the file, re-save its state_dict as "
            "safetensors; otherwise do not use it."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        if not _looks_like_pickle(path):
            raise WeightsError(_not_a_checkpoint(path)) from None
        raise WeightsError(f"could not read {path} ({type(e).__name__}: {e}); is it truncated or corrupt?") from None


def _looks_like_pickle(path: Path) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with 0x80)."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or zipfile.is_zipfile(path) or head[:1] == b"\x80"


def _not_a_checkpoint(path: Path) -> str:
    size = path.stat().st_size
    what = "it is empty" if size == 0 else f"its {size} bytes are neither a torch.save file nor safetensors"
    return (f"{path} is not a checkpoint or weights file ({what}). Give a .ckpt/.pt/.pth written by "
            "torch.save (a zoo run's checkpoints/*.ckpt) or a .safetensors file; was it copied completely?")


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except SafetensorError as e:
        if _looks_like_pickle(path):
            raise WeightsError(f"{path} is named .safetensors but is a torch.save (pickle/zip) file; "
                               "rename it to .pt (it is then loaded with weights_only=True)") from None
        raise WeightsError(f"{path} is not a valid safetensors file ({e}); it is truncated or corrupt "
                           "(compare its size with the original, download or copy it again)") from None


def atomic_write(path: str | Path, write: Callable[[Path], object], *, what: str = "file", durable: bool = False,
                 tmp_suffix: bool = True, hint: str = "Free space or choose a writable folder, then run again.") -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it onto ``path``: a reader
    sees the old file or the new one, never half of one. On any failure the temporary file is removed
    and ``path`` is untouched; a write error (disk full, read-only folder) is a :class:`WeightsError`
    naming ``path`` and the cause. ``write`` gets the temporary path (with ``path``'s suffix).
    ``durable=True`` also fsyncs the file before the rename and the folder after it (checkpoints);
    ``tmp_suffix=False`` gives the temporary file no suffix (so a ``*.ckpt`` glob never sees one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix if tmp_suffix else ''}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        cause = "the disk is full" if e.errno == errno.ENOSPC else (
            "the folder is read-only or not writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else f"{type(e).__name__}: {e.strerror or e}")
        raise WeightsError(f"could not write {what} {path}: {cause} ({e.strerror or e}); "
                           f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}. "
                           + hint) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:  # make the rename itself durable
        try:
            _fsync(path.parent)
        except OSError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Unwrap the usual containers (Lightning 'state_dict', official 'model', DDP 'module.', a dict of module state
    dicts)."""
    sd = obj
    for _ in range(3):
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPERS if k in sd and isinstance(sd[k], dict)), None)
            if inner is None:
                sd = _flatten_parts(sd)
                break
            sd = inner
    if not isinstance(sd, dict) or not sd:
        raise WeightsError("no state dict found in the weights file (looked under: " + ", ".join(_WRAPPERS) + ")")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "net.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _flatten_parts(obj: dict) -> dict:
    """A dict of module state dicts (DTFD-MIL's official ``{"classifier": sd, "attention": sd, ...}``) as one state
    dict with ``PART.`` prefixes, the names ``nn.Module`` gives submodules; other entries (epoch, optimizer states,
    metrics) are left out. Anything else is returned as it is."""
    parts = {k: v for k, v in obj.items()
             if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())}
    return {f"{p}.{k}": t for p, sd in parts.items() for k, t in sd.items()} if parts else obj


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "weights") -> list[str]:
    """Load ``state_dict`` into ``model``; entries whose shapes differ (a new classifier) are skipped
    and returned. Any other missing or unexpected key is an error naming the keys."""
    own = model.state_dict()
    state_dict = {k: _fit_pos_embed(v, own[k]) if k in own and k.endswith("pos_embed") else v
                  for k, v in state_dict.items()}
    skipped = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            f"{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return skipped  # those keep the model's fresh initialisation


def _fit_pos_embed(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A learned ``[1, prefix + h*w, D]`` position embedding resized (bicubic, timm's resampling) to the
    target's square grid: weights trained at 224 px load into a net built for 448 px."""
    if value.shape == target.shape or value.ndim != 3 or target.ndim != 3 or value.shape[-1] != target.shape[-1]:
        return value
    from timm.layers import resample_abs_pos_embed

    for prefix in (0, 1, 2):
        old, new = value.shape[1] - prefix, target.shape[1] - prefix
        if old > 0 and new > 0 and round(old ** 0.5) ** 2 == old and round(new ** 0.5) ** 2 == new:
            side = round(new ** 0.5)
            return resample_abs_pos_embed(value, new_size=[side, side], num_prefix_tokens=prefix)
    return value


def download_weights(url: str) -> Path:
    """Fetch a published weights file into torch's hub cache (``$TORCH_HOME/hub/checkpoints``) once and return
    its path; read it with :func:`safe_load`. Offline, the error says how to load the file by hand."""
    from torch.hub import download_url_to_file, get_dir

    dst = Path(get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        try:
            download_url_to_file(url, str(tmp), progress=True)
        except Exception as e:  # URLError, HTTPError, OSError, timeouts: all mean "not here"
            tmp.unlink(missing_ok=True)
            raise WeightsError(f"could not download {url} ({type(e).__name__}: {e}). Download it on a machine "
                               f"with internet and pass pretrained_file=<path> (or put it at {dst}).") from None
        tmp.replace(dst)  # a killed download never leaves a half file under the final name
    return dst


def load_pretrained_file(
    model: nn.Module, path: str | Path, checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None
) -> list[str]:
    """Load a timm, official or zoo weights file (or a zoo Hub folder's weights) into ``model``; returns the
    keys re-initialised."""
    from .hub import folder_state_dict, is_hub_source

    if is_hub_source(path):  # zoo keys already: no official-key filter
        return load_into(model, folder_state_dict(path), source=str(path))
    sd = extract_state_dict(safe_load(path))
    if checkpoint_filter is not None:
        sd = checkpoint_filter(sd, model)
    return load_into(model, sd, source=str(path))
