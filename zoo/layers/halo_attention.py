"""Blocked local (halo) attention with a selectable execution, for timm's ``HaloAttn`` (``zoo.models.halonet``).

:class:`HaloAttention` is timm's ``HaloAttn`` (same parameters, same state dict, same maths) whose ``forward``
runs one of :data:`ATTN_IMPLS`:

- ``"timm"``: timm's own forward (unfold the padded k/v, ``QK^T * scale + rel_pos(q)``, softmax, ``AV``).
- ``"sdpa"``: the same attention through ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU).
  timm's relative-position logits are an additive bias, so they are passed as a float
  ``attn_mask``; they are built without timm's pad/reshape trick: timm's index arithmetic gives the key at
  window position ``(ky, kx)`` of the query at block position ``(qy, qx)`` the table rows
  ``height_rel[ky - qy + win - 1]`` and ``width_rel[kx - qx + win - 1]``, so ``q @ [height_rel; width_rel]^T``
  followed by one gather of those rows gives the two per-axis terms (``[.., win]`` each) whose broadcast sum is
  the bias. The padded keys are kept (not masked), as timm's. The k/v windows are one copy (``unfold`` views
  without autograd, ``index_select`` with it: a cheaper backward than unfold's). Where the fused kernel cannot
  take it (CPU training: the bias needs a gradient; q/k and v head widths that differ, ``qk_ratio != 1``) the
  same bias runs with plain matmuls.

Both give the same outputs and gradients (``tests/test_halo_attention.py``: within 1e-5, fp32). Which one is
faster where: ``results/halonet.md``.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from torch import nn

ATTN_IMPLS = ("timm", "sdpa")


@lru_cache(maxsize=16)
def _rel_index(bq: int, win: int, device: torch.device) -> torch.Tensor:
    """``[bq, bq, 2 win]``: for the query at block position ``(qy, qx)``, the rows of ``[height_rel; width_rel]``
    (``2 win - 1`` rows each) that timm's ``rel_logits_1d`` pairs with window rows ``ky`` then columns ``kx``."""
    r = 2 * win - 1
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference_mode call
        k, p = torch.arange(win, device=device), torch.arange(bq, device=device)
        rel = k[None, :] - p[:, None] + win - 1  # [bq, win]: relative index of key k for query p (one axis)
        return torch.cat([rel[:, None, :].expand(bq, bq, win), r + rel[None, :, :].expand(bq, bq, win)], dim=-1)


@lru_cache(maxsize=16)
def _window_index(nh: int, nw: int, bs: int, win: int, wp: int, device: torch.device) -> torch.Tensor:
    """``[nh * nw * win * win]``: flat positions, in the padded map of width ``wp``, of every block's window."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference_mode call
        y = (torch.arange(nh, device=device)[:, None] * bs + torch.arange(win, device=device)).view(nh, 1, win, 1)
        x = (torch.arange(nw, device=device)[:, None] * bs + torch.arange(win, device=device)).view(1, nw, 1, win)
        return (y * wp + x).reshape(-1)


def _windows(kv: torch.Tensor, heads: int, bs: int, hs: int, win: int) -> torch.Tensor:
    """The zero-padded ``win x win`` window of every block, head dim last: ``[B * heads, blocks, win * win, c]``
    (``c`` = kv channels per head; channels split (heads, c) as timm's reshape). Without autograd: one copy of
    ``unfold`` views; with it, ``index_select`` (its backward, an index_add, is ~3x faster than unfold's)."""
    B, C, H, W = kv.shape
    nh, nw, c = H // bs, W // bs, C // heads
    kv = F.pad(kv, [hs, hs, hs, hs])
    if not (torch.is_grad_enabled() and kv.requires_grad):
        kv = kv.unfold(2, win, bs).unfold(3, win, bs)  # [B, C, nh, nw, win, win] (a view)
        kv = kv.reshape(B, heads, c, nh, nw, win, win).permute(0, 1, 3, 4, 5, 6, 2)
        return kv.contiguous().view(B * heads, nh * nw, win * win, c)  # contiguous: head dim at stride 1
    hp, wp = kv.shape[-2:]
    kv = kv.view(B, heads, c, hp * wp).transpose(2, 3)
    return kv.index_select(2, _window_index(nh, nw, bs, win, wp, kv.device)).view(B * heads, nh * nw, win * win, c)


def halo_attention_sdpa(attn: HaloAttn, x: torch.Tensor) -> torch.Tensor:
    """timm ``HaloAttn.forward`` (``attn``'s parameters) executed by SDPA with the position logits as a bias.

    On CPU under autograd the bias needs a gradient, for which torch's SDPA falls back to its unfused math
    (measured slower than plain matmuls), so CPU training runs the same bias with plain matmuls; so do heads
    whose q/k and v widths differ (the fused kernels want one head width). CUDA always takes SDPA there."""
    B, _, H, W = x.shape
    bs, hs, win, bq = attn.block_size, attn.halo_size, attn.win_size, attn.block_size_ds
    if H % bs or W % bs:
        raise ValueError(f"halo attention needs its input map divisible by the block size {bs}, got {H}x{W}: "
                         "use an image size the model's size_divisor divides")
    heads, dqk, dv = attn.num_heads, attn.dim_head_qk, attn.dim_head_v
    nh, nw = H // bs, W // bs
    G, nb = B * heads, nh * nw
    # queries: channels split (heads, dqk) as timm's reshape; one copy into [G, blocks, bq*bq, dqk] (the fused
    # kernels need the head dim at stride 1, which reshape alone does not give when there is one block)
    q = attn.q(x).view(B, heads, dqk, nh, bq, nw, bq).permute(0, 1, 3, 5, 4, 6, 2).contiguous().view(G, nb, bq * bq, dqk)
    k, v = _windows(attn.kv(x), heads, bs, hs, win).split([dqk, dv], dim=-1)
    pe = attn.pos_embed
    logits = (q @ torch.cat([pe.height_rel, pe.width_rel]).t()).view(G, nb, bq, bq, -1)  # [.., 2 (2 win - 1)]
    rel = logits.gather(-1, _rel_index(bq, win, x.device).expand(G, nb, bq, bq, 2 * win))
    bias = (rel[..., :win, None] + rel[..., None, win:]).view(G, nb, bq * bq, win * win)  # height + width term
    if attn.scale_pos_embed:
        bias = bias * attn.scale
    if dqk == dv and not (x.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    else:
        out = ((q @ k.transpose(-1, -2)) * attn.scale + bias).softmax(-1) @ v
    out = out.view(B, heads, nh, nw, bq, bq, dv).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, heads * dv, nh * bq, nw * bq)
    return attn.pool(out)


class HaloAttention(HaloAttn):
    """timm's ``HaloAttn`` whose forward runs ``attn_impl`` (one of :data:`ATTN_IMPLS`); built by
    :func:`set_halo_attn_impl` from an existing ``HaloAttn`` (modules and state dict unchanged)."""

    attn_impl = "timm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn_impl == "sdpa":
            return halo_attention_sdpa(self, x)
        return super().forward(x)


def set_halo_attn_impl(model: nn.Module, attn_impl: str) -> nn.Module:
    """Make every ``HaloAttn`` of ``model`` a :class:`HaloAttention` running ``attn_impl``; returns ``model``."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    for m in model.modules():
        if isinstance(m, HaloAttn):
            m.__class__ = HaloAttention
            m.attn_impl = attn_impl
    return model
