"""Feature backbones for the segmenters: a timm model or a zoo classification model, by name.

:func:`create_backbone` returns a module whose ``forward(x)`` gives the list of feature maps
``[B, C_i, H / r_i, W / r_i]`` at ``out_indices`` and whose ``feature_info`` (timm's ``FeatureInfo``)
gives their channels and reductions. A timm name is built by ``timm.create_model(name,
features_only=True)``, exactly as timm does it (same modules, keys and pretrained weights); a registered
zoo classification model by ``zoo.create_model(name, features_only=True)`` (timm's ``FeatureGetterNet``
over the net's ``forward_intermediates``). The zoo never shadows timm: a name both know is timm's.
"""
from __future__ import annotations

import difflib
from typing import Any, Sequence

import timm
from torch import nn

from .errors import UnknownModelError

OutIndices = int | Sequence[int] | None


def is_timm_model(name: str) -> bool:
    """True for a model timm itself provides (a zoo model timm lists under the zoo's name does not count)."""
    if name.partition(":")[0] in ("hf-hub", "local-dir"):
        return True
    return timm.is_model(name) and not timm.model_entrypoint(name).__module__.startswith(f"{__package__}.")


def create_backbone(name: str, *, out_indices: OutIndices = None, pretrained: bool = False, in_chans: int = 3,
                    **kwargs: Any) -> nn.Module:
    """A features-only backbone: timm's model ``name`` if timm has one, else the zoo's.

    ``out_indices`` has timm's meaning: ``None`` = the backbone's default levels, an int ``n`` = the
    last ``n`` levels, a sequence = those level indices (negative from the end). ``kwargs`` go to the
    model's constructor (e.g. ``drop_path_rate``, or ``img_size`` for a fixed-size zoo net).
    """
    if out_indices is not None:
        kwargs["out_indices"] = out_indices if isinstance(out_indices, int) else tuple(out_indices)
    if is_timm_model(name):
        return timm.create_model(name, features_only=True, pretrained=pretrained, in_chans=in_chans, **kwargs)
    from .registry import create_model, list_models

    if name in list_models():
        return create_model(name, features_only=True, pretrained=pretrained, in_chans=in_chans, **kwargs)
    known = list_models(task="classification")
    close = difflib.get_close_matches(name, known + timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown backbone {name!r}: neither a timm model nor a zoo classification model.{hint} "
                            "`python -m zoo list --task classification` shows the zoo's; `timm.list_models()` timm's.")


def variant_backbone(default: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A registered segmenter's keyword arguments with its backbone: ``default`` unless the caller names one
    (``backbone=``, or the older ``encoder=``). A zoo backbone gives all its levels unless ``out_indices``
    names them (the segmenters' default levels are a timm ResNet's)."""
    named = kwargs.pop("encoder", None) or kwargs.get("backbone")
    if named and named != default and not is_timm_model(named):
        kwargs.setdefault("out_indices", None)
    kwargs["backbone"] = named or default
    return kwargs
