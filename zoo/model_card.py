"""The README.md model card of a Hub folder, from the model's spec and the run that trained it."""
from __future__ import annotations

from typing import Any

from torch import nn

_PIPELINE = {"classification": "image-classification", "segmentation": "image-segmentation",
             "mil": "image-classification"}


def card(net: nn.Module, config: dict[str, Any], run: dict[str, Any]) -> str:
    """Markdown with the Hub's YAML header: paper, licence, size, input, data and recipe, measured
    metrics with their split, one-line loading, limitations and a citation."""
    spec = net.zoo_spec
    info = config["zoo"]["data_info"]
    dataset = info.get("dataset")
    lines = ["---", "tags:", f"- {_PIPELINE[spec.task]}", "- attention-zoo"]
    lines += ["- timm"] if spec.task == "classification" else []
    lines += [f"library_name: {'timm' if spec.task == 'classification' else 'attention-zoo'}",
              f"license: {spec.license}"]
    lines += ["datasets:", f"- {str(dataset).lower()}"] if dataset else []
    lines += ["---", f"# Model card for {spec.name}", ""]
    lines.append(f"{spec.name}, a {spec.task} model" + (f" from *{spec.paper}*" if spec.paper else "")
                 + (f", trained on {dataset}" if dataset else "") + " with Attention Zoo.")
    lines += ["", "## Model details", ""]
    details = {
        "Architecture": f"`{spec.name}` ({spec.task})",
        "Paper": _paper(spec),
        "Code": spec.source or None,
        "License": spec.license,
        "Parameters (M)": f"{sum(p.numel() for p in net.parameters()) / 1e6:.3f}",
        "GFLOPs": _gflops(net, spec, info),
        "Classes": _classes(config),
        "Input": _input(spec, config, info),
        "Training data": dataset,
        "Checkpoint": run.get("checkpoint"),
    }
    lines += [f"- **{k}:** {v}" for k, v in details.items() if v]
    lines += _metrics(spec, run)
    lines += _usage(spec)
    lines += _limitations(spec, config)
    if run.get("config"):
        lines += ["", "## Training recipe", "", "The run's resolved `config.yaml` (`python train.py` with these values "
                  "reproduces it):", "", "```yaml", run["config"].rstrip(), "```"]
    lines += _citation(spec)
    return "\n".join(lines) + "\n"


def _paper(spec) -> str | None:
    ids = [_link(i) for i in spec.paper_ids]
    if not spec.paper and not ids:
        return None
    return f"{spec.paper or spec.name}" + (f" ({', '.join(ids)})" if ids else "")


def _link(pid: str) -> str:
    if pid.lower().startswith("arxiv:"):
        num = pid.split(":", 1)[1]
        return f"[{pid}](https://arxiv.org/abs/{num})"
    return pid


def _gflops(net: nn.Module, spec, info: dict) -> str | None:
    ref = f"{spec.reference.gflops} (paper, its default variant and resolution)" if spec.reference.gflops else ""
    if spec.task == "mil":
        return ref or "per bag: grows with the bag size"
    try:  # measured at the run's input size: one counted forward
        from .bench import _count_gmacs
        from .spec import example_input

        was_training = net.training
        measured = _count_gmacs(net.eval(), example_input(spec, info, batch_size=1))
        net.train(was_training)
        side = info.get("img_size") or spec.input_size[-1]
        text = f"{measured:.3g} at {side}x{side} (measured, multiply-adds)"
    except Exception:  # noqa: BLE001 - an op the counter cannot run: the reference number alone
        text = ""
    return "; ".join(t for t in (text, ref) if t) or None


def _classes(config: dict) -> str | None:
    n = config.get("num_classes")
    names = config.get("label_names") or []
    if n is None:
        return None
    shown = ", ".join(str(x) for x in names[:20]) + (", ..." if len(names) > 20 else "")
    return f"{n}" + (f" ({shown})" if names else "")


def _input(spec, config: dict, info: dict) -> str:
    cfg = config["pretrained_cfg"]
    if spec.task == "mil":
        kwargs = config.get("model_args") or {}
        what = f"bags of {kwargs['in_dim']}-d instance features" if "in_dim" in kwargs else "bags of instances"
        size = f"; instance images {info['in_chans']}x{info['img_size']}x{info['img_size']}" if info.get("img_size") else ""
        return what + size
    c, h, w = cfg.get("input_size") or spec.input_size
    rule = "fixed size" if cfg.get("fixed_input_size") else (
        f"any size divisible by {spec.size_divisor}" if spec.size_divisor > 1 else "any size")
    return (f"{c}x{h}x{w} ({rule}); mean {_fmt(cfg.get('mean'))}, std {_fmt(cfg.get('std'))}, "
            f"{cfg.get('interpolation')} resize, crop_pct {cfg.get('crop_pct')}")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values or ()) + ")"


def _metrics(spec, run: dict) -> list[str]:
    lines = ["", "## Metrics", ""]
    metrics = run.get("metrics") or {}
    if metrics:
        lines += [f"Measured by the run that trained this checkpoint ({run.get('metrics_file')}):", "",
                  "| split | metric | value |", "|---|---|---|"]
        for key, value in metrics.items():
            split, _, name = key.rpartition("/")
            shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {split or '-'} | {name} | {shown} |")
    else:
        lines.append("No measured metrics: the checkpoint was not saved from a run folder with a metrics.json.")
    if spec.reference.metrics:
        lines += ["", "The paper's numbers for its own variant (not this checkpoint): "
                  + "; ".join(m.describe() for m in spec.reference.metrics) + "."]
    return lines


def _usage(spec) -> list[str]:
    lines = ["", "## How to use", "", "```python", "import zoo", "",
             'net = zoo.create_model("hf-hub:ORG/NAME")   # or "local-dir:PATH"; net.pretrained_cfg: labels, mean/std, input_size']
    if spec.task == "classification":
        lines += ["", "import timm  # after import zoo", 'net = timm.create_model("hf-hub:ORG/NAME", pretrained=True)']
    lines += ["```", "", "`python evaluate.py ckpt_path=DIR data=...` evaluates the folder like a checkpoint."]
    return lines


def _limitations(spec, config: dict) -> list[str]:
    notes = [n for n in (spec.weights.note, spec.reference.note) if n]
    cfg = config["pretrained_cfg"]
    if cfg.get("fixed_input_size"):
        notes.append(f"built for exactly {cfg['input_size'][1]}x{cfg['input_size'][2]} inputs "
                     "(img_size= builds another size; position embeddings are resized when loading)")
    if spec.task == "mil":
        notes.append("expects bags of the same instance features it was trained on (same feature extractor)")
    if not notes:
        return []
    return ["", "## Limitations", ""] + [f"- {n}" for n in notes]


def _citation(spec) -> list[str]:
    if not spec.paper:
        return []
    arxiv = next((p.split(":", 1)[1] for p in spec.paper_ids if p.lower().startswith("arxiv:")), None)
    fields = [f"  note = {{{spec.paper}{'' if arxiv or not spec.paper_ids else ', ' + ', '.join(spec.paper_ids)}}}"]
    fields += [f"  eprint = {{{arxiv}}}", "  archivePrefix = {arXiv}"] if arxiv else []
    return ["", "## Citation", "", "```bibtex", f"@misc{{{spec.name},", ",\n".join(fields), "}", "```"]
