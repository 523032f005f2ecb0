"""DCAL's attention blocks: a ViT block that runs self-attention (SA) and, in training, pair-wise cross-attention
(PWCA: the queries of one image against the keys/values of both it and its partner), the global-local
cross-attention block (GLCA: the top-R tokens by attention rollout as queries, every token as keys/values),
and the rollout itself (the class token's row of the product of head-averaged, residual-corrected attention
maps). The model is :mod:`zoo.models.dcal`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

def _split_qkv(attn: nn.Module, x: torch.Tensor, which: str = "qkv") -> list[torch.Tensor]:
    """timm ``Attention``'s projections of ``x [B, n, D]`` as ``[B, H, n, d]`` tensors, only the ``which``
    ones (the fused ``qkv`` weight is sliced, so no unused projection is computed)."""
    B, n, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    if which == "qkv":  # one GEMM, as timm
        q, k, v = attn.qkv(x).view(B, n, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        return [attn.q_norm(q), attn.k_norm(k), v]
    rows = {"q": 0, "k": 1, "v": 2}
    out = []
    for name in which:
        i = rows[name]
        w = attn.qkv.weight[i * H * d:(i + 1) * H * d]
        b = None if attn.qkv.bias is None else attn.qkv.bias[i * H * d:(i + 1) * H * d]
        t = F.linear(x, w, b).view(B, n, H, d).transpose(1, 2)
        t = attn.q_norm(t) if name == "q" else attn.k_norm(t) if name == "k" else t
        out.append(t)
    return out


def _attn_out(attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, d]`` attention output -> timm ``Attention``'s output projection ``[B, n, D]``."""
    B, H, n, d = o.shape
    return attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, n, H * d))))


def _chunked_attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             chunk_elems: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention without gradient, ``(out [B, H, n, d], head-mean probabilities [B, n, n] fp32)``,
    computed per image over blocks of query rows so that each block's probabilities (``H x rows x n``, about
    1 MB) stay in cache (the fused SDPA kernel cannot return the probabilities; ``results/dcal.md`` has the
    timings that motivated the blocking)."""
    B, H, n, _ = q.shape
    rows = max(16, chunk_elems // (H * n))
    out = torch.empty_like(q)
    probs = torch.empty(B, n, n, device=q.device, dtype=torch.float32)
    kt, qs = k.transpose(-2, -1), q * scale
    for b in range(B):
        for i in range(0, n, rows):
            p = (qs[b, :, i:i + rows] @ kt[b]).softmax(-1)  # [H, rows, n]
            out[b, :, i:i + rows] = p @ v[b]
            probs[b, i:i + rows] = p.float().mean(0)
    return out, probs


class DCALBlock(Block):
    """timm ``Block`` (unchanged parameters; ``forward`` is timm's) with the two DCAL passes:
    ``forward_sa`` (self-attention that also returns the head-mean probabilities and its keys / values)
    and ``forward_pwca`` (queries of this stream over its own and a partner's keys / values)."""

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_sa(self, x: torch.Tensor, need_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
        """``x [B, n, D]`` -> ``(x_out, S [B, n, n] fp32 head-mean probabilities (no grad) or None, (k, v))``."""
        a = self.attn
        q, k, v = _split_qkv(a, self.norm1(x), "qkv")
        if need_probs and not torch.is_grad_enabled():  # inference: explicit attention in query chunks
            o, probs = _chunked_attention_probs(q, k, v, a.scale)
        elif need_probs:  # explicit attention: the rollout needs the probabilities
            p = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
            probs = p.detach().float().mean(1)
            o = a.attn_drop(p) @ v
        else:
            probs = None
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        x = x + self.drop_path1(self.ls1(_attn_out(a, o)))
        return self._mlp(x), probs, (k, v)

    def forward_pwca(self, x: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """PWCA with this block's (= SA's) weights: queries of ``x``, keys / values ``[x; partner]``."""
        a = self.attn
        q, k, v = _split_qkv(a, self.norm1(x), "qkv")
        o = F.scaled_dot_product_attention(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2),
                                           dropout_p=a.attn_drop.p if self.training else 0.0)
        x = x + self.drop_path1(self.ls1(_attn_out(a, o)))
        return self._mlp(x)


class GLCABlock(Block):
    """The GLCA block: a timm ``Block`` (own weights, same names) whose queries are the class token and the
    selected tokens only, while keys and values come from every token."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, return_attn: bool = False):  # type: ignore[override]
        """``x [B, 1+N, D]``, ``idx [B, R]`` patch positions (0..N-1) -> ``[B, 1+R, D]`` (+ probabilities
        ``[B, H, 1+R, 1+N]`` with ``return_attn``)."""
        a = self.attn
        B, _, D = x.shape
        pos = torch.cat([idx.new_zeros(B, 1), idx + 1], 1)  # class token first
        h = self.norm1(x)
        hq = h.gather(1, pos[..., None].expand(-1, -1, D))
        (q,) = _split_qkv(a, hq, "q")
        k, v = _split_qkv(a, h, "kv")
        if return_attn:
            p = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
            o = a.attn_drop(p) @ v
        else:
            p = None
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        y = x.gather(1, pos[..., None].expand(-1, -1, D)) + self.drop_path1(self.ls1(_attn_out(a, o)))
        y = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
        return (y, p) if return_attn else y


def residual_attention(s: torch.Tensor) -> torch.Tensor:
    """``0.5 S + 0.5 I``, rows re-normalised (they already sum to one up to rounding)."""
    s = 0.5 * s + 0.5 * torch.eye(s.shape[-1], device=s.device, dtype=s.dtype)
    return s / s.sum(-1, keepdim=True)


def rollout_cls_row(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Class row of ``S_bar_L ... S_bar_1`` for head-mean probabilities ``probs`` (layer order, ``[B, n, n]``):
    ``[B, n]``, a distribution over the tokens. A row vector times each matrix (N^2 work per layer), without
    forming ``S_bar``: ``r S_bar = 0.5 (r / c) S + 0.5 (r / c)`` with ``c`` the row sums of ``0.5 S + 0.5 I``."""
    B, n, _ = probs[-1].shape
    r = torch.zeros(B, 1, n, device=probs[-1].device, dtype=probs[-1].dtype)
    r[:, 0, 0] = 1.0
    for s in reversed(probs):
        r = r / (0.5 * s.sum(-1) + 0.5).unsqueeze(1)
        r = 0.5 * (r @ s) + 0.5 * r
    return r[:, 0]
