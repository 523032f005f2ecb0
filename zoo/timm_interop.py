"""The zoo's classification models in timm's registry, under their zoo names.

``import zoo`` registers one entrypoint per zoo classification model whose
name timm does not already have (the zoo never shadows a timm model), so
``timm.create_model("biformer_tiny", num_classes=10)`` builds the zoo net through
:func:`zoo.create_model` (its ``pretrained_cfg`` included), and ``timm.data.resolve_data_config(model=net)``
gives the zoo's own preprocessing. ``timm.create_model("local-dir:DIR")`` / ``"hf-hub:ID"`` of a zoo
Hub folder comes here with timm's config of the folder and is built by :func:`zoo.hub.create_for_timm`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

REGISTERED: list[str] = []


def _entrypoint(name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
               cache_dir: Any = None, **kwargs: Any):
        from .registry import create_model

        if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("source") in ("local-dir", "hf-hub"):
            from .hub import create_for_timm  # timm.create_model("local-dir:DIR"): the folder's config

            return create_for_timm(name, pretrained_cfg, pretrained, **kwargs)
        overlay = dict(pretrained_cfg_overlay or {})
        if "file" in overlay and pretrained:  # timm's way of naming a local weights file
            kwargs["pretrained_file"] = overlay["file"]
        return create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"zoo model {name!r} (built by zoo.create_model)"
    return create


def register_in_timm(specs: Iterable[Any]) -> None:
    from timm.models import is_model
    from timm.models._registry import register_model

    for spec in specs:
        if spec.name in REGISTERED:
            continue
        if is_model(spec.name):  # timm's own name: timm keeps it, the zoo's stays reachable via zoo
            continue
        register_model(_entrypoint(spec.name))
        REGISTERED.append(spec.name)
