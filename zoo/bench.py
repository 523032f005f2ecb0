"""Throughput, parameters, FLOPs and peak memory of zoo models (and timm references), side by side.

>>> from zoo.bench import benchmark
>>> rows = benchmark(["halonet_tiny", "timm:resnet18"], img_size=64, batch_size=8, train=True)

or from the shell: ``python -m zoo bench 'halonet*' timm:resnet18 --img-size 64 --train --json``.

What is measured, per model (each by default in a fresh ``spawn``-ed subprocess, one after another,
so that one model's allocations and allocator caches do not leak into the next one's numbers):

* ``infer_samples_per_sec`` / ``infer_step_ms``: eval mode under ``torch.inference_mode`` (``no_grad``
  with ``--compile``), ``warmup`` untimed steps, then the mean over ``iters`` timed steps.
* ``train_samples_per_sec`` / ``train_step_ms`` (only with ``train=True``, else ``None``): one step is
  forward + cross-entropy + backward + SGD step. Classification and MIL logits ``[B, C]`` are scored
  against random labels, segmentation logits ``[B, C, H, W]`` against random masks. ``forward_train``
  is deliberately not used: the numbers are those of the plain network.
* ``params_m``: parameters in millions.
* ``gflops``: **multiply-accumulates** per sample, in billions: ``torch.utils.flop_counter.FlopCounterMode``
  counts 2 FLOPs per multiply-add on a batch of one, and we divide by 2. This is the quantity fvcore,
  timm's benchmark script and most papers call "GFLOPs" (strictly GMACs). Only the operators the
  counter knows (matmuls, convolutions, attention kernels) are counted; element-wise ops are not.
  ``None`` (with ``gflops_error``) where the counter cannot run the model (FlexAttention on CPU).
* ``peak_mem_mb``: the larger of ``infer_peak_mem_mb`` and ``train_peak_mem_mb``, in MiB, each
  measured over that phase's timed steps (so ``torch.compile`` time is not in it).
  CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``: absolute, so it
  includes the weights, and for training the optimizer state (``peak_mem_method = "cuda_max_allocated"``).
  CPU: the growth of the process's resident set size (RSS) during the timed steps over the RSS just
  before them. Before the timed steps the garbage collector runs and glibc's ``malloc_trim(0)`` hands
  freed heap pages back to the OS (otherwise the warmup's pages stay resident and the steps seem to
  need nothing); then RSS is read from ``/proc/self/status`` (``VmRSS``) and the kernel's high-water
  mark is reset to it by writing ``5`` to ``/proc/self/clear_refs``; the peak is ``VmHWM`` after the
  steps minus that ``VmRSS`` (``peak_mem_method = "rss_hwm"``). This is the memory a step needs on top
  of what already exists: activations, workspaces, and for training the gradients (``zero_grad``
  frees them between steps); not the weights or the optimizer state. Where ``/proc`` is missing or
  the reset is not allowed (macOS, some sandboxes) the growth of
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported instead (``"ru_maxrss"``): a lower bound,
  because an earlier, higher peak of the process hides the steps' own. No psutil is needed.

Models may add their own columns: if the built model has ``bench_extras(img_size) -> dict``, its items
are added to the row (e.g. ``mhsa_flops_reduction``).
"""
from __future__ import annotations

import contextlib
import gc
import math
import pickle
import re
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .contract import capabilities
from .errors import InputSizeError, UnknownModelError, ZooError
from .registry import ModelSpec, get_spec, list_models

__all__ = ["benchmark", "BenchmarkError", "ROW_KEYS", "format_table", "time_train_steps"]

ROW_KEYS = (
    "model", "task", "img_size", "batch_size", "device", "dtype", "params_m", "gflops",
    "infer_samples_per_sec", "infer_step_ms", "train_samples_per_sec", "train_step_ms",
    "peak_mem_mb", "infer_peak_mem_mb", "train_peak_mem_mb", "peak_mem_method", "threads", "isolated",
)
_WILDCARD = re.compile(r"[*?\[]")


class BenchmarkError(ZooError, RuntimeError):
    """A model failed while being benchmarked (build, forward, backward, or its worker process died)."""


# ---------------------------------------------------------------------------------------- planning
def _timm_default_size(name: str) -> tuple[int, int, int]:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return tuple(size) if size else (3, 224, 224)


def _expand(specs: list[str]) -> list[str]:
    """Zoo names, zoo wildcards and ``timm:NAME`` (timm wildcards too) -> concrete names, in order. A name or
    pattern only timm knows is timm's (``resnet18`` -> ``timm:resnet18``); a registered zoo name is the zoo's."""
    out: list[str] = []
    for s in specs:
        if s.startswith("timm:"):
            import timm

            name = s[len("timm:"):]
            if _WILDCARD.search(name):
                found = timm.list_models(name)
                if not found:
                    raise UnknownModelError(f"no timm model matches {name!r}")
                out += [f"timm:{n}" for n in found]
            elif not timm.is_model(name):
                import difflib

                close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
                hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
                raise UnknownModelError(f"unknown timm model {name!r}.{hint}")
            else:
                out.append(s)
        elif _WILDCARD.search(s):
            found = list_models(s)
            if not found:  # a pattern no zoo name matches: timm's names
                import timm

                found = [f"timm:{n}" for n in timm.list_models(s)]
            if not found:
                raise UnknownModelError(f"no zoo or timm model matches {s!r}; `python -m zoo list` shows the zoo's.")
            out += found
        else:
            from .validate import resolve_model_name

            out.append(resolve_model_name(s))  # a zoo name; a name only timm has -> timm:NAME; else close names
    return list(dict.fromkeys(out))  # drop duplicates, keep order


def _plan(name: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One job: everything the worker needs, validated here so bad sizes fail before any work."""
    img = opts.get("img_size")
    job = {k: opts[k] for k in _DEFAULTS}
    job["name"] = name
    if name.startswith("timm:"):
        c, h, w = _timm_default_size(name[len("timm:"):])
        job.update(kind="timm", spec=None, task="classification", in_chans=c,
                   size=(img, img) if img else (h, w), default_size=(h, w), bag_images=False)
        return job
    spec = get_spec(name)
    job.update(kind="zoo", spec=spec, task=spec.task, default_size=None)
    if spec.task == "mil":
        # feature bags [B, N, feat_dim] (in_dim=feat_dim is passed to the builder), or with
        # bag_images=True image bags [B, N, C, H, W] at the spec's instance size (no in_dim)
        bag_images = bool(opts.get("bag_images"))
        if bag_images and len(spec.input_size) != 3:
            raise ZooError(f"{name} has no instance image size in its spec; benchmark it on feature bags")
        size = ((img, img) if img else tuple(spec.input_size[-2:])) if bag_images else None
        job.update(bag_images=bag_images, size=size, in_chans=spec.input_size[0] if bag_images else None)
        return job
    size = (img, img) if img else tuple(spec.input_size[-2:])
    spec.check_input_size(size)
    job.update(bag_images=False, size=size, in_chans=spec.input_size[0])
    return job


_DEFAULTS: dict[str, Any] = dict(
    img_size=None, batch_size=32, device="cpu", amp=False, channels_last=False, compile=False,
    train=False, warmup=3, iters=10, bag_size=512, feat_dim=512, bag_images=False, model_kwargs=None, threads=None,
)


# ---------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS is a fair baseline."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory of the timed steps: ``start()`` just before them, ``stop()`` just after (see the
    module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            self.method = "cuda_max_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        gc.collect()
        _malloc_trim()
        self._rss0 = _proc_status_kb("VmRSS")
        if self._rss0 is not None and _reset_rss_peak():
            self.method = "rss_hwm"
        else:
            self.method, self._max0 = "ru_maxrss", _ru_maxrss_mb()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method == "rss_hwm":
            hwm = _proc_status_kb("VmHWM") or self._rss0
            self.mb = max(0, hwm - self._rss0) / 1024
        else:
            self.mb = max(0.0, _ru_maxrss_mb() - self._max0)


# ---------------------------------------------------------------------------------------- worker
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return _logits(out[0])
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _loss(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if target is None:
        return logits.mean()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), target.float())
    return F.cross_entropy(logits, target)


def _random_target(shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Random labels ``[B]`` for ``[B, C]`` logits, random masks ``[B, H, W]`` for ``[B, C, H, W]``
    (``C == 1``: binary targets for a BCE loss; other output shapes: no target, the loss is the mean)."""
    if len(shape) not in (2, 4):
        return None
    b, c = shape[:2]
    return torch.randint(0, c if c > 1 else 2, (b, *shape[2:]), device=device)


def _build(job: dict[str, Any]) -> nn.Module:
    if job["kind"] == "timm":
        import timm

        name = job["name"][len("timm:"):]
        if tuple(job["size"]) != tuple(job["default_size"]):
            try:  # ViT-style models need to know a non-default size at construction
                return timm.create_model(name, img_size=job["size"])
            except TypeError:
                pass
        return timm.create_model(name)
    from .registry import create_model

    kwargs = dict(job.get("model_kwargs") or {})
    if job["task"] == "mil" and not job["bag_images"]:
        kwargs.setdefault("in_dim", job["feat_dim"])
    return create_model(job["name"], **kwargs)


def _make_input(job: dict[str, Any], device: torch.device) -> torch.Tensor:
    b = job["batch_size"]
    if job["task"] == "mil":
        feat_dim = (job.get("model_kwargs") or {}).get("in_dim", job["feat_dim"])
        if job["bag_images"]:
            return torch.randn(b, job["bag_size"], job["in_chans"], *job["size"], device=device)
        return torch.randn(b, job["bag_size"], feat_dim, device=device)
    return torch.randn(b, job["in_chans"], *job["size"], device=device)


def _sig(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _cpu_sdpa_flops() -> dict:
    """torch's counter knows the CUDA attention kernels only; count CPU ``scaled_dot_product_attention``
    (``aten._scaled_dot_product_flash_attention_for_cpu``) the same way (its two matmuls)."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: flops}


def _sparse_kernel_flops() -> dict:
    """The counter does not know the sparse kernels; count the work they do: ``sparse_sampled_addmm`` (SDDMM)
    one length-``d`` dot product per stored entry, ``embedding_bag`` (CSR x dense SpMM) one row of the table per
    index (2 FLOPs per multiply-add, like the counter's own formulas)."""
    aten = torch.ops.aten

    def sddmm(pattern, mat1, mat2, *args, out_val=None, **kwargs) -> int:
        blocks = math.prod(pattern.shape[:-2])  # batched CSR: _nnz() is per batch entry
        return 2 * pattern._nnz() * blocks * mat1.shape[-1]

    def bag(weight, indices, *args, out_val=None, **kwargs) -> int:
        return 2 * indices.numel() * weight.shape[-1]

    sddmm._get_raw = bag._get_raw = True  # type: ignore[attr-defined]  # raw tensors: the shapes hide nnz
    return {aten.sparse_sampled_addmm: sddmm, aten._embedding_bag_forward_only: bag, aten._embedding_bag: bag}


def _count_gmacs(model: nn.Module, x1: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={**_cpu_sdpa_flops(), **_sparse_kernel_flops()})
    with torch.no_grad(), counter:
        model(x1)
    return counter.get_total_flops() / 2 / 1e9


def time_train_steps(model: nn.Module, batches: list, opt: torch.optim.Optimizer, *, warmup: int = 3,
                     iters: int = 10, device: torch.device | str = "cpu", amp: Any = None,
                     mem: _PeakMemory | None = None) -> float:
    """Mean seconds of one training step (zero_grad, forward, loss, backward, ``opt.step()``) over ``iters``
    steps, after ``max(1, warmup)`` untimed ones (the first creates grads and optimizer state). The steps
    cycle over ``batches``, a list of device-resident ``(x, target)`` (one pair: a fixed batch; target
    None: the loss is the mean of the logits). ``mem``, if given, is started and stopped around the timed steps."""
    device = torch.device(device)
    amp = amp if amp is not None else contextlib.nullcontext()

    def step(x: torch.Tensor, target: torch.Tensor | None) -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(x)
        _loss(_logits(out), target).backward()
        opt.step()

    for i in range(max(1, warmup)):
        step(*batches[i % len(batches)])
    _sync(device)
    if mem is not None:
        mem.start()
    t0 = time.perf_counter()
    for i in range(iters):
        step(*batches[i % len(batches)])
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    if mem is not None:
        mem.stop()
    return dt


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Benchmark one model in this process; returns its row."""
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    b, warmup, iters = job["batch_size"], max(0, job["warmup"]), max(1, job["iters"])
    size = job["size"]
    row: dict[str, Any] = {
        "model": job["name"], "task": job["task"],
        "img_size": (size[0] if size[0] == size[1] else list(size)) if size else None,
        "batch_size": b, "device": str(device), "dtype": "bfloat16" if job["amp"] else "float32",
        "threads": torch.get_num_threads(),
    }
    if job["task"] == "mil":
        row["bag_size"] = job["bag_size"]
        row["feat_dim"] = None if job["bag_images"] else (job.get("model_kwargs") or {}).get("in_dim", job["feat_dim"])

    model = _build(job).to(device).eval()
    x = _make_input(job, device)
    if job["channels_last"] and x.ndim == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    row["params_m"] = _sig(sum(p.numel() for p in model.parameters()) / 1e6)
    try:
        row["gflops"] = _sig(_count_gmacs(model, x[:1]))
    except Exception as e:  # noqa: BLE001 - e.g. FlexAttention cannot run under torch's counter: time it anyway
        row["gflops"], row["gflops_error"] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

    run = torch.compile(model) if job["compile"] else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if job["amp"] else contextlib.nullcontext()

    # ---- inference
    grad_off = torch.no_grad() if job["compile"] else torch.inference_mode()
    mem = _PeakMemory(device)
    with grad_off:
        with amp:
            out = run(x)
        out_shape = _logits(out).shape
        del out
        for _ in range(warmup):
            with amp:
                run(x)
        _sync(device)
        mem.start()
        t0 = time.perf_counter()
        for _ in range(iters):
            with amp:
                run(x)
        _sync(device)
        dt = (time.perf_counter() - t0) / iters
        mem.stop()
    target = _random_target(out_shape, device)  # made outside inference mode: usable by autograd
    row["infer_samples_per_sec"] = _sig(b / dt)
    row["infer_step_ms"] = _sig(dt * 1e3)
    row["infer_peak_mem_mb"] = _sig(mem.mb)
    row["peak_mem_method"] = mem.method

    # ---- training
    row["train_samples_per_sec"] = row["train_step_ms"] = row["train_peak_mem_mb"] = None
    if job["train"]:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        mem = _PeakMemory(device)
        dt = time_train_steps(run, [(x, target)], opt, warmup=warmup, iters=iters, device=device, amp=amp, mem=mem)
        row["train_samples_per_sec"] = _sig(b / dt)
        row["train_step_ms"] = _sig(dt * 1e3)
        row["train_peak_mem_mb"] = _sig(mem.mb)
        model.eval()
    peaks = [p for p in (row["infer_peak_mem_mb"], row["train_peak_mem_mb"]) if p is not None]
    row["peak_mem_mb"] = max(peaks) if peaks else None

    if capabilities(model).bench_extras:
        row.update(model.bench_extras(size[0] if size else None))
    return {k: row[k] for k in ROW_KEYS if k in row} | {k: v for k, v in row.items() if k not in ROW_KEYS}


class _SpecUnavailable(Exception):
    """The spawned process could not rebuild the parent's spec (e.g. its builder's module is not importable)."""


def _worker(conn, job: dict[str, Any]) -> None:
    """Entry point of a spawned benchmark process."""
    try:
        try:
            spec: ModelSpec | None = pickle.loads(job["spec"]) if job.get("spec") else None
        except Exception as e:  # noqa: BLE001
            conn.send(("spec_unavailable", f"{type(e).__name__}: {e}", ""))
            return
        if spec is not None:  # e.g. a model registered at run time in the parent (a test, a notebook)
            from . import registry

            registry._ensure_models_imported()
            registry._REGISTRY.setdefault(spec.name, spec)
        conn.send(("ok", _run_one({**job, "spec": spec})))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def _picklable_job(job: dict[str, Any]) -> dict[str, Any] | None:
    """The job with its spec pickled to bytes (unpickled in the child, inside a try), or None when the
    spec cannot be pickled at all (a lambda or local builder): such models run in this process."""
    try:
        return {**job, "spec": pickle.dumps(job["spec"]) if job.get("spec") is not None else None}
    except Exception:  # noqa: BLE001
        return None


def _run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(child, job), daemon=True)
    proc.start()
    child.close()
    try:
        msg = parent.recv()
    except EOFError:
        msg = None
    proc.join()
    if msg is None:
        why = " (killed: out of memory?)" if proc.exitcode in (-9, 137) else ""
        raise BenchmarkError(f"benchmark worker for {job['name']} died with exit code {proc.exitcode}{why}")
    if msg[0] == "spec_unavailable":
        raise _SpecUnavailable(msg[1])
    if msg[0] == "error":
        raise BenchmarkError(f"{job['name']}: {msg[1]}", msg[2])
    return msg[1]


def _run_here(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return _run_one(job)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BenchmarkError(f"{job['name']}: {type(e).__name__}: {e}", traceback.format_exc()) from e


# ---------------------------------------------------------------------------------------- public API
def benchmark(
    specs: list[str] | str,
    *,
    img_size: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,  # noqa: A002 - mirrors the --compile flag
    train: bool = False,
    warmup: int = 3,
    iters: int = 10,
    bag_size: int = 512,
    feat_dim: int = 512,
    bag_images: bool = False,
    threads: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    isolate: bool = True,
    errors: str = "raise",
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Benchmark zoo models and ``timm:NAME`` references one after another; one row (dict) per model.

    ``specs``: zoo names, wildcards over zoo names (``"halonet*"``) or ``"timm:NAME"``; a name (or pattern)
    only timm knows is timm's, as with ``timm:``.
    ``img_size``: square side; default each model's own input size (checked against its size rules).
    MIL models (task ``"mil"``) get ``batch_size`` bags of ``bag_size`` instances of ``feat_dim``
    features (``in_dim=feat_dim`` is passed to the builder), or with ``bag_images=True`` bags of
    images at their spec's instance size (or ``img_size``) for models with an instance encoder.
    ``model_kwargs`` go to ``zoo.create_model`` (zoo models only).
    ``isolate``: run each model in a fresh ``spawn`` subprocess (models whose spec cannot be pickled,
    e.g. a lambda builder, run in this process; their row says ``isolated: False``).
    ``errors``: ``"raise"`` (a :class:`BenchmarkError`) or ``"row"`` (the row gets an ``error`` key
    and ``None`` numbers, and the remaining models still run).
    ``threads``: ``torch.set_num_threads`` in the worker (default: torch's own choice; each row says).
    ``progress``: optional callable ``progress(name)`` called before each model.

    See the module docstring for what each number means (``gflops`` are multiply-adds).
    """
    if isinstance(specs, str):
        specs = [specs]
    if errors not in ("raise", "row"):
        raise ValueError("errors must be 'raise' or 'row'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZooError("--device cuda asked for, but torch.cuda.is_available() is False on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ZooError(f"device must be cpu or cuda[:N], got {device!r}")
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ZooError("batch size and iters must be >= 1 and warmup >= 0")
    if img_size is not None and img_size < 1:
        raise InputSizeError(f"img_size must be positive, got {img_size}")
    opts = dict(
        img_size=img_size, batch_size=batch_size, device=device, amp=amp, channels_last=channels_last,
        compile=compile, train=train, warmup=warmup, iters=iters, bag_size=bag_size, feat_dim=feat_dim,
        bag_images=bag_images, threads=threads, model_kwargs=dict(model_kwargs or {}),
    )
    jobs = [_plan(name, opts) for name in _expand(list(specs))]

    rows = []
    for job in jobs:
        if progress is not None:
            progress(job["name"])
        sent = _picklable_job(job) if isolate else None
        isolated = sent is not None
        try:
            if isolated:
                try:
                    row = _run_isolated(sent)
                except _SpecUnavailable:
                    isolated = False
                    row = _run_here(job)
            else:
                row = _run_here(job)
        except ZooError as e:
            if errors == "raise":
                raise
            row = {"model": job["name"], "task": job["task"], "batch_size": batch_size, "device": device,
                   **{k: None for k in ROW_KEYS[6:]}, "error": " ".join(str(e.args[0] if e.args else e).split())}
        row["isolated"] = isolated
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if spec == "rate" and isinstance(v, (int, float)):
        return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def format_table(rows: list[dict[str, Any]], title: str | None = None):
    """The rows as a ``rich.table.Table``: model, params(M), GFLOPs, infer/s, train/s, step ms, peak MB."""
    from rich.markup import escape
    from rich.table import Table

    device = rows[0]["device"] if rows else ""
    table = Table(title=title or f"benchmark ({device})", title_justify="left")
    table.add_column("model", style="bold", no_wrap=True)
    table.add_column("img", justify="right")
    table.add_column("params(M)", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column("infer/s", justify="right")
    table.add_column("train/s", justify="right")
    table.add_column("step ms (inf/train)", justify="right")
    table.add_column("peak MB", justify="right")
    std = set(ROW_KEYS) | {"bag_size", "feat_dim", "error"}
    extra_keys = list(dict.fromkeys(k for r in rows for k in r if k not in std))
    for k in extra_keys:
        table.add_column(k, justify="right")
    for r in rows:
        if r.get("error"):
            msg = escape(r["error"][:120])
            table.add_row(r["model"], "", "", "", f"[red]{msg}[/red]", *[""] * (3 + len(extra_keys)))
            continue
        img = r.get("img_size")
        if r.get("task") == "mil":
            img = f"{r.get('bag_size')}x{r.get('feat_dim') or img}"
        step = _fmt(r.get("infer_step_ms"), ".4g")
        if r.get("train_step_ms") is not None:
            step += f" / {_fmt(r['train_step_ms'], '.4g')}"
        table.add_row(
            r["model"], _fmt(img), _fmt(r.get("params_m"), ".3f"), _fmt(r.get("gflops"), ".3g"),
            _fmt(r.get("infer_samples_per_sec"), "rate"), _fmt(r.get("train_samples_per_sec"), "rate"),
            step, _fmt(r.get("peak_mem_mb"), ".1f"), *[_fmt(r.get(k)) for k in extra_keys],
        )
    return table

