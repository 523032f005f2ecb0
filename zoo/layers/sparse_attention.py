"""Attention under a per-query key mask, executed sparsely (the work shrinks with the kept fraction), and the
top-k selection that builds such masks. Written for Sparsifiner (``zoo.models.sparsifiner``); any model whose
queries each keep their own K keys can use them.

- :func:`csr_attention`: SDDMM + softmax + SpMM over one block-diagonal CSR pattern (inference; no autograd).
- :func:`gather_attention`: each query gathers its K keys and values (differentiable).
- :func:`sdpa_masked_attention`: the mask as a float bias to ``F.scaled_dot_product_attention`` (dense work in a
  fused kernel with a backward; training).
- :func:`masked_dense_attention`: dense scores, masked, softmax: the reference the others are tested against.
- :func:`spmm`: CSR x dense through ``F.embedding_bag`` (FBGEMM on CPU).
- :func:`topk_nonneg`, :func:`topk_indices_nonneg`: faster exact top-k for non-negative float scores.

The CPU timings behind these kernel choices are in ``results/sparsifiner.md``.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float,
                     chunk: int = 4096) -> torch.Tensor:
    """Softmax attention of each query over its own K keys only.

    ``q: [B, H, M, d]``, ``k, v: [B, H, n, d]``, ``idx: [B, H, M, K]`` (key positions per query) ->
    ``[B, H, M, d]``. Work and memory are ``M K d``, not ``M n d``. Rows are processed in chunks so that the
    gathered keys and values stay cache-sized.
    """
    B, H, M, d = q.shape
    n, K = k.shape[2], idx.shape[-1]
    flat = (idx + (torch.arange(B * H, device=idx.device) * n).view(B, H, 1, 1)).reshape(B * H * M, K)
    kf, vf, qf = k.reshape(B * H * n, d), v.reshape(B * H * n, d), q.reshape(B * H * M, 1, d)
    out = []
    for s in range(0, B * H * M, chunk):
        ii = flat[s:s + chunk].reshape(-1)
        ks = kf.index_select(0, ii).view(-1, K, d)
        vs = vf.index_select(0, ii).view(-1, K, d)
        p = (torch.bmm(qf[s:s + chunk], ks.transpose(1, 2)) * scale).softmax(-1)  # [c, 1, K]
        out.append(torch.bmm(p, vs))
    return torch.cat(out).view(B, H, M, d)


def spmm(cols: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse (CSR) x dense: row ``i`` of the result is ``sum_j values[i, j] * dense[cols[i, j]]``.

    ``cols, values: [R, K]`` (K entries per row), or flat with ``offsets`` (the CSR row starts, rows of any
    length). Executed by ``F.embedding_bag(mode="sum", per_sample_weights=...)``, which IS a CSR SpMM (offsets =
    crow, indices = col, weights = values) and runs FBGEMM's kernel on CPU, several times faster than
    ``torch.sparse_csr_tensor @ dense`` at the sizes Sparsifiner uses."""
    return F.embedding_bag(cols, dense.contiguous(), offsets, mode="sum",  # FBGEMM's fast path wants contiguous
                           per_sample_weights=values.to(dense.dtype).contiguous())


@lru_cache(maxsize=32)
def _cls_pattern(G: int, n: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed part of :func:`csr_attention`'s block-diagonal pattern: the row starts of all ``G * n`` rows
    (the class row of each block has ``n`` entries, the others ``K``) and the class rows' global columns."""
    per = n + (n - 1) * K
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=device), n + torch.arange(0, n - 1, device=device) * K])
    crow = torch.cat([(starts + (torch.arange(G, device=device) * per)[:, None]).reshape(-1),
                      torch.tensor([G * per], device=device)])
    cls_cols = torch.arange(n, device=device) + (torch.arange(G, device=device) * n)[:, None]  # [G, n]
    return crow, cls_cols


def csr_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention under the connectivity mask with sparse kernels (the inference path; no autograd).

    ``q, k, v: [B, H, n, d]``, ``idx: [B, H, n-1, K]`` (the kept keys of rows 1..; row 0, the class token, is
    dense) -> output ``[B, H, n, d]`` and the class row's attention ``[B, H, n]`` (token pruning ranks by it).
    SDDMM (``torch.sparse.sampled_addmm``) computes only the kept scores, a softmax per row, then SpMM
    (:func:`spmm`) for ``AV``: ``(n + (n-1) K) d`` multiply-adds per product and head. One block-diagonal
    pattern over all (sample, head) blocks serves both products: no gathered copies, no slicing copies, no
    separate class-row product."""
    B, H, n, d = q.shape
    M, K, G = n - 1, idx.shape[-1], B * H
    per = n + M * K  # stored entries per (sample, head)
    crow, cls_cols = _cls_pattern(G, n, K, q.device)
    goff = (torch.arange(G, device=q.device) * n).view(G, 1, 1)
    cols = torch.cat([cls_cols, (idx.reshape(G, M, K) + goff).view(G, M * K)], dim=1).view(-1)
    pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(G * per, dtype=q.dtype, device=q.device),
                                      size=(G * n, G * n), check_invariants=False)  # zeros: beta=0 still reads them
    s = torch.sparse.sampled_addmm(pattern, q.reshape(G * n, d), k.reshape(G * n, d).t(), beta=0.0,
                                   alpha=scale).values().view(G, per)
    p = torch.cat([s[:, :n].softmax(-1), s[:, n:].reshape(G, M, K).softmax(-1).view(G, M * K)], dim=1)
    return spmm(cols, p.view(-1), v.reshape(G * n, d), crow[:-1]).view(B, H, n, d), p[:, :n].view(B, H, n)


def topk_nonneg(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsorted top-``k`` along the last dim of a NON-NEGATIVE float32 tensor, same result as ``x.topk``: the bit
    patterns of non-negative IEEE floats order like int32, and the CPU top-k is faster on integers."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return x.topk(k, dim=-1, sorted=False)
    vals, ids = x.contiguous().view(torch.int32).topk(k, dim=-1, sorted=False)
    return vals.view(torch.float32), ids


@lru_cache(maxsize=4)
def _select_pool(workers: int):
    """One thread pool per thread count for :func:`topk_indices_nonneg`, created on first use."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="sparsifiner-topk")


def topk_indices_nonneg(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of :func:`topk_nonneg` (the connectivity mask: no values, no gradient). On CPU, numpy's
    ``argpartition`` (introselect on the int32 view) over row blocks in ``torch.get_num_threads()`` threads (it
    releases the GIL), faster than the int32 ``topk``. Equal scores at the boundary may pick a different (equally
    valid) key than ``torch.topk``."""
    n = x.shape[-1]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad or k >= n or x.numel() < 65536:
        return topk_nonneg(x, min(k, n))[1]
    import numpy as np

    a = x.detach().contiguous().view(torch.int32).reshape(-1, n).numpy()
    out = np.empty((a.shape[0], k), dtype=np.int64)
    workers = max(1, torch.get_num_threads())
    bounds = np.linspace(0, a.shape[0], workers + 1).astype(int)

    def select(lo: int, hi: int) -> None:
        out[lo:hi] = np.argpartition(a[lo:hi], n - k, axis=-1)[:, n - k:]

    list(_select_pool(workers).map(select, bounds[:-1], bounds[1:]))
    return torch.from_numpy(out).view(*x.shape[:-1], k)


def sdpa_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """:func:`masked_dense_attention` through ``F.scaled_dot_product_attention``: the connectivity becomes an
    additive float mask (0 on the kept keys, -inf elsewhere; it needs no gradient, so torch's fused CPU kernel
    runs forward AND backward). Dense work (``M n d``), but no score tensor is kept for the backward. A float
    mask, not a boolean one: on CPU the fused kernel converts a boolean mask first (measured slower)."""
    mask = torch.full((*idx.shape[:-1], k.shape[2]), float("-inf"), dtype=q.dtype, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.scatter_(-1, idx, 0.0), scale=scale)


def masked_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """The official execution: dense ``QK^T``, keys outside ``idx`` set to -inf, softmax, ``AV``."""
    mask = torch.zeros(*idx.shape[:-1], k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
    attn = (q @ k.transpose(-2, -1)) * scale
    return torch.nan_to_num(attn.masked_fill(~mask, float("-inf")).softmax(-1)) @ v
