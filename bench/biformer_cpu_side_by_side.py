"""BiFormer-T on CPU, fp32: gather vs flex (vs the official code with ``--official DIR``) in one process, steps
interleaved (round-robin, so machine load hits every model alike), median step time -> img/s.

    python bench/biformer_cpu_side_by_side.py --official /tmp/BiFormer --batch-size 8 --rounds 5

Training (forward, cross-entropy, backward, SGD step) skips flex: torch 2.14 has no FlexAttention backward on
CPU. Prints one JSON line: {"inference": {impl: img/s}, "training": {impl: img/s}, ...}.
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

from zoo.registry import create_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="biformer_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per model (after one warmup step)")
    p.add_argument("--official", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = {impl: create_model(args.model, attn_impl=impl) for impl in ("gather", "flex")}
    models["flex"].load_state_dict(models["gather"].state_dict())
    if args.official:
        os.environ[gpu_attention._OFFICIAL_ENV] = str(Path(args.official).resolve())
        models["official"] = gpu_attention.OFFICIAL[args.model]()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))

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
    for phase, step in (("inference", infer), ("training", train)):
        names = [n for n in models if not (phase == "training" and n == "flex")]
        times = {n: [] for n in names}
        for r in range(args.rounds + 1):  # round 0: warmup (and flex's compiles)
            for n in names:
                t0 = time.perf_counter()
                step(models[n])
                if r:
                    times[n].append(time.perf_counter() - t0)
        result[phase] = {n: round(args.batch_size / statistics.median(t), 3) for n, t in times.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
