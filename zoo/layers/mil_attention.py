"""Gated attention pooling for multiple-instance learning (Ilse et al. 2018), batched with padding masks."""
from __future__ import annotations

import torch
from torch import nn


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` (broadcastable, True = real instance) removes padded entries.

    Uses the dtype's minimum rather than -1e9, which overflows in fp16/bf16.
    """
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim)


def tile_grid(coords: torch.Tensor):
    """Tile coordinates (pixels, any step) of one bag layout ``[B, N, 2]`` -> grid rows, cols and size."""
    xy = coords[0].long()
    xy = xy - xy.min(0).values
    steps = [torch.diff(torch.unique(xy[:, d])) for d in (0, 1)]
    step = int(min((s.min() for s in steps if len(s)), default=torch.tensor(1)).item()) or 1
    cols, rows = (xy[:, 0] // step), (xy[:, 1] // step)
    return rows, cols, (int(rows.max()) + 1, int(cols.max()) + 1)


class GatedAttention(nn.Module):
    """``A = w(tanh(V h) * sigmoid(U h))``: one attention logit per instance and branch.

    ``V`` and ``U`` are shared by all branches; only ``w`` (``attn_dim -> branches``) differs, as in
    ACMIL's ``Attention_Gated``. Returns logits ``[B, branches, N]`` (not yet softmaxed or masked).
    """

    def __init__(self, dim: int, attn_dim: int = 128, branches: int = 1, dropout: float = 0.0):
        super().__init__()
        self.attention_V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid())
        self.drop = nn.Dropout(dropout)
        self.attention_weights = nn.Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention_weights(self.drop(self.attention_V(h) * self.attention_U(h)))  # [B, N, M]
        return a.transpose(1, 2)
