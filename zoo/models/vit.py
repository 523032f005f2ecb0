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
  timm-ViT-based model of the same shape. The net is a :class:`ZooVisionTransformer`: timm's class with the
  zoo contract mixin, so it has timm's whole surface (``forward_intermediates``,
  ``set_grad_checkpointing``, ``reset_classifier`` ...) with timm's semantics (``no_weight_decay``
  lists only the parameters that exist), and no optional capability.
"""
from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

from ..contract import ZooModel
from ..layers.pos_embed import check_patch_grid, check_pos_embed_init, init_sincos_pos_embed_
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = "Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, ICLR 2021"
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

NANO_ARCH = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=6, mlp_ratio=2.0)


class ZooVisionTransformer(ZooModel, VisionTransformer):
    """timm's ``VisionTransformer`` as a zoo net: same modules, state-dict keys and methods."""

    def no_weight_decay(self) -> set[str]:
        """timm's set, restricted to the parameters this net has (timm also names absent prefix tokens)."""
        names = dict(self.named_parameters())
        return {n for n in super().no_weight_decay() if n in names}


def vit_nano_backbone(*, pos_embed_init: str = "sincos", **kwargs: Any) -> ZooVisionTransformer:
    """The ``vit_nano`` network (any timm ``VisionTransformer`` kwargs override the nano shape)."""
    check_pos_embed_init(pos_embed_init)
    arch = {**NANO_ARCH, **kwargs}
    check_patch_grid(arch["img_size"], arch["patch_size"])
    vit = ZooVisionTransformer(**arch)
    if pos_embed_init == "sincos":
        init_sincos_pos_embed_(vit.pos_embed, vit.patch_embed.grid_size, vit.embed_dim)
    return vit


@register_model(input_size=(3, 32, 32), fixed_input_size=True, mean=INCEPTION_MEAN, std=INCEPTION_STD, paper=PAPER,
                source="timm VisionTransformer (32 px, patch 4, 6 x 96-d, 6 heads, MLP ratio 2, sin-cos start)",
                task="classification", paper_ids=("arXiv:2010.11929",), first_conv="patch_embed.proj",
                weights=Weights(note="CPU variant: train it (experiment=vit_nano_digits)"))
def vit_nano(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CPU ViT for the embedded digits; no published weights (train it: ``experiment=vit_nano_digits``)."""
    return vit_nano_backbone(**kwargs)
