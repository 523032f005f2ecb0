"""Sparsifiner's attention layer: the low-rank connectivity predictor (``MaskPredictor``) and a timm ViT
``Attention`` / ``Block`` that runs dense, reconstruction or sparse attention, with the sparse executions of
:data:`EXECUTIONS` over the kernels of :mod:`zoo.layers.sparse_attention`. What one forward pass threads through
the blocks is a :class:`SparseContext`. The model is :mod:`zoo.models.sparsifiner`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Attention, Block
from torch import nn

from .sparse_attention import (csr_attention, gather_attention, masked_dense_attention, sdpa_masked_attention, spmm,
                               topk_indices_nonneg, topk_nonneg)

EXECUTIONS = ("auto", "csr", "sdpa", "gather", "masked")  # how the sparse attention runs (the model's docstring)


# ---------------------------------------------------------------------------------------- predictor
class MaskPredictor(nn.Module):
    """Low-rank connectivity predictor of one layer (official ``MaskPredictor``, same parameter names)."""

    def __init__(self, *, dim: int, num_heads: int, num_tokens: int, reduce_n_factor: int = 6,
                 reduce_c_factor: int = 2, share_inout_proj: bool = False, basis_threshold: float = 2e-2,
                 coef_topk: int = 8):
        super().__init__()
        self.num_tokens, self.num_heads = num_tokens, num_heads
        self.head_dim = dim // num_heads
        self.reduced_c = self.head_dim // reduce_c_factor
        self.reduced_n = int(num_tokens // reduce_n_factor)
        self.scale = num_heads ** -0.5  # the code's scale (not head_dim ** -0.5)
        self.basis_threshold, self.coef_topk = basis_threshold, coef_topk
        self.proj_c_q = nn.Linear(self.head_dim, self.reduced_c)
        self.proj_c_k = nn.Linear(self.head_dim, self.reduced_c)
        self.proj_n = nn.Parameter(torch.zeros(num_tokens, self.reduced_n))
        trunc_normal_(self.proj_n, std=0.02)
        self.share_inout_proj = share_inout_proj
        if not share_inout_proj:
            self.proj_back_n = nn.Parameter(torch.zeros(num_tokens, self.reduced_n))
            trunc_normal_(self.proj_back_n, std=0.02)

    def _back(self) -> torch.Tensor:
        return self.proj_n if self.share_inout_proj else self.proj_back_n

    def coefficients(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q' k'' * scale)`` for the non-class queries: ``[B, H, n-1, r]``."""
        P = self.proj_n if keep is None else self.proj_n[keep].unsqueeze(1)  # [n, r] or [B, 1, n, r]
        kP = k.transpose(-1, -2) @ P  # [B, H, d, r]: token reduction first (cheaper, same result)
        k2 = self.proj_c_k.weight @ kP + self.proj_c_k.bias[:, None] * P.sum(-2, keepdim=True)  # [B, H, c, r]
        A = self.proj_c_q.weight.t() @ k2  # [B, H, d, r]
        bias = (self.proj_c_q.bias[:, None] * k2).sum(-2, keepdim=True)  # [B, H, 1, r]
        return ((q[:, :, 1:] @ A + bias) * self.scale).softmax(-1)

    def basis(self, keep: torch.Tensor | None, threshold: bool) -> torch.Tensor:
        """``W_up`` restricted to the current tokens: ``[r, n]`` or ``[B, 1, r, n]``."""
        W = self._back().t()
        if threshold:
            W = F.threshold(W.abs(), self.basis_threshold, 0.0)  # |W_up| kept, as the code
        return W if keep is None else W[:, keep].permute(1, 0, 2).unsqueeze(1)

    def approx_attn(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, recon: bool) -> torch.Tensor:
        """``A_hat: [B, H, n-1, n]``: dense ``C @ W_up`` when fitting (recon), else top-k coefficients x
        thresholded basis, executed by gathering the top-k basis rows."""
        coef = self.coefficients(q, k, keep)
        basis = self.basis(keep, threshold=not recon)
        if recon:
            return coef @ basis
        t = min(self.coef_topk, coef.shape[-1])
        vals, ids = topk_nonneg(coef.detach(), t)  # [B, H, m, t]; softmax output: non-negative
        B, H, m, _ = ids.shape
        r, n = basis.shape[-2:]
        if basis.dim() == 4:  # per-sample basis after token pruning: stack the samples' bases
            ids = ids + (torch.arange(B, device=ids.device) * r).view(B, 1, 1, 1)
        # sparse (t nonzeros per row) coefficients x basis: one CSR x dense product, t * n MACs per query
        return spmm(ids.reshape(-1, t), vals.reshape(-1, t), basis.detach().reshape(-1, n)).view(B, H, m, n)

    def connectivity(self, approx: torch.Tensor, budget: int) -> torch.Tensor:
        """Top-``budget`` key indices per query row: ``[B, H, n-1, budget]`` (detached, like the code's mask)."""
        return topk_indices_nonneg(approx.detach(), budget)  # C >= 0 and |W_up| >= 0: A_hat is non-negative


# ---------------------------------------------------------------------------------------- attention / block
@dataclass
class SparseContext:
    """What one forward pass threads through the blocks (no module state is mutated)."""

    mode: str  # "dense" | "recon" | "sparse"
    keep: torch.Tensor | None = None  # [B, n] original positions of the current tokens (after pruning)
    pruned: bool = False
    record_attn: bool = False  # keep dense attention probabilities (teacher targets)
    record_idx: bool = False  # keep connectivity indices (attention maps)
    need_cls_attn: bool = False
    approx: list = field(default_factory=list)
    attn: list = field(default_factory=list)
    idx: list = field(default_factory=list)
    keeps: list = field(default_factory=list)
    cls_attn: torch.Tensor | None = None


class SparsifinerAttention(Attention):
    """timm ``Attention`` + a ``mask_predictor``; ``forward(x, ctx)`` runs dense, recon or sparse."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, num_tokens: int, attn_keep_rate: float = 0.25,
                 execution: str = "auto", **predictor_kwargs: Any):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        self.num_tokens, self.attn_keep_rate, self.execution = num_tokens, attn_keep_rate, execution
        self.mask_predictor = MaskPredictor(dim=dim, num_heads=num_heads, num_tokens=num_tokens, **predictor_kwargs)

    def resolved_execution(self, grad: bool) -> str:
        """The sparse kernel this layer runs with autograd on (``grad``) or off: ``execution``, or auto's pick."""
        return ("sdpa" if grad else "csr") if self.execution == "auto" else self.execution

    def budget(self, n: int, pruned: bool) -> int:
        b = math.ceil(self.attn_keep_rate * self.num_tokens)
        return min(b, n - 1) if pruned else min(b, n)

    def forward(self, x: torch.Tensor, ctx: SparseContext | None = None, **_: Any) -> torch.Tensor:  # type: ignore[override]
        ctx = ctx or SparseContext(mode="sparse")
        B, n, C = x.shape
        q, k, v = self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dense = ctx.mode == "dense" or self.attn_keep_rate >= 1
        if ctx.mode == "recon" and self.attn_keep_rate < 1:  # phase one: dense output, A_hat for the loss
            ctx.approx.append(self.mask_predictor.approx_attn(q, k, ctx.keep, recon=True))
        if dense or ctx.mode == "recon":
            if ctx.record_attn or ctx.need_cls_attn:
                a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
                if ctx.record_attn:
                    ctx.attn.append(a)
                ctx.cls_attn = a[:, :, 0]
                o = self.attn_drop(a) @ v
            else:
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            if ctx.record_idx:
                ctx.idx.append(None)
                ctx.keeps.append(ctx.keep)
        else:
            approx = self.mask_predictor.approx_attn(q, k, ctx.keep, recon=False)
            idx = self.mask_predictor.connectivity(approx, self.budget(n, ctx.pruned))
            if ctx.record_idx:
                ctx.idx.append(idx)
                ctx.keeps.append(ctx.keep)
            name = self.resolved_execution(torch.is_grad_enabled())
            if name == "csr":  # inference: one sparse pattern, class row included
                o, ctx.cls_attn = csr_attention(q, k, v, idx, self.scale)
            else:
                a0 = ((q[:, :, :1] @ k.transpose(-2, -1)) * self.scale).softmax(-1)  # class row: dense
                ctx.cls_attn = a0[:, :, 0]
                kernel = {"gather": gather_attention, "masked": masked_dense_attention, "sdpa": sdpa_masked_attention}[name]
                o = torch.cat([a0 @ v, kernel(q[:, :, 1:], k, v, idx, self.scale)], dim=2)
        x = o.transpose(1, 2).reshape(B, n, C)
        return self.proj_drop(self.proj(x))


class SparsifinerBlock(Block):
    """timm ``Block`` whose attention is :class:`SparsifinerAttention`; ``forward(x, ctx)``."""

    def __init__(self, dim: int, num_heads: int, *, num_tokens: int, attn_keep_rate: float,
                 execution: str, predictor_kwargs: dict, skip_lam: float = 1.0, **kwargs: Any):
        super().__init__(dim, num_heads, **kwargs)
        self.skip_lam = skip_lam  # LV-ViT: both residual branches divided by a constant (2 for LV-ViT-S)
        self.attn = SparsifinerAttention(
            dim, num_heads=num_heads, qkv_bias=kwargs.get("qkv_bias", False), attn_drop=kwargs.get("attn_drop", 0.0),
            proj_drop=kwargs.get("proj_drop", 0.0), num_tokens=num_tokens, attn_keep_rate=attn_keep_rate,
            execution=execution, **predictor_kwargs)

    def forward(self, x: torch.Tensor, ctx: SparseContext | None = None, **_: Any) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), ctx))) / self.skip_lam
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) / self.skip_lam
