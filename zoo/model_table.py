"""The README's model table, generated from the registry and the experiment configs (never typed by hand).

``python -m zoo table`` prints it as Markdown; ``python -m zoo table --write README.md`` replaces the block
between the two markers below. A test checks that the README holds exactly what this module generates.

Columns: params (built on the meta device), GFLOPs (multiply-adds at the model's default input size,
counted on the meta device like ``zoo bench``; a model's own analytic count where its execution is
sparse), the paper's numbers from the spec's typed ``reference`` (params, GFLOPs, metrics with dataset
and resolution), the experiment configs that train it (``configs/experiment/*.yaml`` naming it as their
model), and the weights a user can load (the spec's ``weights``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .contract import capabilities
from .errors import ZooError
from .registry import count_params_m, create_model, get_spec, list_models

START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiment"
_MODEL_LINE = re.compile(r"override\s+/model:\s*([\w.-]+)")


def recipes(config_dir: Path = CONFIGS) -> dict[str, list[str]]:
    """model name -> the experiment configs whose defaults select it."""
    out: dict[str, list[str]] = {}
    for path in sorted(config_dir.glob("*.yaml")):
        m = _MODEL_LINE.search(path.read_text())
        if m:
            out.setdefault(m.group(1), []).append(path.stem)
    return out


def gmacs(name: str) -> float | None:
    """Multiply-adds (G) of one sample at the spec's input size; None for MIL (depends on the bag)."""
    from .bench import _count_gmacs

    spec = get_spec(name)
    if spec.task == "mil":
        return None
    size = spec.input_size[-1]
    with torch.device("meta"):
        net = create_model(name).eval()
    extras = net.bench_extras(size) if capabilities(net).bench_extras else {}
    if "total_gmacs_analytic" in extras:  # sparse execution: the counter would see dense products
        return float(extras["total_gmacs_analytic"])
    try:
        with torch.device("meta"):
            return _count_gmacs(net, torch.empty(1, *spec.input_size))
    except (RuntimeError, NotImplementedError, AssertionError):
        # an op without a meta kernel, or a parameter view the counter's module hooks reject under
        # no_grad: count a real forward with autograd on (same multiply-adds)
        from torch.utils.flop_counter import FlopCounterMode

        from .bench import _cpu_sdpa_flops

        torch.manual_seed(0)
        counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops())
        with counter:
            create_model(name).eval()(torch.randn(1, *spec.input_size))
        return counter.get_total_flops() / 2 / 1e9


def rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    by_model = recipes()
    out = []
    for name in names or list_models():
        spec = get_spec(name)
        g = gmacs(name)
        size = "bag" if spec.task == "mil" else "x".join(str(s) for s in spec.input_size[-2:])
        out.append(dict(
            model=name, task=spec.task, input=size, params_m=round(count_params_m(name), 3),
            gmacs=None if g is None else round(g, 3), paper=spec.reference.describe(),
            recipes=by_model.get(name, []), weights=spec.weights.describe(),
        ))
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| model | task | input | params (M) | GFLOPs | paper | recipes (`experiment=`) | weights |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        g = "-" if r["gmacs"] is None else f"{r['gmacs']:.3f}"
        rec = ", ".join(f"`{x}`" for x in r["recipes"]) or "-"
        lines.append(f"| `{r['model']}` | {r['task']} | {r['input']} | {r['params_m']:.3f} | {g} | {r['paper']} "
                     f"| {rec} | {r['weights']} |")
    return "\n".join(lines)


def replace_block(text: str, table_md: str) -> str:
    if START not in text or END not in text:
        raise ZooError(f"the file has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table_md}\n{END}{tail}"


def read_block(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()
