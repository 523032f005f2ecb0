"""GPU benchmark of issue #21: BiFormer-T gather vs flex (vs the official code), HaloNet's and Sparsifiner's
attention executions, and every architecture of the issue against its reference, bf16 inference and training,
torch.compile on and off. One JSON out.

    python bench/gpu_attention.py --out bench_h200.json                       # the whole table, on cuda
    python bench/gpu_attention.py --official /tmp/BiFormer --models biformer_tiny
    python bench/gpu_attention.py --device cpu --batch-size 2 --steps 2 --models biformer_nano   # smoke test

``--official DIR``: a local copy of rayleizhu/BiFormer (never part of this repository); its ``biformer_tiny``
and ``biformer_small`` join the BiFormer rows as ``impl: "official"`` (their random init: speed does not
depend on the weights; ``fairscale``, which the official module imports but these configs never call, may be
absent). Every other architecture is measured against the timm model it is built on.

Timing, memory and FLOPs come from :func:`zoo.bench.benchmark` (one spawned process per row; see its
docstring). ``--steps`` is both its warmup and its timed iterations. On CPU flex rows are inference only
(torch 2.14 has no FlexAttention backward on CPU) and ``--compile`` defaults to ``off`` (``both`` on CUDA).

JSON written to ``--out`` (default ``gpu_attention.json``)::

    {"meta": {"torch": "2.14.1", "device": "NVIDIA H200", "batch_size": 128, "steps": 20, "dtype": "bfloat16",
              "peak_tflops": 989.0, "official": "/tmp/BiFormer" | null},
     "checks": [{"model": "biformer_tiny", "img_size": 224, "max_abs_logit_diff": 3e-7,
                 "max_abs_grad_diff": 1e-6 | null}],        # flex vs gather, fp32, same weights
     "rows": [{"label": "biformer_tiny/flex", "model": "biformer_tiny", "impl": "flex",
               "model_kwargs": {"attn_impl": "flex"}, "reference_of": null, "compile": true,
               "img_size": 224, "batch_size": 128, "params_m": 13.1, "gmacs": 2.2,
               "infer_img_s": 4700.0, "train_img_s": 1300.0,
               "infer_peak_mem_mb": 885.0, "train_peak_mem_mb": 9573.0,
               "infer_tflops": 20.7, "train_tflops": 17.2, "infer_peak_share": 0.021, "train_peak_share": 0.017,
               "error": null}]}

``VARIANTS`` (halonet26t: ``attn_impl`` timm / sdpa; sparsifiner_deit_small: ``execution`` csr / sdpa / gather /
masked) are rows labelled ``MODEL/IMPL`` with ``impl`` the variant (csr: inference only, it has no backward),
the timm reference standing beside the first; their ``checks`` entry::

    {"model": "halonet26t", "img_size": 256, "reference": "timm",
     "max_abs_logit_diff": {"timm": 0.0, "sdpa": 3e-7}, "max_abs_grad_diff": {"timm": 0.0, "sdpa": 1e-6}}

``gmacs``: multiply-adds per image (``zoo.bench``'s ``gflops``); for every BiFormer implementation it is the
gather row's count (the same work; torch's FLOP counter does not see inside FlexAttention).
``*_tflops``: achieved ``2 * gmacs * img/s`` (training: three times the forward's FLOPs, forward + backward);
``*_peak_share``: that over ``--peak-tflops``. ``reference_of``: the label of the row a timm reference
stands beside. A row that failed keeps its label with ``error`` set and null numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.bench import benchmark  # noqa: E402
from zoo.registry import create_model, get_spec, list_models, register_model  # noqa: E402

# the issue's table: (zoo model, its kwargs, image size or None for the spec's, reference)
TABLE = [
    ("biformer_tiny", {}, None, None),
    ("biformer_small", {}, None, None),
    ("halonet26t", {}, None, "timm:halonet26t"),
    ("dependencyvit_tiny", {}, None, "timm:deit_tiny_patch16_224"),
    ("sparsifiner_deit_small", {}, None, "timm:deit_small_patch16_224"),
    ("sparsifiner_deit_small", {"token_keep_rate": 0.7}, None, None),  # with token pruning (the paper's 0.7)
    ("ulsam_mobilenetv2_100", {}, None, "timm:mobilenetv2_100"),
    ("promptcam_vit_base_dino", {"num_classes": 200}, None, "timm:vit_base_patch16_224.dino"),
    ("dcal_deit_tiny", {}, 448, "timm:deit_tiny_patch16_224"),
    ("msguided_resnet101", {}, 256, "timm:resnet101"),
]
# issue #21 item 2: the attention executions of these models, one row each (label, kwargs, has a backward); the
# first is the one that was the default before (HaloNet: timm's forward; Sparsifiner: csr at inference)
VARIANTS = {
    "halonet26t": [("timm", {"attn_impl": "timm"}, True), ("sdpa", {"attn_impl": "sdpa"}, True)],
    "sparsifiner_deit_small": [("csr", {"execution": "csr"}, False), ("sdpa", {"execution": "sdpa"}, True),
                               ("gather", {"execution": "gather"}, True), ("masked", {"execution": "masked"}, True)],
}
_OFFICIAL_ENV = "ZOO_BIFORMER_OFFICIAL"  # read by the spawned workers, which do not see our argv


def _official(name: str):
    """The official model ``name`` from the copy in ``$ZOO_BIFORMER_OFFICIAL``."""
    root = os.environ[_OFFICIAL_ENV]
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import fairscale  # noqa: F401
    except ImportError:  # imported by the official module, called only for use_checkpoint_stages (none here)
        import types
        fs = types.ModuleType("fairscale.nn.checkpoint")
        fs.checkpoint_wrapper = lambda m, **kw: m
        sys.modules.update({"fairscale": types.ModuleType("fairscale"), "fairscale.nn": types.ModuleType("fairscale.nn"),
                            "fairscale.nn.checkpoint": fs})
    import importlib
    return getattr(importlib.import_module("models.biformer"), name)()


def official_biformer_tiny(pretrained: bool = False, **kwargs):
    return _official("biformer_tiny")


def official_biformer_small(pretrained: bool = False, **kwargs):
    return _official("biformer_small")


OFFICIAL = {"biformer_tiny": official_biformer_tiny, "biformer_small": official_biformer_small}


def _register_official(root: str) -> None:
    """Make the official builders zoo models (only with --official: they need the copy)."""
    os.environ[_OFFICIAL_ENV] = str(Path(root).resolve())
    for fn in OFFICIAL.values():
        if fn.__name__ not in list_models():
            register_model(fn, source="rayleizhu/BiFormer, a local copy (--official)")


def plan(models: list[str] | None, official: bool) -> list[dict]:
    """Rows to run: BiFormer models as gather, flex (and official); the rest as zoo model + its reference."""
    table = [t for t in TABLE if models is None or t[0] in models]
    table += [(m, {}, None, None) for m in (models or []) if m not in {t[0] for t in TABLE}]
    rows = []
    for name, kwargs, img, ref in table:
        if name.startswith("biformer_"):
            for impl in ("gather", "flex"):
                rows.append(dict(label=f"{name}/{impl}", model=name, impl=impl, kw={**kwargs, "attn_impl": impl},
                                 img=img, flops_of=f"{name}/gather", reference_of=None))
            if official and name in OFFICIAL:
                rows.append(dict(label=f"{name}/official", model=f"official_{name}", impl="official", kw={},
                                 img=img, flops_of=f"{name}/gather", reference_of=f"{name}/gather"))
            continue
        label = name + "".join(f"[{k}={v}]" for k, v in kwargs.items())
        if name in VARIANTS:  # one row per attention execution; FLOPs as counted for each (they differ)
            first = None
            for impl, kw, grad in VARIANTS[name]:
                rows.append(dict(label=f"{label}/{impl}", model=name, impl=impl, kw={**kwargs, **kw}, img=img,
                                 flops_of=None, reference_of=None, train=grad))
                first = first or f"{label}/{impl}"
            if ref:
                rows.append(dict(label=ref, model=ref, impl="timm", kw={}, img=img, flops_of=None, reference_of=first))
            continue
        rows.append(dict(label=label, model=name, impl="zoo", kw=kwargs, img=img, flops_of=None, reference_of=None))
        if ref:
            rows.append(dict(label=ref, model=ref, impl="timm", kw={}, img=img, flops_of=None, reference_of=label))
    return rows


def flex_check(model: str, device: str) -> dict:
    """flex vs gather on the same weights, fp32: max |logit diff| and, except on CPU (no flex backward there),
    max |grad diff| over the parameters."""
    torch.manual_seed(0)
    g = create_model(model).to(device)
    f = create_model(model, attn_impl="flex").to(device)
    f.load_state_dict(g.state_dict())
    size = get_spec(model).input_size[-1]
    x = torch.randn(2, 3, size, size, device=device)
    grads = device != "cpu"
    with torch.enable_grad() if grads else torch.inference_mode():  # as the benchmark's: reuses its compiles
        a, b = g(x), f(x)
    gdiff = None
    if grads:
        for out in (a, b):
            out.square().mean().backward()
        gdiff = max((pg.grad - pf.grad).abs().max().item() for pg, pf in zip(g.parameters(), f.parameters()))
    return dict(model=model, img_size=size, max_abs_logit_diff=(a - b).abs().max().item(), max_abs_grad_diff=gdiff)


def variant_check(model: str, device: str) -> dict:
    """Every execution of ``VARIANTS[model]`` against the first on the same weights, fp32: max |logit diff|
    (eval) per variant and, for the differentiable ones, max |grad diff| over the parameters against the first
    differentiable one (train mode). Norm scales are randomised (HaloNet zero-initialises its blocks' last BN,
    which would hide the attention)."""
    torch.manual_seed(0)
    nets = {impl: create_model(model, **kw).to(device) for impl, kw, _ in VARIANTS[model]}
    first = next(iter(nets.values()))
    for m in first.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    for m in nets.values():
        m.load_state_dict(first.state_dict())
    size = get_spec(model).input_size[-1]
    x = torch.randn(2, 3, size, size, device=device)
    with torch.no_grad():
        logits = {impl: m.eval()(x) for impl, m in nets.items()}
    ref = next(iter(logits.values()))
    grads = {}
    for impl, _, grad in VARIANTS[model]:
        if grad:
            nets[impl].train()(x).square().mean().backward()
            grads[impl] = [p.grad for p in nets[impl].parameters() if p.grad is not None]
    gref = next(iter(grads.values()))
    return dict(model=model, img_size=size, reference=next(iter(nets)),
                max_abs_logit_diff={impl: (v - ref).abs().max().item() for impl, v in logits.items()},
                max_abs_grad_diff={impl: max((a - b).abs().max().item() for a, b in zip(g, gref))
                                   for impl, g in grads.items()})


def run(args) -> dict:
    if args.official:
        _register_official(args.official)
    compiles = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile or
                                                                        ("off" if args.device == "cpu" else "both")]
    amp = args.dtype == "bf16"
    out_rows, gmacs = [], {}
    for r in plan(args.models, bool(args.official)):
        train = not (r["impl"] == "flex" and args.device == "cpu") and r.get("train", True)
        for comp in compiles:
            got = benchmark(r["model"], img_size=r["img"], batch_size=args.batch_size, device=args.device, amp=amp,
                            compile=comp, train=train, warmup=args.steps, iters=args.steps,
                            model_kwargs=r["kw"] if r["impl"] != "timm" else None,
                            isolate=not args.no_isolate, errors="row")[0]
            gmacs.setdefault((r["label"], comp), got.get("gflops"))
            mac = gmacs.get((r["flops_of"], comp)) if r["flops_of"] else got.get("gflops")
            row = dict(label=r["label"], model=r["model"], impl=r["impl"], model_kwargs=r["kw"],
                       reference_of=r["reference_of"], compile=comp, img_size=got.get("img_size"),
                       batch_size=args.batch_size, params_m=got.get("params_m"), gmacs=mac,
                       infer_img_s=got.get("infer_samples_per_sec"), train_img_s=got.get("train_samples_per_sec"),
                       infer_peak_mem_mb=got.get("infer_peak_mem_mb"), train_peak_mem_mb=got.get("train_peak_mem_mb"),
                       error=got.get("error"))
            for phase, mult in (("infer", 1), ("train", 3)):
                ips = row[f"{phase}_img_s"]
                tf = mult * 2 * mac * ips / 1e3 if mac and ips else None  # GMAC/img * img/s -> TFLOP/s
                row[f"{phase}_tflops"] = tf
                row[f"{phase}_peak_share"] = tf / args.peak_tflops if tf else None
            out_rows.append(row)
            print(f"{row['label']:48s} compile={comp!s:5s} infer {row['infer_img_s']} img/s  "
                  f"train {row['train_img_s']} img/s  {row['error'] or ''}", flush=True)
    checks = [flex_check(m, args.device) for m in dict.fromkeys(r["model"] for r in plan(args.models, False)
                                                                  if r["impl"] == "flex")]
    checks += [variant_check(m, args.device) for m in dict.fromkeys(r["model"] for r in plan(args.models, False)
                                                                     if r["model"] in VARIANTS)]
    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if args.device.startswith("cuda")
                else "cpu", batch_size=args.batch_size, steps=args.steps,
                dtype="bfloat16" if amp else "float32", peak_tflops=args.peak_tflops, official=args.official)
    return dict(meta=meta, checks=checks, rows=out_rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="warmup steps, then as many timed steps")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", choices=("both", "on", "off"), default=None, help="default: both on cuda, off on cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200: 989)")
    p.add_argument("--official", default=None, help="a local copy of rayleizhu/BiFormer")
    p.add_argument("--models", nargs="+", default=None, help="zoo names (default: the issue's table)")
    p.add_argument("--out", default="gpu_attention.json")
    p.add_argument("--no-isolate", action="store_true", help="all rows in this process (faster, for tests)")
    args = p.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
