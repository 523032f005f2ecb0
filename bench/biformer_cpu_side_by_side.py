"""BiFormer-T on CPU, fp32: the zoo's attention implementations (vs the official code with ``--official DIR``)
in one process, steps interleaved (round-robin, so machine load hits every model alike), median step time ->
img/s, by wall clock and by the process's CPU time (``time.process_time``; steadier on a loaded machine).

    python bench/biformer_cpu_side_by_side.py --official /tmp/BiFormer --batch-size 8 --rounds 5 --threads 1

``--impls`` (default ``gather flex``): zoo ``attn_impl`` values; "gather" is the default (it runs the dense-
routed layers as "masked", see ``zoo.models.biformer``). Training (forward, cross-entropy, backward, SGD step)
skips flex: torch 2.14 has no FlexAttention backward on CPU. All models share the official model's weights when
``--official`` is given (logits compared: ``max_abs_logit_diff`` against the official, else against the first
impl). Prints one JSON line::

    {"model": "biformer_tiny", "batch_size": 8, "img_size": 224, "rounds": 5, "threads": 1,
     "inference": {impl: img/s}, "training": {impl: img/s},                 # wall clock
     "inference_cpu": {impl: img/s}, "training_cpu": {impl: img/s},         # process CPU time
     "ratio_vs_official": {"inference": {impl: x}, "training": ..., "inference_cpu": ..., "training_cpu": ...},
     "max_abs_logit_diff": {impl: d}}
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_attention  # noqa: E402  (its official-model loader)

from zoo.layers.routing_attention import ATTN_IMPLS  # noqa: E402
from zoo.models.biformer import checkpoint_filter  # noqa: E402
from zoo.registry import create_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="biformer_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per model (after one warmup step)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--impls", nargs="+", default=["gather", "flex"], choices=ATTN_IMPLS)
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--official", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {impl: create_model(args.model, attn_impl=impl) for impl in args.impls}
    if args.official:
        os.environ[gpu_attention._OFFICIAL_ENV] = str(Path(args.official).resolve())
        models["official"] = gpu_attention.OFFICIAL[args.model]()
        sd = checkpoint_filter(models["official"].state_dict(), models[args.impls[0]])
    else:
        sd = models[args.impls[0]].state_dict()
    for impl in args.impls:
        models[impl].load_state_dict(sd)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    with torch.no_grad():
        logits = {n: m.eval()(x) for n, m in models.items()}
    ref = logits["official" if args.official else args.impls[0]]

    def infer(m):
        m.eval()
        with torch.no_grad():
            m(x)

    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for m in models.values()}

    def train(m):
        m.train()
        opt = opts[id(m)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()

    result = dict(model=args.model, batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds,
                  threads=torch.get_num_threads())
    phases = (("inference", infer),) if args.no_train else (("inference", infer), ("training", train))
    for phase, step in phases:
        names = [n for n in models if not (phase == "training" and n == "flex")]
        wall, cpu = {n: [] for n in names}, {n: [] for n in names}
        for r in range(args.rounds + 1):  # round 0: warmup (and flex's compiles)
            for n in names:
                t0, c0 = time.perf_counter(), time.process_time()
                step(models[n])
                if r:
                    wall[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)
        result[phase] = {n: round(args.batch_size / statistics.median(t), 3) for n, t in wall.items()}
        result[f"{phase}_cpu"] = {n: round(args.batch_size / statistics.median(t), 3) for n, t in cpu.items()}
    if args.official:
        result["ratio_vs_official"] = {k: {n: round(v / result[k]["official"], 3) for n, v in result[k].items()}
                                       for k in result if k.startswith(("inference", "training"))}
    result["max_abs_logit_diff"] = {n: (v - ref).abs().max().item() for n, v in logits.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
