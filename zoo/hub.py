"""Hub folders: a trained zoo net as the folder timm and the Hugging Face Hub read, and back.

A folder holds ``config.json`` (timm's keys: ``architecture``, ``num_classes``, ``label_names``,
``pretrained_cfg``, ``model_args``; plus a ``zoo`` section with the task and the run's ``data_info``),
``model.safetensors`` and ``README.md`` (a model card, :mod:`zoo.model_card`).

>>> zoo.save_pretrained(net, "my-net", model_kwargs={"img_size": 64}, data_info=info)
>>> net = zoo.create_model("local-dir:my-net")          # or "hf-hub:ORG/NAME"
>>> net = timm.create_model("local-dir:my-net", pretrained=True)   # classification nets

Names: ``local-dir:DIR``, ``hf-hub:ORG/NAME[@REVISION]``, or a folder path where a checkpoint is taken
(``evaluate.py ckpt_path=DIR``, ``init_from=DIR``, ``model.pretrained_file=DIR``). Weights load from
safetensors only. Downloads and ``zoo push`` are :mod:`zoo.hf`'s.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelArgumentError, WeightsError, ZooError

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
PREFIXES = ("local-dir:", "hf-hub:")
_SOURCE_KEYS = ("hf_hub_id", "url", "file", "source", "tag", "hf_hub_filename", "state_dict")


class HubError(ZooError, RuntimeError):
    """A Hub folder cannot be written, read, downloaded or pushed (the message says why)."""


def is_hub_source(src: Any) -> bool:
    """``local-dir:``/``hf-hub:`` names and existing folders (a checkpoint is a file)."""
    return isinstance(src, (str, Path)) and (str(src).startswith(PREFIXES) or Path(src).is_dir())


# ---------------------------------------------------------------------------------------- writing
def save_pretrained(net: nn.Module, out: str | Path, *, model_kwargs: dict | None = None,
                    num_classes: int | None = None, data_info: dict | None = None, run: dict | None = None,
                    overwrite: bool = False, inputs: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (built by :func:`zoo.create_model`) as a Hub folder ``out``; returns ``out``.

    ``model_kwargs``: the constructor arguments it was built with (``img_size``, ``in_chans``, ``in_dim``,
    ...; ``num_classes`` apart); ``data_info``: the run's input and class names as
    :func:`zoo.runner.data_info` makes them (default: the spec's preprocessing); ``run``: what the card
    tells of the training run (:func:`find_run`). An existing non-empty ``out`` is replaced only with
    ``overwrite=True`` and never when it holds one of ``inputs``. The folder is written beside ``out``
    and renamed onto it once complete, after its weights were loaded back into a freshly built net."""
    from . import __version__
    from .model_card import card

    spec = getattr(net, "zoo_spec", None)
    if spec is None:
        raise HubError(f"{type(net).__name__} has no zoo_spec: save_pretrained takes nets built by zoo.create_model")
    out = check_output_folder(out, inputs or {}, overwrite)
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if k not in ("num_classes", "pretrained", "pretrained_file")}
    _check_json("model_kwargs", kwargs)
    n = num_classes if num_classes is not None else getattr(net, "num_classes", None)
    info = {k: v for k, v in dict(data_info or {}).items() if v is not None}
    names = list(info.get("class_names") or [])
    config = {"architecture": spec.name, "num_classes": n}
    if getattr(net, "num_features", None) is not None:
        config["num_features"] = net.num_features
    if names and len(names) == n:
        config["label_names"] = names
    config["pretrained_cfg"] = folder_pretrained_cfg(spec, n, info)
    config["model_args"] = kwargs
    config["zoo"] = {"version": __version__, "task": spec.task, "data_info": info}
    _check_json("data_info", info)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}  # tied weights: once each
    _fresh_load(spec.name, n, kwargs, sd)

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (folder / CARD).write_text(card(net, config, run or {}))

    write_folder(out, write)
    return out


def folder_pretrained_cfg(spec: Any, num_classes: int | None, info: dict) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of the spec (every task: the zoo's input spec in timm's keys) with the run's
    preprocessing, without the sources of other weights (the folder's are its own)."""
    cfg = {k: v for k, v in spec.pretrained_cfg(num_classes=num_classes).items() if k not in _SOURCE_KEYS}
    if info.get("img_size") is not None or info.get("in_chans") is not None:
        c, h, w = spec.input_size if len(spec.input_size) == 3 else (None, None, None)
        c = info.get("in_chans") or c
        h = w = info.get("img_size") or h
        if c and h:
            cfg["input_size"] = [int(c), int(h), int(w)]
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if info.get(key) is not None:
            cfg[key] = info[key]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _check_json(what: str, value: dict) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise HubError(f"{what} must be JSON-serialisable for config.json ({e}): {value!r}") from None


def _fresh_load(name: str, num_classes: int | None, kwargs: dict, sd: dict) -> None:
    """The folder must rebuild this net: a net built from its config takes the weights strictly."""
    from .registry import create_model

    fresh = create_model(name, num_classes=num_classes, **kwargs)
    try:
        result = fresh.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise HubError(f"{name}({kwargs}) built from the folder's config does not take the net's weights "
                       f"({str(e).splitlines()[-1].strip()}); pass the model_kwargs the net was built with") from None
    if result.missing_keys or result.unexpected_keys:
        raise HubError(f"{name}({kwargs}) built from the folder's config does not take the net's weights: missing "
                       f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")


def check_output_folder(out: str | Path, inputs: dict[str, Any], overwrite: bool) -> Path:
    """Refuse an output folder that is or holds one of ``inputs`` (always), a file, a non-empty folder
    (unless ``overwrite``) and a non-empty folder that is no Hub folder (always: ``overwrite`` replaces the
    whole folder, so a mistyped path must not cost a folder of other files)."""
    out = Path(out)
    for what, src in inputs.items():
        if not src or str(src).startswith("hf-hub:"):
            continue
        src_path = Path(str(src).removeprefix("local-dir:")).resolve()
        if src_path == out.resolve() or out.resolve() in src_path.parents:
            raise HubError(f"the output {out} is or holds the {what} {src}: writing it would destroy the input; "
                           "give another output folder")
    if out.exists() and not out.is_dir():
        raise HubError(f"the output {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HubError(f"the output folder {out} already exists and is not empty; pass --overwrite "
                       "(overwrite=True) to replace it, or give another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).is_file():
        raise HubError(f"the output folder {out} holds other files and no {CONFIG}: it is not a Hub folder, and "
                       "--overwrite replaces only Hub folders; give an empty or new folder")
    return out


def write_folder(out: Path, write) -> None:
    """``write(tmp)`` into a temporary folder beside ``out``, then rename it onto ``out``: a reader sees
    the old folder or the new one; on failure the temporary folder is removed and ``out`` is untouched."""
    import errno

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)  # --overwrite: the previous folder goes only once the new one is complete
        os.replace(tmp, out)  # onto a missing or empty folder
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        cause = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e.strerror or e}"
        raise HubError(f"could not write the folder {out}: {cause}; "
                       f"{'the previous folder is unchanged' if out.exists() else 'nothing was written'}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_run(ckpt: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's run (``RUN/checkpoints/x.ckpt``): its resolved ``config.yaml`` text and the
    test metrics of that checkpoint (``metrics_last.json`` for ``last.ckpt`` when there is one, else
    ``metrics.json``: train.py tests its best checkpoint). Empty when the checkpoint is not in a run."""
    ckpt = Path(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    run: dict[str, Any] = {"checkpoint": ckpt.name}
    if (run_dir / "config.yaml").is_file():
        run["config"] = (run_dir / "config.yaml").read_text()
    for name in (["metrics_last.json"] if ckpt.stem.startswith("last") else []) + ["metrics.json"]:
        path = run_dir / name
        if path.is_file():
            try:
                run["metrics"] = {k: v for k, v in json.loads(path.read_text()).items()}
                run["metrics_file"] = name
            except (ValueError, AttributeError):
                continue
            break
    return run


def save_checkpoint(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """``python -m zoo save``: the net of a zoo checkpoint (or another Hub folder) as a Hub folder."""
    from .explain import load_net_from_checkpoint

    check_output_folder(out, {"checkpoint": src}, overwrite)  # before the net is built
    net, hp = load_net_from_checkpoint(src)
    model = hp["model"] if isinstance(hp.get("model"), dict) else {"name": hp.get("model"), "kwargs": {}}
    run = find_run(src) if Path(str(src)).is_file() else {}
    return save_pretrained(net, out, model_kwargs=model.get("kwargs"), num_classes=hp.get("num_classes"),
                           data_info=hp.get("data_info"), run=run, overwrite=overwrite, inputs={"checkpoint": src})


# ---------------------------------------------------------------------------------------- reading
def resolve_folder(src: str | Path) -> Path:
    """The local folder of a hub name: ``local-dir:DIR`` / ``DIR`` as is, ``hf-hub:ID`` downloaded
    (``config.json`` and ``model.safetensors`` into the Hub's cache)."""
    src = str(src)
    if src.startswith("hf-hub:"):
        from .hf import download

        return download(src[len("hf-hub:"):])
    folder = Path(src[len("local-dir:"):] if src.startswith("local-dir:") else src)
    if not folder.is_dir():
        raise HubError(f"{src}: no such folder (a Hub folder holds {CONFIG} and {WEIGHTS})")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise HubError(f"{folder} is not a Hub folder: it has no {CONFIG} (write one with `python -m zoo save CKPT --out DIR`)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise HubError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not config.get("architecture"):
        raise HubError(f"{path} names no architecture; was it written by `zoo save` or timm's save_for_hf?")
    return config


def folder_state_dict(src: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a Hub folder (safetensors only: a folder with only a pickle is refused)."""
    from .weights import safe_load

    folder = resolve_folder(src)
    path = folder / WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
        what = f"only {', '.join(pickles)}" if pickles else "no weights file"
        raise WeightsError(f"{folder} has {what} and no {WEIGHTS}: the zoo loads Hub folders from safetensors only "
                           "(a pickled .bin can run code). Convert it where you trust it: "
                           "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')")
    return safe_load(path, map_location=map_location)


def load_folder(src: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A Hub folder (or ``local-dir:``/``hf-hub:`` name) -> ``(net in eval mode, hyper_parameters)``, the
    pair :func:`zoo.explain.load_net_from_checkpoint` returns for a checkpoint."""
    folder = resolve_folder(src)
    config = read_config(folder)
    net = _build(folder, config, map_location=map_location)
    zoo_part = config.get("zoo") or {}
    info = dict(zoo_part.get("data_info") or {})
    if config.get("label_names") and not info.get("class_names"):
        info["class_names"] = list(config["label_names"])
    hp = {"model": {"name": config["architecture"], "kwargs": dict(config.get("model_args") or {})},
          "num_classes": config.get("num_classes"), "data_info": info}
    return net.eval(), hp


def _build(folder: Path, config: dict, *, num_classes: int | None = None, weights: bool = True,
           map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """The folder's net: its architecture and model_args (``overrides`` win), its weights (a head of another
    ``num_classes`` is re-initialised), and its preprocessing and labels as ``pretrained_cfg``."""
    from .registry import create_model
    from .weights import load_into

    stored_n = config.get("num_classes")
    n = stored_n if num_classes is None else num_classes
    kwargs = {**dict(config.get("model_args") or {}), **overrides}
    net = create_model(config["architecture"], num_classes=n, **kwargs)
    if weights:
        load_into(net, folder_state_dict(folder, map_location), source=str(folder))
    cfg = {**dict(getattr(net, "pretrained_cfg", None) or {}), **dict(config.get("pretrained_cfg") or {})}
    cfg["num_classes"] = getattr(net, "num_classes", n)
    if config.get("label_names") and n == stored_n:
        cfg["label_names"] = list(config["label_names"])
    else:
        cfg.pop("label_names", None)
    cfg.update(source="local-dir", file=str(folder))  # as timm's local-dir: loading leaves it
    net.pretrained_cfg = net.default_cfg = cfg
    return net


def create_from_hub(name: str, pretrained: bool = False, num_classes: int | None = None,
                    pretrained_file: str | None = None, features_only: bool = False,
                    out_indices: Any = None, **kwargs: Any) -> nn.Module:
    """:func:`zoo.create_model` for ``local-dir:DIR`` / ``hf-hub:ID``: the folder's net with its weights
    (a name that is a trained net always loads them), classes and preprocessing."""
    from .registry import feature_extractor

    if pretrained_file:
        raise ModelArgumentError(f"{name} brings its own weights; pretrained_file= goes with a model name")
    folder = resolve_folder(name)
    net = _build(folder, read_config(folder), num_classes=num_classes, **kwargs)
    if features_only:
        return feature_extractor(net, net.zoo_spec, out_indices)
    return net


def create_for_timm(name: str, cfg: dict, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm's entrypoint for a ``local-dir:``/``hf-hub:`` config (timm's rule: weights with ``pretrained=True``)."""
    folder = Path(cfg["file"]) if cfg.get("source") == "local-dir" else None
    if cfg.get("source") == "hf-hub":
        from .hf import download

        folder = download(cfg["hf_hub_id"])
    config = read_config(folder)
    kwargs.pop("pretrained_model_args", None)
    return _build(folder, config, num_classes=kwargs.pop("num_classes", None), weights=pretrained, **kwargs)
