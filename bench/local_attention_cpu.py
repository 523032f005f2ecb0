"""CPU side by side of the local / sparse attention executions (issue #21 item 2): HaloNet ``attn_impl`` and
Sparsifiner ``execution``, each model's variants on the same weights in ONE process, steps interleaved.

    OMP_NUM_THREADS=1 python bench/local_attention_cpu.py --out local_attention_cpu.json
    OMP_NUM_THREADS=1 python bench/local_attention_cpu.py --models halonet_tiny --batch-size 2 --rounds 1  # smoke

For each model every variant runs one inference step (eval, ``torch.inference_mode``) per round, then one
training step (train mode, forward + cross-entropy + backward; variants without autograd are skipped), the
variants taking turns; the table gives the median img/s over ``--rounds`` (after one warm-up step each), by wall
clock and by the process's CPU time (steadier on a loaded machine), and their ratios to the variant that was
the default before issue #21 ("today"). Only the ratios mean something on
a shared machine: label them "N thread(s), loaded machine, ratio in one process". Every variant's logits are
checked against today's first (fp32, eval, norm scales randomised so that every attention layer shows in the
logits): ``max_abs_logit_diff``.

JSON written to ``--out``::

    {"meta": {"torch": "2.14.1", "threads": 1, "batch_size": 8, "rounds": 3, "loadavg": [2.1, 2.0, 1.9],
              "label": "1 thread, loaded machine, ratio in one process"},
     "rows": [{"model": "halonet26t", "img_size": 256, "variant": "sdpa", "kwargs": {"attn_impl": "sdpa"},
               "today": false, "default": true, "mode": "infer", "img_s": 1.42, "ratio_vs_today": 1.09,
               "cpu_img_s": 2.9, "cpu_ratio_vs_today": 1.1, "max_abs_logit_diff": 3e-7}]}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.registry import create_model, get_spec  # noqa: E402

# model -> [(variant label, model kwargs, has autograd)], today's (the pre-#21 default) first
HALO = [("timm", {"attn_impl": "timm"}, True), ("sdpa", {"attn_impl": "sdpa"}, True)]
SPARSE = [("csr", {"execution": "csr"}, False), ("gather", {"execution": "gather"}, True),
          ("sdpa", {"execution": "sdpa"}, True), ("masked", {"execution": "masked"}, True)]
CASES = {"halonet26t": HALO, "halonet_tiny": HALO, "sparsifiner_deit_small": SPARSE, "sparsifiner_deit_tiny": SPARSE}
# today's default per mode (before issue #21): HaloNet timm's forward; Sparsifiner csr at inference, gather in training
TODAY = {"halonet": {"infer": "timm", "train": "timm"}, "sparsifiner": {"infer": "csr", "train": "gather"}}


def _defaults(model: str) -> dict[str, str]:
    """The variant each mode runs with the model's default kwargs now (read from the code, not assumed)."""
    if model.startswith("halonet"):
        from zoo.models.halonet import ATTN_IMPL
        return {"infer": ATTN_IMPL, "train": ATTN_IMPL}
    attn = create_model(model).blocks[0].attn
    return {"infer": attn.resolved_execution(grad=False), "train": attn.resolved_execution(grad=True)}


def _wake_norms(model: torch.nn.Module) -> None:
    """Random norm scales: HaloNet zero-initialises the last BN of every block, which would hide the attention
    from the logits (and from the logit check)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)


def _median_img_s(steps: dict, batch: int, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median img/s per step over ``rounds`` (after one warm-up each), steps taking turns: by wall clock and by
    this process's CPU time (``time.process_time``: on a loaded machine it leaves out the time the process
    waited for a core)."""
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for f in steps.values():  # warm-up
        f()
    for _ in range(rounds):
        for k, f in steps.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return ({k: batch / statistics.median(v) for k, v in wall.items()},
            {k: batch / statistics.median(v) for k, v in cpu.items()})


def run_model(name: str, batch: int, rounds: int, train: bool = True) -> list[dict]:
    variants = CASES[name]
    size = get_spec(name).input_size[-1]
    torch.manual_seed(0)
    models = {}
    for label, kw, _ in variants:
        models[label] = create_model(name, **kw)
        if len(models) == 1:
            _wake_norms(models[label])
        else:
            models[label].load_state_dict(next(iter(models.values())).state_dict())
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, models[variants[0][0]].num_classes, (batch,))
    family = "halonet" if name.startswith("halonet") else "sparsifiner"
    defaults = _defaults(name)
    with torch.inference_mode():
        logits = {k: m.eval()(x) for k, m in models.items()}
        ref = logits[TODAY[family]["infer"]]
        diffs = {k: (v - ref).abs().max().item() for k, v in logits.items()}

        def infer(m):
            return lambda: m(x)
        speeds = {"infer": _median_img_s({k: infer(m) for k, m in models.items()}, batch, rounds)}

    def step(m):
        def f():
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        return f
    if train:
        trainable = {label: models[label].train() for label, _, grad in variants if grad}
        speeds["train"] = _median_img_s({k: step(m) for k, m in trainable.items()}, batch, rounds)
    rows = []
    for mode, (wall, cpu) in speeds.items():
        today = TODAY[family][mode]
        for label, kw, _ in variants:
            if label in wall:
                rows.append(dict(model=name, img_size=size, variant=label, kwargs=kw, today=label == today,
                                 default=label == defaults[mode], mode=mode, img_s=round(wall[label], 3),
                                 ratio_vs_today=round(wall[label] / wall[today], 3), cpu_img_s=round(cpu[label], 3),
                                 cpu_ratio_vs_today=round(cpu[label] / cpu[today], 3),
                                 max_abs_logit_diff=diffs[label]))
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant and mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--out", default="local_attention_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    label = f"{args.threads} thread{'s' if args.threads > 1 else ''}, loaded machine, ratio in one process"
    rows = []
    print(f"{'model':24s} {'mode':5s} {'variant':8s} {'img/s':>8s} {'x today':>8s} {'cpu img/s':>9s} {'x today':>8s} "
          f"{'max|dlogit|':>11s}  ({label})")
    for name in args.models:
        for r in run_model(name, args.batch_size, args.rounds, train=not args.no_train):
            rows.append(r)
            flag = " (today)" if r["today"] else ""
            flag += " (default)" if r["default"] else ""
            print(f"{r['model']:24s} {r['mode']:5s} {r['variant']:8s} {r['img_s']:8.2f} {r['ratio_vs_today']:8.2f} "
                  f"{r['cpu_img_s']:9.2f} {r['cpu_ratio_vs_today']:8.2f} {r['max_abs_logit_diff']:11.1e} {flag}", flush=True)
    meta = dict(torch=torch.__version__, threads=args.threads, batch_size=args.batch_size, rounds=args.rounds,
                loadavg=[round(v, 2) for v in os.getloadavg()], label=label)
    result = dict(meta=meta, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
