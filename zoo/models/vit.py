"""Plain ViT (timm ``VisionTransformer``), registered for the zoo's CPU data and as a backbone for
prompt-tuning models (Prompt-CAM puts class prompts on a frozen ViT trained here).

Paper: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. Origin: timm 1.0 ``timm.models.vision_transformer.VisionTransformer`` (unchanged: class token,
learned absolute position embedding, pre-norm blocks, ``Linear(D, C)`` head on the class token).

Documented choices:
- ``vit_nano`` is a CPU variant for the embedded 32 px digits: 4x4 patches (64 tokens + class token),
  6 blocks of width 96, 6 heads (head width 16; six heads give Prompt-CAM's trait ranking something to
  rank), MLP ratio 2. The position embedding *starts* from a 2-D sin-cos table (class token row 0) and is
  still learned: on digits a trunc-normal start learned much more slowly (DependencyViT and Sparsifiner
  nano, same observation).
- Normalisation: Inception mean / std (0.5), the statistics Prompt-CAM uses for all its backbones, so that
  a ``vit_nano`` checkpoint is a drop-in Prompt-CAM backbone with the same preprocessing.
- The state-dict keys are timm's, so a zoo checkpoint of ``vit_nano`` (``net.``-prefixed) loads into any
  timm-ViT-based model of the same shape.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ..registry import register_model

PAPER = "Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, ICLR 2021"
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

NANO_ARCH = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=6, mlp_ratio=2.0)


def init_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Overwrite ``vit.pos_embed`` with a 2-D sin-cos table (prefix-token rows zero); it stays learnable."""
    with torch.no_grad():
        grid = list(vit.patch_embed.grid_size)
        table = build_sincos2d_pos_embed(grid, vit.embed_dim).reshape(1, -1, vit.embed_dim)
        vit.pos_embed.zero_()
        vit.pos_embed[:, vit.pos_embed.shape[1] - table.shape[1]:].copy_(table)


def vit_nano_backbone(*, pos_embed_init: str = "sincos", **kwargs: Any) -> VisionTransformer:
    """The ``vit_nano`` network (any timm ``VisionTransformer`` kwargs override the nano shape)."""
    vit = VisionTransformer(**{**NANO_ARCH, **kwargs})
    if pos_embed_init == "sincos":
        init_sincos_pos_embed(vit)
    elif pos_embed_init != "trunc_normal":
        raise ValueError(f"pos_embed_init must be 'sincos' or 'trunc_normal', got {pos_embed_init!r}")
    return vit


@register_model(input_size=(3, 32, 32), fixed_input_size=True, mean=INCEPTION_MEAN, std=INCEPTION_STD, paper=PAPER,
                source="timm VisionTransformer (32 px, patch 4, 6 x 96-d, 6 heads, MLP ratio 2, sin-cos start)",
                task="classification")
def vit_nano(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CPU ViT for the embedded digits; no published weights (train it: ``experiment=vit_nano_digits``)."""
    if pretrained:
        raise ValueError("vit_nano has no published weights; train it (experiment=vit_nano_digits) or use pretrained_file=")
    return vit_nano_backbone(**kwargs)
