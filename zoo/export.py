"""Export a trained zoo net for use elsewhere: safetensors weights, ONNX or TorchScript.

``python -m zoo export CKPT --format safetensors|onnx|torchscript --out PATH``

Every export is checked: the written file is loaded back (``safetensors`` into a freshly built
net, ONNX through onnxruntime, TorchScript through ``torch.jit.load``) and its outputs on a random
input are compared with the checkpoint's net; a difference beyond the tolerance is an error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ZooError
from .registry import create_model, get_spec
from .spec import example_input, stored_input

FORMATS = ("safetensors", "onnx", "torchscript")


class ExportError(ZooError, RuntimeError):
    pass


def _compare(what: str, ours: torch.Tensor, theirs: torch.Tensor, atol: float, rtol: float) -> float:
    theirs = torch.as_tensor(theirs).to(ours.dtype)
    if theirs.shape != ours.shape:
        raise ExportError(f"{what}: output shape {tuple(theirs.shape)} differs from the net's {tuple(ours.shape)}")
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    if not torch.allclose(ours, theirs, atol=atol, rtol=rtol):
        raise ExportError(f"{what}: outputs differ from the checkpoint's net by up to {diff:.3g} "
                          f"(tolerance atol={atol}, rtol={rtol}); the export is not faithful")
    return diff


def check_output_path(out: str | Path, inputs: dict[str, str | Path | None], overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse an output that is one of the command's inputs (always) or an existing file (unless ``overwrite``)."""
    out = Path(out)
    for what, src in inputs.items():
        if not src:
            continue
        if Path(src).resolve() == out.resolve() or (out.exists() and Path(src).exists() and os.path.samefile(src, out)):
            raise ExportError(f"the output {out} is the {what} {src}: writing it would destroy the input; "
                              "give another output path")
    if out.is_dir():
        raise ExportError(f"the output {out} is a folder; give a file path")
    if out.exists() and not overwrite:
        raise ExportError(f"the output {out} already exists; pass {flag} to replace it, or give another path")
    return out


def export(ckpt: str | Path, fmt: str, out: str | Path, *, atol: float = 1e-4, rtol: float = 1e-4,
           opset: int = 17, overwrite: bool = False) -> dict[str, Any]:
    """Write the net of zoo checkpoint ``ckpt`` as ``fmt`` to ``out``; returns the check's numbers.

    ``out`` is never ``ckpt`` itself, and an existing ``out`` is replaced only with ``overwrite=True``.
    The file is written and checked under a temporary name beside ``out`` and renamed onto it only
    when the check passes: a failed export or a full disk leaves ``out`` as it was."""
    from .explain import load_net_from_checkpoint
    from .weights import atomic_write

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_output_path(out, {"checkpoint": ckpt}, overwrite)
    net, hp = load_net_from_checkpoint(ckpt)
    model = hp["model"] if isinstance(hp.get("model"), dict) else {"name": hp.get("model"), "kwargs": {}}
    name, kwargs = model["name"], dict(model.get("kwargs") or {})
    data_info = dict(hp.get("data_info") or {})
    net = net.eval()
    torch.manual_seed(0)
    spec = get_spec(name)
    x = example_input(spec, stored_input(hp), batch_size=2, bag_size=7, in_dim=kwargs.get("in_dim"),
                      bag_images="in_dim" not in kwargs)
    with torch.no_grad():
        ref = net(x)
    diffs: list[float] = []

    def write(tmp: Path) -> None:
        if fmt == "safetensors":
            diffs.append(_export_safetensors(net, name, kwargs, hp, data_info, tmp, x, ref, atol, rtol))
        elif fmt == "torchscript":
            diffs.append(_export_torchscript(net, tmp, x, ref, atol, rtol))
        else:
            diffs.append(_export_onnx(net, tmp, x, ref, atol, rtol, opset))

    atomic_write(out, write, what=f"the {fmt} export")
    diff = diffs[0]
    return {"format": fmt, "out": str(out), "model": name, "input_shape": list(x.shape),
            "output_shape": list(ref.shape), "max_abs_diff": diff}


def _export_safetensors(net, name, kwargs, hp, data_info, out, x, ref, atol, rtol) -> float:
    from safetensors.torch import load_file, save_file

    # safetensors refuses tensors that share memory (tied weights): store each once, contiguous
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    meta = {"zoo_model": name, "zoo_kwargs": json.dumps(kwargs), "num_classes": str(hp.get("num_classes")),
            "data_info": json.dumps(data_info)}
    save_file(sd, str(out), metadata=meta)
    fresh = create_model(name, num_classes=hp.get("num_classes"), **kwargs).eval()
    fresh.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        return _compare("safetensors", ref, fresh(x), atol, rtol)


class _Traceable(nn.Module):
    """Tracing and ONNX take a plain ``forward(x) -> tensor`` (MIL nets: a bag without padding mask)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _export_torchscript(net, out, x, ref, atol, rtol) -> float:
    try:
        with torch.no_grad():
            scripted = torch.jit.trace(_Traceable(net), x, check_trace=False)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, unsupported ops
        raise ExportError(f"torchscript: tracing failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    scripted.save(str(out))
    loaded = torch.jit.load(str(out))
    x2 = torch.randn(x.shape[0] + 1, *x.shape[1:])  # a trace must not have baked in the batch size
    with torch.no_grad():
        return max(_compare("torchscript", ref, loaded(x), atol, rtol),
                   _compare("torchscript (batch+1)", net(x2), loaded(x2), atol, rtol))


def _export_onnx(net, out, x, ref, atol, rtol, opset) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--format onnx needs onnxruntime to check the export: pip install onnx onnxruntime") from None
    axes = {0: "batch", 1: "bag"} if x.ndim in (3, 5) else {0: "batch"}  # MIL: any bag length too
    errors = []
    with torch.no_grad():
        try:  # torch.export-based (needs onnxscript): handles HaloNet's unfold with a dynamic batch
            import onnxscript  # noqa: F401

            dims = {i: torch.export.Dim(n, min=2 if n == "batch" else 1) for i, n in axes.items()}
            torch.onnx.export(_Traceable(net), (x,), str(out), input_names=["x"], output_names=["logits"],
                              dynamo=True, dynamic_shapes={"x": dims}, opset_version=max(opset, 18))
        except Exception as e:  # noqa: BLE001 - not installed, or an op torch.export cannot capture
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__)
            try:  # the TorchScript-based exporter
                out_axes = {0: "batch"}
                torch.onnx.export(_Traceable(net), (x,), str(out), input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": axes, "logits": out_axes}, opset_version=opset, dynamo=False)
            except Exception as e2:  # noqa: BLE001
                errors.append(f"{type(e2).__name__}: {str(e2).splitlines()[0][:200]}")
                raise ExportError(f"onnx: export failed ({'; '.join(errors)})") from None
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    diff = _compare("onnx", ref, torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), atol, rtol)
    x2 = torch.randn(x.shape[0] + 1, *x.shape[1:])  # the batch axis is really dynamic
    with torch.no_grad():
        ref2 = net(x2)
    return max(diff, _compare("onnx (batch+1)", ref2, torch.from_numpy(session.run(None, {"x": x2.numpy()})[0]), atol, rtol))
