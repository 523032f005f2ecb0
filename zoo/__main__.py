"""The zoo's command line: ``python -m zoo list|info|bench|explain|predict|export|save|push|...`` (console script: ``zoo``).

  python -m zoo list 'halonet*' --task classification [--json]
  python -m zoo info halonet_tiny
  python -m zoo table [--write README.md]
  python -m zoo bench 'halonet*' timm:resnet18 --img-size 64 --batch-size 8 --train [--json]
  python -m zoo bench-pipeline halonet_tiny --data data=digits [--synthetic-jpeg 500 --size 224x224] [--workers 0,1,2] [--json]
  python -m zoo explain --model biformer_tiny --pretrained-file w.safetensors cat.jpg --out maps/
  python -m zoo explain --ckpt outputs/.../best.ckpt img1.png img2.png --out maps/ [--top-traits 4]
  python -m zoo predict --ckpt outputs/.../best.ckpt photos/ list.csv --out preds/ [--top-k 3] [--explain]
  python -m zoo save outputs/.../checkpoints/best.ckpt --out my-net/ [--overwrite]   # a Hub folder
  python -m zoo push outputs/.../checkpoints/best.ckpt --repo ORG/NAME [--private] [--dry-run DIR]
  python -m zoo results multirun/train/DATE [--metric test/acc] [--x optim.lr] [--out DIR] [--metrics A,B]  # a sweep's table + plot (+ mean ± std over seeds)
  python -m zoo prepare chaos CHAOS_Train_Sets/ --out data/chaos [--sequences T1DUAL_in] [--overwrite]   # DICOM -> slices

Errors the zoo raises on purpose (``zoo.ZooError``) print as one red line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .contract import capabilities, overlay_style
from .errors import ZooError
from .spec import resolve_run_input, stored_input
from .registry import TASKS


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if not stream.isatty() and "COLUMNS" not in os.environ:
        return Console(stderr=stderr, width=160)  # pipes and CI logs: do not squeeze tables to 80
    return Console(stderr=stderr)


def _json_out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _size_text(info: dict) -> str:
    size = info.get("input_size") or []
    text = "x".join(str(s) for s in size)
    if info.get("task") == "mil":
        return f"bag of features or {text}" if text else "bag of features"
    if info.get("fixed_input_size"):
        return f"{text} (fixed)"
    if info.get("size_divisor", 1) > 1:
        return f"{text} /{info['size_divisor']}"
    return text


def _info_or_stub(name: str) -> dict:
    import zoo

    try:
        return zoo.model_info(name)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder that cannot run on the meta device
        spec = zoo.get_spec(name)
        return {"name": name, "task": spec.task, "params_m": None, "input_size": list(spec.input_size),
                "size_divisor": spec.size_divisor, "fixed_input_size": spec.fixed_input_size,
                "paper": spec.paper, "source": spec.source, "params_error": f"{type(e).__name__}: {e}"}


def _json_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ZooError(f"--model-kwargs is not valid JSON ({e}): {text}") from None
    if not isinstance(kwargs, dict):
        raise ZooError("--model-kwargs must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'")
    return kwargs


# ---------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    import zoo

    names = zoo.list_models(args.pattern, task=args.task)
    infos = [_info_or_stub(n) for n in names]
    if args.json:
        _json_out(infos)
        return 0
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    if not infos:
        what = f" matching {args.pattern!r}" if args.pattern != "*" else ""
        what += f" for task {args.task}" if args.task else ""
        console.print(f"no models{what}; `python -m zoo list` shows them all.", soft_wrap=True)
        return 0
    table = Table(title=f"{len(infos)} models", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("task")
    table.add_column("params (M)", justify="right")
    table.add_column("input")
    table.add_column("paper", overflow="fold")
    for i in infos:
        params = f"{i['params_m']:.2f}" if i.get("params_m") is not None else "?"
        table.add_row(escape(i["name"]), i["task"], params, _size_text(i), escape(i.get("paper") or ""))
    console.print(table)
    return 0


# ---------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import zoo
    from .summary import example_input, render_tree, summarize

    spec = zoo.get_spec(args.name)
    info = _info_or_stub(args.name)
    if args.img_size is not None:
        spec.check_input_size(args.img_size)
    kwargs: dict[str, Any] = {}
    bag_images = spec.task == "mil" and args.bag_images and len(spec.input_size) == 3
    if spec.task == "mil" and not bag_images:
        kwargs["in_dim"] = args.in_dim
    torch.manual_seed(0)
    x = example_input(spec, img_size=args.img_size, bag_size=args.bag_size, in_dim=args.in_dim,
                      bag_images=bag_images)
    error = None
    try:
        net = zoo.create_model(args.name, **kwargs)
        rows = summarize(net, x, depth=args.depth)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - show the spec anyway, then say what failed
        rows, error = None, f"{type(e).__name__}: {e}"

    if args.json:
        _json_out({"info": info, "input_shape": list(x.shape),
                   "layers": [r.as_dict() for r in rows] if rows else None, "error": error})
        return 1 if error else 0

    from rich.markup import escape
    from rich.table import Table

    console = _console()
    table = Table(title=args.name, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in info.items():
        if k == "params_m" and v is not None:
            v = f"{v:.3f} M"
        elif k == "input_size":
            v = _size_text(info)
        table.add_row(k, escape(str(v)))
    console.print(table)
    if error:
        console.print(f"[red]layer summary failed at input {list(x.shape)}:[/red] {escape(error)}", soft_wrap=True)
        return 1
    console.print(f"layers (depth {args.depth}), one forward of {list(x.shape)}:")
    console.print(render_tree(rows, title=args.name))
    return 0


# ---------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark, format_table

    model_kwargs = _json_kwargs(args.model_kwargs)
    err = _console(stderr=True)

    def progress(name: str) -> None:
        if not args.json:
            err.print(f"[dim]benchmarking {name} ...[/dim]", soft_wrap=True)

    rows = benchmark(
        args.specs, img_size=args.img_size, batch_size=args.batch_size, device=args.device, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, train=args.train, warmup=args.warmup,
        iters=args.iters, bag_size=args.bag_size, feat_dim=args.feat_dim, bag_images=args.bag_images,
        threads=args.threads, model_kwargs=model_kwargs,
        isolate=not args.no_isolate, errors="row", progress=progress,
    )
    if args.json:
        _json_out(rows)
    else:
        dtype = "bf16 autocast" if args.amp else "fp32"
        flags = ", ".join(f for f, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
        title = f"benchmark: {args.device}, {dtype}, batch {args.batch_size}" + (f", {flags}" if flags else "")
        _console().print(format_table(rows, title=title))
        _console().print("[dim]GFLOPs = multiply-adds per sample; peak MB: see `zoo.bench` docs[/dim]")
    return 1 if any(r.get("error") for r in rows) else 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ZooError(f"--workers takes comma-separated counts, e.g. 0,1,2; got {text!r}") from None
    if any(v < 0 for v in values):
        raise ZooError(f"--workers counts must be >= 0, got {text!r}")
    return values


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from .bench_pipeline import bench_pipeline, format_report, parse_size

    synthetic = None
    if args.synthetic_jpeg is not None:
        synthetic = {"n": args.synthetic_jpeg, "size": parse_size(args.size), "cache": args.cache}
    elif args.size != "224x224" or args.cache:
        raise ZooError("--size and --cache go with --synthetic-jpeg N")
    r = bench_pipeline(args.model, args.data, batch_size=args.batch_size, img_size=args.img_size, steps=args.steps,
                       warmup=args.warmup, workers=_int_list(args.workers), synthetic=synthetic)
    if args.json:
        _json_out(r)
        return 0
    table, lines = format_report(r)
    console = _console()
    console.print(table)
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    return 0


# ---------------------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import zoo
    from .explain import denormalize, load_image, load_net_from_checkpoint, normalize, save_attention_maps
    from .validate import resolve_model_name

    class_names: list[str] = []
    if args.ckpt:
        net, hp = load_net_from_checkpoint(args.ckpt)
        model = hp.get("model")
        name = model if isinstance(model, str) else model["name"]
        class_names = list((hp.get("data_info") or {}).get("class_names") or [])
        stored = stored_input(hp)  # the checkpoint's size, channels and mean/std
    else:
        stored = {}
        name = resolve_model_name(args.model)
        if name.startswith("timm:"):
            raise ZooError(f"{args.model} is a timm model: `zoo explain` draws the attention maps of zoo models; "
                           "pick one that has them (`python -m zoo list`)")
        kwargs = _json_kwargs(args.model_kwargs)
        num_classes = args.num_classes if args.num_classes is not None else kwargs.pop("num_classes", None)
        net = zoo.create_model(name, num_classes=num_classes, pretrained_file=args.pretrained_file, **kwargs)
    spec = net.zoo_spec  # as built: a fixed-size net built for another size carries that size
    run = resolve_run_input(spec, {"img_size": args.img_size}, stored=stored, log=lambda m: _console(True).print(m))
    if spec.task == "mil":
        raise ZooError(f"{name} is a MIL model: `zoo explain` draws maps over single images; "
                       "use `python evaluate.py ... explain=true` for bags")
    caps = capabilities(net)
    if not caps.attention_maps:
        raise ZooError(f"{name} defines no attention_maps(x); `zoo explain` needs a model that does")
    if args.top_traits and not caps.rank_heads:
        raise ZooError(f"{name} has no head ranking (rank_heads); --top-traits is for Prompt-CAM models")
    hw = (hp.get("data_info") or {}).get("img_hw") if args.ckpt else None  # a Re-ID run's (H, W)
    size = tuple(hw) if hw and args.img_size is None else (run.img_size, run.img_size)
    spec.check_input_size(size)

    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise ZooError(f"image not found: {p}")
    stems: list[str] = []
    for p in paths:  # unique file stems even for same-named images from different folders
        stem, n = p.stem, 1
        while stem in stems:
            n += 1
            stem = f"{p.stem}-{n}"
        stems.append(stem)

    device = torch.device(args.device)
    net = net.to(device).eval()
    out_dir = Path(args.out)
    written: list[Path] = []
    console = _console()
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        try:
            imgs = torch.stack([load_image(p, size, channels=run.in_chans) for p in chunk])
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError
            raise ZooError(f"cannot read image: {e}") from None
        x = normalize(imgs, run.mean, run.std).to(device)
        with torch.no_grad():
            maps = net.attention_maps(x, top_traits=args.top_traits) if args.top_traits else net.attention_maps(x)
            # a net without classifier (a Re-ID checkpoint's feature extractor) has no class to name
            logits = net(x) if spec.task == "classification" and net.num_classes else None
        if not isinstance(maps, dict) or not maps:
            raise ZooError(f"{name}.attention_maps(x) returned {type(maps).__name__}, not a dict of [B, K, h, w] maps")
        titles = [p.name for p in chunk]
        if logits is not None and isinstance(logits, torch.Tensor) and logits.ndim == 2:
            prob = logits.float().softmax(-1)
            conf, cls = prob.max(-1)
            label = [class_names[int(c)] if int(c) < len(class_names) else f"class {int(c)}" for c in cls]
            titles = [f"{t} ({lab}, p={float(q):.3g})" for t, lab, q in zip(titles, label, conf)]
        written += save_attention_maps(
            denormalize(x.cpu(), run.mean, run.std), maps, out_dir, max_images=len(chunk),
            titles=titles, names=stems[start:start + args.batch_size], alpha=args.alpha, cmap=args.cmap,
            **overlay_style(net),
        )
    for p in written:
        console.print(str(p), soft_wrap=True, highlight=False)
    console.print(f"[green]wrote {len(written)} PNGs[/green] for {len(paths)} image(s) to {out_dir}", soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="Attention Zoo: list, inspect, benchmark and explain models.")
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{list,info,bench,bench-pipeline,explain,predict,table,extract-features,export,save,push,results,prepare}")

    s = sub.add_parser("list", help="registered models, with task, parameters and input size")
    s.add_argument("pattern", nargs="?", default="*", help="wildcard over names, e.g. 'halonet*'")
    s.add_argument("--task", choices=TASKS)
    s.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("info", help="a model's spec and a layer summary (one forward at its default size)")
    s.add_argument("name")
    s.add_argument("--img-size", type=int, default=None, help="side of the example input (default: the spec's)")
    s.add_argument("--depth", type=int, default=2, help="module tree depth (default 2)")
    s.add_argument("--bag-size", type=int, default=8, help="MIL: instances in the example bag")
    s.add_argument("--in-dim", type=int, default=64, help="MIL: feature size of the example bag")
    s.add_argument("--bag-images", action="store_true", help="MIL: a bag of images at the instance size")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("bench", help="throughput, parameters, GFLOPs (multiply-adds) and peak memory")
    s.add_argument("specs", nargs="+", metavar="SPEC",
                   help="zoo name, wildcard ('halonet*'), timm:NAME, or a name only timm has (resnet18)")
    s.add_argument("--img-size", type=int, default=None, help="default: each model's own input size")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--amp", action="store_true", help="torch.autocast to bfloat16")
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--train", action="store_true", help="also time forward + backward + SGD steps")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--iters", type=int, default=10)
    s.add_argument("--bag-size", type=int, default=512, help="MIL: instances per bag")
    s.add_argument("--feat-dim", type=int, default=512, help="MIL: instance feature size (passed as in_dim)")
    s.add_argument("--bag-images", action="store_true",
                   help="MIL: bags of images at the spec's instance size (models with an instance encoder)")
    s.add_argument("--model-kwargs", default=None, help="JSON object of constructor kwargs for zoo models")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    s.add_argument("--no-isolate", action="store_true", help="run all models in this process (faster start)")
    s.add_argument("--json", action="store_true", help="print only a JSON list of rows")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("bench-pipeline", help="train-step rate of the net, the data loader and train.py's loop, in one run")
    s.add_argument("model")
    s.add_argument("--data", nargs="*", default=[], metavar="OVERRIDE",
                   help="train.py config overrides, e.g. data=digits or data=imagefolder data.root=DIR")
    s.add_argument("--synthetic-jpeg", type=int, default=None, metavar="N",
                   help="write (once) N JPEGs in ImageNet layout and run on them with data=imagefolder")
    s.add_argument("--size", default="224x224", metavar="WxH", help="size of the synthetic JPEGs")
    s.add_argument("--cache", default=None, metavar="DIR",
                   help="folder for the synthetic JPEGs (default ~/.cache/attention_zoo/synthetic_jpeg)")
    s.add_argument("--batch-size", type=int, default=None, help="default: the data config's")
    s.add_argument("--img-size", type=int, default=None, help="default: the data config's (else the model's)")
    s.add_argument("--steps", type=int, default=10, help="timed steps of each loop")
    s.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    s.add_argument("--workers", default="0,1,2", help="loader worker counts to time (the config's is added)")
    s.add_argument("--json", action="store_true", help="print only the results as JSON")
    s.set_defaults(func=cmd_bench_pipeline)

    s = sub.add_parser("explain", help="write attention-map overlays (PNG) for images")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a zoo model name")
    src.add_argument("--ckpt", help="a Lightning checkpoint written by a zoo task module")
    s.add_argument("--pretrained-file", default=None, help="weights file for --model")
    s.add_argument("--num-classes", type=int, default=None, help="classifier size for --model")
    s.add_argument("--model-kwargs", default=None, help="JSON object of constructor kwargs for --model")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--img-size", type=int, default=None, help="default: the model's input size")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="cpu")
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--cmap", default="jet")
    s.add_argument("--top-traits", type=int, default=None,
                   help="Prompt-CAM: draw only the N heads kept by greedy head ranking (trait identification)")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("predict", help="a checkpoint's predictions for images or MIL bags -> CSV (+ masks, maps)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a Lightning checkpoint written by a zoo task module")
    src.add_argument("--model", help="a saved model: local-dir:DIR or hf-hub:ID (what `load_net_from_checkpoint` reads)")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), or a CSV of paths; MIL: .pt/.h5 bags or tile folders")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    s.add_argument("--top-k", type=int, default=5, help="classification: labels per image (default 5)")
    s.add_argument("--maps", action="store_true", help="MIL: attention per instance (maps/<bag>.csv and .png)")
    s.add_argument("--explain", action="store_true", help="also write `zoo explain`'s overlays to OUT/explain/")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the inputs")
    s.add_argument("--backbone", default=None,
                   help="MIL tile folders: the feature extractor, when the checkpoint does not record one")
    s.add_argument("--backbone-file", default=None, help="local weights for --backbone")
    s.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("table", help="the README's model table (Markdown), generated from the registry and configs")
    s.add_argument("pattern", nargs="?", default=None, help="only models matching this wildcard")
    s.add_argument("--write", metavar="FILE", help="replace the model-table block of FILE (e.g. README.md)")
    s.set_defaults(func=cmd_table)

    s = sub.add_parser("extract-features", help="tile folders -> per-bag features (pt_files/, h5_files/) for MIL")
    s.add_argument("tiles_root", metavar="TILES_ROOT", help="one folder of tile images per bag (split folders above allowed)")
    s.add_argument("--out", required=True, help="output folder: writes pt_files/<bag>.pt and h5_files/<bag>.h5")
    s.add_argument("--model", default="timm:resnet18",
                   help="a zoo classification model, or a timm model (timm:NAME, or NAME if the zoo has none)")
    s.add_argument("--pretrained", action="store_true", help="download the backbone's published weights")
    s.add_argument("--pretrained-file", default=None, help="local timm / zoo weights file for the backbone")
    s.add_argument("--img-size", type=int, default=None, help="tile resize (default: the backbone's input size)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="cpu")
    s.add_argument("--overwrite", action="store_true",
                   help="re-extract every bag (default: bags already in --out are skipped; another backbone is refused)")
    s.set_defaults(func=cmd_extract_features)

    s = sub.add_parser("export", help="write a checkpoint's net as safetensors, ONNX or TorchScript (output-checked)")
    s.add_argument("ckpt", metavar="CKPT", help="a zoo (Lightning) checkpoint, e.g. outputs/.../best-epoch019.ckpt")
    s.add_argument("--format", required=True, choices=("safetensors", "onnx", "torchscript"))
    s.add_argument("--out", required=True, help="output file")
    s.add_argument("--atol", type=float, default=1e-4, help="tolerance of the output equality check")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file (never the checkpoint)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("save", help="write a checkpoint's net as a Hub folder (config.json, model.safetensors, README.md)")
    s.add_argument("ckpt", metavar="CKPT", help="a zoo (Lightning) checkpoint; its run's config.yaml and metrics.json go in the card")
    s.add_argument("--out", required=True, help="output folder (load it with zoo.create_model('local-dir:DIR'))")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder (never the checkpoint)")
    s.set_defaults(func=cmd_save)

    s = sub.add_parser("push", help="upload a checkpoint's Hub folder to the Hugging Face Hub")
    s.add_argument("ckpt", metavar="CKPT", help="a zoo (Lightning) checkpoint")
    s.add_argument("--repo", required=True, help="ORG/NAME on the Hub (created if missing)")
    s.add_argument("--private", action="store_true", help="create the repository as private")
    s.add_argument("--dry-run", metavar="DIR", default=None, help="write the folder to DIR and upload nothing")
    s.add_argument("--overwrite", action="store_true", help="with --dry-run: replace an existing DIR")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("results", help="every run under DIR (a sweep) in one table: results.md, results.csv, results.png")
    s.add_argument("dir", help="a multirun (or any) folder; runs are the folders with config.yaml, recursively")
    s.add_argument("--metric", default=None, help="the metric to plot and print (default: test/acc, test/miou or test/auroc)")
    s.add_argument("--x", default=None, help="the swept numeric key on the plot's x-axis (default: the first one, not seed)")
    s.add_argument("--out", default=None, help="where to write the files (default: DIR)")
    s.add_argument("--metrics", default=None, help="comma-separated metrics of the mean ± std summary over seeds "
                   "(default: all), e.g. test/auroc,test/acc,test/balanced_acc,test/f1")
    s.set_defaults(func=cmd_results)

    s = sub.add_parser("prepare", help="a dataset's published release -> the layout its data= config reads (CHAOS MR DICOM)")
    s.add_argument("dataset", choices=["chaos"])
    s.add_argument("src", metavar="SRC", help="the unpacked release (CHAOS: the folder holding CHAOS_Train_Sets/, or MR/)")
    s.add_argument("--out", required=True, help="output folder (data.root of data=chaos)")
    s.add_argument("--sequences", default="T1DUAL_in", help="comma list of T1DUAL_in, T1DUAL_out, T2SPIR")
    s.add_argument("--val-fraction", type=float, default=0.1, help="of the patients (seeded)")
    s.add_argument("--test-fraction", type=float, default=0.25, help="of the patients (seeded)")
    s.add_argument("--val-patients", default=None, help="comma list of patient ids (instead of the fraction)")
    s.add_argument("--test-patients", default=None, help="comma list of patient ids (instead of the fraction)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command in --out")
    s.set_defaults(func=cmd_prepare)
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import main_chaos

    doc = main_chaos(args)
    counts = {s: sum(v["split"] == s for v in doc["volumes"].values()) for s in ("train", "val", "test")}
    _console().print(f"wrote {len(doc['volumes'])} volumes ({counts['train']} train, {counts['val']} val, "
                     f"{counts['test']} test) to {args.out}; train with data=chaos data.root={args.out}",
                     soft_wrap=True, highlight=False)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .results import results, summary_table, table

    metrics = [m for m in (args.metrics or "").split(",") if m] or None
    r = results(args.dir, metric=args.metric, x=args.x, out=args.out, metrics=metrics)
    header, rows = table(r["runs"], Path(args.dir), [args.metric] if args.metric else None)
    t = Table(title=f"{len(rows)} run(s) under {args.dir}")
    for h in header:
        t.add_column(h, justify="left" if h in ("run", "status") else "right")
    for row in rows:
        t.add_row(*row, style=None if row[-1] == "done" else "yellow")
    console = _console()
    console.print(t)
    if len(r["summary"][2]) < len(r["runs"]):  # seeds repeat: their mean ± std per group
        head, cells = summary_table(*r["summary"])
        t = Table(title="mean ± sample std over seeds")
        for h in head:
            t.add_column(h, justify="right" if h.startswith(("test/", "val/", "n")) else "left")
        for row in cells:
            t.add_row(*row)
        console.print(t)
    console.print(f"wrote {', '.join(str(p) for p in r['files'])}", soft_wrap=True, highlight=False)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from .hub import save_checkpoint

    out = save_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
    _console().print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); load it with "
                     f"zoo.create_model(\"local-dir:{out}\")", soft_wrap=True, highlight=False)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hf import push

    r = push(args.ckpt, args.repo, private=args.private, dry_run=args.dry_run, overwrite=args.overwrite)
    if r["url"] is None:
        _console().print(f"dry run: would upload {', '.join(r['files'])} from {r['folder']} to {r['repo']}",
                         soft_wrap=True, highlight=False)
    else:
        _console().print(f"pushed {', '.join(r['files'])} to {r['url']}; load it with "
                         f"zoo.create_model(\"hf-hub:{r['repo']}\")", soft_wrap=True, highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    r = export(args.ckpt, args.format, args.out, atol=args.atol, rtol=args.atol, opset=args.opset,
               overwrite=args.overwrite)
    _console().print(f"wrote {r['out']} ({r['format']}, {r['model']}); outputs on a random {r['input_shape']} "
                     f"input match the checkpoint's net within {r['max_abs_diff']:.2g}", soft_wrap=True)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    r = predict(args.ckpt or args.model, args.inputs, args.out, batch_size=args.batch_size, device=args.device,
                top_k=args.top_k, maps=args.maps, explain=args.explain, num_workers=args.num_workers,
                overwrite=args.overwrite, backbone=args.backbone, backbone_file=args.backbone_file)
    console = _console()
    console.print(f"[green]predicted {r['predicted']} input(s)[/green] -> {r['files'][0]}", soft_wrap=True)
    if r["errors"]:
        _console(stderr=True).print(f"[yellow]warning: {len(r['errors'])} input(s) could not be read and were left "
                                    f"out; see {r['files'][-1]}[/yellow]", soft_wrap=True, highlight=False)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    import zoo
    from . import model_table

    text = model_table.markdown(model_table.rows(zoo.list_models(args.pattern) if args.pattern else None))
    if args.write:
        path = Path(args.write)
        path.write_text(model_table.replace_block(path.read_text(), text))
        _console(stderr=True).print(f"wrote the model table into {path}")
    else:
        sys.stdout.write(text + "\n")
    return 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from .features import extract_features

    counts = extract_features(args.tiles_root, args.out, args.model, pretrained=args.pretrained,
                              pretrained_file=args.pretrained_file, img_size=args.img_size,
                              batch_size=args.batch_size, device=args.device, overwrite=args.overwrite)
    _console().print(f"{counts['written']} bags written, {counts['skipped']} already there "
                     f"({counts['bags']} in all) -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "explain" and args.pretrained_file and args.ckpt:
        build_parser().error("--pretrained-file goes with --model, not --ckpt")
    try:
        return args.func(args)
    except ZooError as e:
        from rich.markup import escape

        msg = " ".join(str(e.args[0] if e.args else e).split())
        _console(stderr=True).print(f"[red]error: {escape(msg)}[/red]", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
