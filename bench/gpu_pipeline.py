"""The GPU pipeline benchmark of the training-at-scale issue, prepared to run in one call on a CUDA machine.

For each model, on one generated ImageNet-layout folder of real 224 px JPEGs (written once under --cache on
the machine's own disk), ``zoo.bench_pipeline`` measures (a) the net's train step on device-resident batches,
(b) the loader alone, (c) train.py's steps, with ``trainer=gpu`` (bf16 autocast, fused AdamW) and
``data.gpu_decode`` off and on (JPEGs decoded by the workers with PIL, or batched on the GPU with nvJPEG)::

    python bench/gpu_pipeline.py --out pipeline_h200.json                  # the issue's three models
    python bench/gpu_pipeline.py --device cpu --models halonet_tiny --batch-size 8 --img-size 32 \\
        --images 64 --steps 1 --workers 0 --out /tmp/smoke.json             # CPU smoke test

``deit_small`` is timm's ``deit_small_patch16_224`` (the reference the issue names), registered in this process
only as a zoo classification model so that train.py's own pipeline runs it.

Output (``--out``): ``{"device": str, "torch": str, "date": str, "args": {...}, "runs": [r, ...]}`` where each
``r`` is :func:`zoo.bench_pipeline.bench_pipeline`'s dict plus ``"gpu_decode": bool``, ``"compile": bool`` and
``"target_met"`` (``train_over_net >= 0.9``), or ``{"model", "gpu_decode", "error"}`` when a run failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("biformer_tiny", "sparsifiner_deit_small", "deit_small")


def register_deit_small() -> None:
    import timm

    from zoo import register_model
    from zoo.registry import list_models

    if "deit_small" in list_models():
        return

    @register_model(name="deit_small", input_size=(3, 224, 224), fixed_input_size=True, interpolation="bicubic",
                    crop_pct=0.875, source="timm deit_small_patch16_224 (benchmark reference)")
    def deit_small(pretrained: bool = False, **kwargs):
        return timm.create_model("deit_small_patch16_224", pretrained=pretrained, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=None, help="train size (default: the model's)")
    p.add_argument("--images", type=int, default=128 * 24, help="JPEGs in the generated set")
    p.add_argument("--size", default="256x256", help="WxH of the generated JPEGs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also run with trainer.compile=true")
    p.add_argument("--cache", default=None, help="where the JPEG set is written (default: ~/.cache/attention_zoo)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from zoo.bench_pipeline import bench_pipeline, parse_size

    if "deit_small" in a.models:  # only when asked: the registry is process-wide
        register_deit_small()
    trainer = ["trainer=gpu"] if a.device == "cuda" else ["trainer=cpu"]
    runs = []
    for model in a.models:
        for decode in (False, True):
            for compiled in (False, True) if a.compile else (False,):
                over = [*trainer, f"data.num_workers={a.workers}", f"data.gpu_decode={str(decode).lower()}",
                        f"trainer.compile={str(compiled).lower()}"]
                try:
                    r = bench_pipeline(model, over, batch_size=a.batch_size, img_size=a.img_size, steps=a.steps,
                                       workers=[a.workers], synthetic={"n": a.images, "size": parse_size(a.size),
                                                                        "cache": a.cache})
                    r.update(gpu_decode=decode, compile=compiled, target_met=r["train_over_net"] >= 0.9)
                except Exception as e:  # one failed row must not lose the others
                    r = {"model": model, "gpu_decode": decode, "compile": compiled, "error": f"{type(e).__name__}: {e}"}
                print(json.dumps({k: r.get(k) for k in ("model", "gpu_decode", "compile", "net_img_s", "train_img_s",
                                                        "train_over_net", "bound", "error")}), flush=True)
                runs.append(r)
    out = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "args": vars(a), "runs": runs}
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
