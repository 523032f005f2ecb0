"""A layer summary of a network: its modules to a given depth, their parameters and output shapes.

>>> import zoo
>>> from zoo.summary import summarize, example_input, render_tree
>>> net = zoo.create_model("halonet_tiny")
>>> rows = summarize(net, example_input(zoo.get_spec("halonet_tiny")))
>>> rich.print(render_tree(rows, title="halonet_tiny"))

Pure torch (forward hooks); no Lightning. Output shapes come from one forward pass in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .registry import ModelSpec  # noqa: F401
from .spec import example_input  # noqa: F401  (re-exported: one example input for info, export, bench)

__all__ = ["LayerRow", "summarize", "example_input", "render_tree", "format_shape", "format_count"]


@dataclass
class LayerRow:
    name: str  # dotted path, "" for the model itself
    type: str
    depth: int  # 0 for the model, 1 for its children ...
    params: int  # parameters of the module and its descendants (shared ones counted once per module)
    trainable: int
    out_shape: Any = None  # list[int], a list/dict of them for tuple/dict outputs, None if never called
    calls: int = 0
    repeat: int = 1  # > 1 when identical consecutive siblings were folded into this row
    last_name: str = ""  # name of the last folded sibling

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _shape_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (list, tuple)):
        return [_shape_of(o) for o in out]
    if isinstance(out, dict):
        return {k: _shape_of(v) for k, v in out.items()}
    return type(out).__name__


def summarize(model: nn.Module, x: torch.Tensor | tuple, depth: int = 2, fold: bool = True) -> list[LayerRow]:
    """One forward of ``x`` (no grad, eval mode, restored afterwards) -> rows for the model and its
    modules up to ``depth`` levels down, in definition order. ``fold`` merges runs of consecutive
    siblings of the same type, parameter count and output shape (``blocks.0`` ... ``blocks.11``)."""
    rows: dict[str, LayerRow] = {}
    hooks = []

    def visit(mod: nn.Module, name: str, d: int) -> None:
        params = list(mod.parameters())
        rows[name] = LayerRow(
            name=name, type=type(mod).__name__, depth=d,
            params=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
        )

        def hook(_m, _inp, out, row=rows[name]):
            row.out_shape = _shape_of(out)
            row.calls += 1

        hooks.append(mod.register_forward_hook(hook))
        if d < depth:
            for child_name, child in mod.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name, d + 1)

    visit(model, "", 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*x) if isinstance(x, tuple) else model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = list(rows.values())
    return _fold(out) if fold else out


def _fold(rows: list[LayerRow]) -> list[LayerRow]:
    folded: list[LayerRow] = []
    skip_prefix: str | None = None
    for r in rows:
        if skip_prefix is not None and r.name.startswith(skip_prefix):
            continue  # a descendant of a folded sibling
        skip_prefix = None
        prev = next((p for p in reversed(folded) if p.depth <= r.depth), None)
        if (
            prev is not None and r.depth > 0 and prev.depth == r.depth
            and prev.name.rpartition(".")[0] == r.name.rpartition(".")[0]
            and (prev.type, prev.params, prev.out_shape) == (r.type, r.params, r.out_shape)
            and r.name.rpartition(".")[2].isdigit()
        ):
            prev.repeat += 1
            prev.last_name = r.name
            skip_prefix = r.name + "."
            # the folded sibling's own children are represented by the first sibling's
            continue
        folded.append(r)
    return folded


def format_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def format_shape(shape: Any) -> str:
    if shape is None:
        return "not called"
    if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
        return "[" + ", ".join(map(str, shape)) + "]"
    if isinstance(shape, list):
        return "(" + ", ".join(format_shape(s) for s in shape) + ")"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {format_shape(v)}" for k, v in shape.items()) + "}"
    return str(shape)


def render_tree(rows: list[LayerRow], title: str | None = None):
    """The rows as a ``rich.tree.Tree``: ``name (Type)  params  -> output shape``."""
    from rich.markup import escape
    from rich.tree import Tree

    def shape(r: LayerRow) -> str:
        if r.out_shape is None and r.type in ("ModuleList", "ModuleDict", "ParameterList", "ParameterDict"):
            return "(container)"
        return format_shape(r.out_shape)

    def label(r: LayerRow) -> str:
        name = r.name.rpartition(".")[2] if r.name else (title or r.type)
        if r.repeat > 1:
            name += f"..{r.last_name.rpartition('.')[2]}"
        rep = f" x{r.repeat}" if r.repeat > 1 else ""
        frozen = f" ({format_count(r.params - r.trainable)} frozen)" if r.trainable != r.params else ""
        return (
            f"[bold]{escape(name)}[/bold] [dim]{escape(r.type)}{rep}[/dim]  "
            f"[cyan]{format_count(r.params)}[/cyan]{frozen}  -> {escape(shape(r))}"
        )

    root = Tree(label(rows[0]))
    stack: list[tuple[int, Tree]] = [(0, root)]
    for r in rows[1:]:
        while stack and stack[-1][0] >= r.depth:
            stack.pop()
        node = stack[-1][1].add(label(r))
        stack.append((r.depth, node))
    return root
