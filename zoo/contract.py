"""The model contract: what every zoo net provides, and the optional capabilities it declares.

Rooms (tasks, bench, explain, export, the CLI) never probe a net with ``hasattr``; they ask
:func:`capabilities` and call the methods a capability promises. A net that breaks its declaration
fails the shared contract test (``tests/test_contract.py``), not a user's run.

Required, every task: ``forward(x)`` returning logits (classification ``[B, C]``; segmentation
``[B, C, H, W]`` at input resolution; MIL ``forward(bags, mask=None) -> [B, C]``).

Required, classification (timm's surface, :data:`TIMM_SURFACE`): ``forward_features``,
``forward_head(x, pre_logits=False)``, ``reset_classifier(num_classes, global_pool=None)``,
``get_classifier()``, ``num_classes``, ``num_features``, ``head_hidden_size``, ``no_weight_decay()``,
``group_matcher(coarse=False)``, ``set_grad_checkpointing(enable=True)`` (real activation
checkpointing), ``forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW",
intermediates_only=False)``, ``prune_intermediate_layers(indices, prune_norm=False, prune_head=True)``
and ``feature_info`` (a list of ``dict(num_chs=, reduction=, module=)``, one per intermediate).
A net that cannot give spatial intermediates sets ``features_unsupported`` to the reason.

Optional capabilities, declared on the class as ``zoo_capabilities = Capabilities(...)``:

====================  ===========================================================================
``own_objective``     ``forward_train(x, y, **kw) -> (logits, {loss_name: tensor})``; the task sums
                      and logs the named losses instead of its own criterion
``soft_targets``      ``forward_train`` accepts mixup/cutmix soft targets ``[B, C]``
``attention_maps``    ``attention_maps(x) -> {name: [B, K, h, w]}`` for the PNG overlays
``attention_weights`` MIL: ``attention_weights(bags, mask) -> [B, K, N]`` (instance order for pictures)
``rank_heads``        ``rank_heads(x, labels, top_k) -> [B, top_k]`` head ranking for trait maps
``trainable_groups``  ``freeze_backbone()`` freezes what the model's recipe does not train
``bench_extras``      ``bench_extras(img_size) -> dict`` numbers ``zoo bench`` adds to its row
``no_weight_decay``   dense / MIL nets: ``no_weight_decay() -> set[str]`` (classification: required)
``feature_objective`` metric learning on features (Re-ID): ``feature_heads(inference=False) -> {head: dim}``
                      names the features the net trains (``inference=True``: those whose concatenation,
                      in that order, is ``forward_head(x, pre_logits=True)``), and
                      ``forward_train_features(x, y, criterion) -> {loss_name: tensor}`` scores each
                      branch's feature ``[B, dim]`` with the task's ``criterion(head, feature, y)`` and
                      weighs the branches as the model's method does
====================  ===========================================================================

``overlay_style`` (a dict of keyword arguments for :func:`zoo.explain.save_attention_maps`) is a
plain class attribute with an empty default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

TIMM_SURFACE = (
    "forward_features", "forward_head", "reset_classifier", "get_classifier", "no_weight_decay",
    "group_matcher", "set_grad_checkpointing", "forward_intermediates", "prune_intermediate_layers",
)
TIMM_ATTRIBUTES = ("num_classes", "num_features", "head_hidden_size", "feature_info", "pretrained_cfg", "default_cfg")


@dataclass(frozen=True)
class Capabilities:
    """The optional methods a zoo net implements (see the module docstring)."""

    own_objective: bool = False
    soft_targets: bool = False
    attention_maps: bool = False
    attention_weights: bool = False
    rank_heads: bool = False
    trainable_groups: bool = False
    bench_extras: bool = False
    no_weight_decay: bool = False  # dense / MIL nets; classification nets always have it (timm's surface)
    feature_objective: bool = False  # Re-ID: feature_heads() + forward_train_features(x, y, criterion)

    # capability -> the method it promises
    METHODS: ClassVar[dict[str, str]] = {
        "own_objective": "forward_train", "soft_targets": "forward_train", "attention_maps": "attention_maps",
        "attention_weights": "attention_weights", "rank_heads": "rank_heads",
        "trainable_groups": "freeze_backbone", "bench_extras": "bench_extras",
        "no_weight_decay": "no_weight_decay", "feature_objective": "forward_train_features",
    }

    def declared(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


class ZooModel:
    """Mixin every zoo net class inherits (next to ``nn.Module`` or a timm class): it carries the
    declared capabilities and the spec ``create_model`` attaches (``zoo_spec``)."""

    zoo_capabilities: ClassVar[Capabilities] = Capabilities()
    zoo_spec: Any = None  # the ModelSpec create_model attaches; None for a net built from its class directly
    overlay_style: ClassVar[dict[str, Any]] = {}
    features_unsupported: ClassVar[str | None] = None  # why features_only cannot work, when it cannot


def capabilities(net: nn.Module) -> Capabilities:
    """The capabilities ``net`` declares (none for a net from outside the zoo, e.g. a timm reference)."""
    return net.zoo_capabilities if isinstance(net, ZooModel) else Capabilities()


def spec_of(net: nn.Module) -> Any:
    """The spec ``create_model`` attached to ``net``; None for a net from outside the zoo or built directly."""
    return net.zoo_spec if isinstance(net, ZooModel) else None


def overlay_style(net: nn.Module) -> dict[str, Any]:
    return dict(net.overlay_style) if isinstance(net, ZooModel) else {}


def no_weight_decay(net: nn.Module, task: str) -> set[str]:
    """Parameter names the optimizer keeps out of weight decay: a classification net's ``no_weight_decay()``
    (timm's surface); for dense and MIL nets, theirs where they declare ``no_weight_decay``."""
    if task == "classification" or capabilities(net).no_weight_decay:
        return set(net.no_weight_decay())
    return set()


def contract_violations(net: nn.Module, task: str) -> list[str]:
    """What ``net`` promises but lacks, or has but does not declare; empty when it keeps the contract."""
    problems = []
    if not isinstance(net, ZooModel):
        problems.append(f"{type(net).__name__} does not inherit zoo.contract.ZooModel")
    caps = capabilities(net)
    for cap, method in Capabilities.METHODS.items():
        if task == "classification" and cap == "no_weight_decay":
            continue  # required below
        has = callable(getattr(net, method, None))
        if getattr(caps, cap) and not has:
            problems.append(f"declares {cap} but has no {method}()")
        if has and not any(getattr(caps, c) for c, m in Capabilities.METHODS.items() if m == method):
            problems.append(f"has {method}() but declares no capability for it")
    if caps.feature_objective and not callable(getattr(net, "feature_heads", None)):
        problems.append("declares feature_objective but has no feature_heads()")
    if task == "classification":
        problems += [f"lacks timm's {m}()" for m in TIMM_SURFACE if not callable(getattr(net, m, None))]
        problems += [f"lacks timm's {a}" for a in TIMM_ATTRIBUTES if not hasattr(net, a)]
    return problems
