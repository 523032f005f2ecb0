"""Position-embedding starts shared by the zoo's ViT-based models."""
from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed, to_2tuple

from ..errors import ModelArgumentError


@torch.no_grad()
def init_sincos_pos_embed_(pos_embed: torch.Tensor, grid_size: tuple[int, int] | list[int], embed_dim: int) -> None:
    """Overwrite ``pos_embed [1, prefix + h*w, D]`` in place with a 2-D sin-cos table for the ``h x w`` patch
    grid; prefix-token rows (class token first) become zero. The parameter stays learnable: on the tiny
    embedded data a sin-cos start learns much faster than trunc-normal."""
    table = build_sincos2d_pos_embed(list(grid_size), embed_dim).reshape(1, -1, embed_dim)
    pos_embed.zero_()
    pos_embed[:, pos_embed.shape[1] - table.shape[1]:].copy_(table.to(pos_embed))


def check_pos_embed_init(value: str) -> None:
    if value not in ("sincos", "trunc_normal"):
        raise ValueError(f"pos_embed_init must be 'sincos' or 'trunc_normal', got {value!r}")


def check_patch_grid(img_size, patch_size) -> None:
    """Refuse, at build time, an image size the patch size does not divide: timm's patch embedding would
    silently drop the border pixels that do not fill a patch."""
    size, patch = to_2tuple(img_size), to_2tuple(patch_size)
    if any(s % p for s, p in zip(size, patch)):
        fit = [max(p, (s // p) * p) for s, p in zip(size, patch)]
        raise ModelArgumentError(
            f"img_size={size[0] if size[0] == size[1] else size} is not a multiple of the patch size "
            f"{patch[0] if patch[0] == patch[1] else patch}: the last {size[0] % patch[0]} pixels of each side would be "
            f"dropped. Use img_size={fit[0] if fit[0] == fit[1] else tuple(fit)} (in train.py data.img_size=...)."
        )
