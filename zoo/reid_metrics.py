"""Re-identification retrieval metrics: mAP and CMC rank-k over a query / gallery split.

The standard protocol (Market-1501, DukeMTMC-reID, MSMT17, VeRi-776; the evaluation of TransReID's
``utils/metrics.py`` ``eval_func`` and torchreid's ``eval_market1501``): every query ranks the whole gallery
by distance; gallery items of the query's identity taken by the query's camera are left out of that query's
list (same pid AND same camid); a query with no match left is not counted. Per query:

* CMC rank-k: 1 if a match is among the first k kept items;
* AP: the mean, over the query's matches, of the precision at each match's rank in the kept list.

Reported over the valid queries: ``map`` (mean AP) and ``rank{k}`` (mean CMC at k), all in [0, 1].

One vectorised torch implementation, in blocks of query rows (MSMT17's 11,659 x 82,161 distances never exist
at once). Ties in distance rank by gallery order (a stable sort). No Lightning import.

Optional k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), as TransReID's ``TEST.RE_RANKING`` runs it (``k1=50, k2=15, lambda=0.3``):
:func:`re_ranking` gives the re-ranked query x gallery distances that :func:`retrieval_metrics` then ranks.
It holds dense ``n x n`` matrices over all ``n = nq + ng`` images (Market-1501: 19,281), so it is for
Market/Duke-sized splits; the official numpy code stores its encodings in float16, this one in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "cosine")

__all__ = ["DISTANCES", "distance_matrix", "re_ranking", "retrieval_metrics"]


def distance_matrix(q: torch.Tensor, g: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """``[nq, ng]`` distances: ``"euclidean"``, the squared Euclidean distance (TransReID's
    ``euclidean_distance``: the square root does not change a ranking), or ``"cosine"``, ``1 - cos``."""
    q, g = q.float(), g.float()
    if distance == "euclidean":
        return (q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None] - 2 * q @ g.T).clamp_(min=0)
    if distance == "cosine":
        return 1 - F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


@torch.no_grad()
def re_ranking(q: torch.Tensor, g: torch.Tensor, k1: int = 50, k2: int = 15, lambda_value: float = 0.3,
               block: int = 256) -> torch.Tensor:
    """k-reciprocal re-ranked distances ``[nq, ng]`` of query features ``q [nq, D]`` to gallery features ``g``.

    Over all ``n`` images, with squared Euclidean distances ``d`` normalised by each row's maximum: the
    k-reciprocal neighbours ``R(i, k1)`` (``j`` among ``i``'s ``k1 + 1`` nearest and ``i`` among ``j``'s), expanded
    by every ``R(c, round(k1 / 2))`` of a ``c`` in ``R(i, k1)`` that shares more than 2/3 of itself with it; the
    encoding ``V_i = exp(-d_i)`` on that set, normalised to sum 1, averaged over ``i``'s ``k2`` nearest (local
    query expansion); the Jaccard distance ``1 - m / (2 - m)`` with ``m = sum_k min(V_ik, V_jk)``; and the
    result ``(1 - lambda) * Jaccard + lambda * d``."""
    if k1 < 1 or k2 < 1 or not 0 <= lambda_value <= 1:
        raise ValueError(f"re-ranking needs k1 >= 1, k2 >= 1 and lambda in [0, 1]; got {k1}, {k2}, {lambda_value}")
    feats = torch.cat([q, g]).float()
    n, nq = len(feats), len(q)
    k1, k2 = min(k1, n - 1), min(k2, n)
    dist = distance_matrix(feats, feats)
    dist /= dist.max(1, keepdim=True).values.clamp(min=torch.finfo(dist.dtype).tiny)
    width = max(k1 + 1, k2)
    near = torch.cat([dist[i:i + block].argsort(dim=1, stable=True)[:, :width] for i in range(0, n, block)])
    rows = torch.arange(n, device=feats.device)

    def reciprocal(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``i``'s ``k + 1`` nearest and which of them hold ``i`` among their own ``k + 1`` nearest."""
        idx = near[:, :k + 1]
        return idx, (idx[idx] == rows[:, None, None]).any(-1)

    idx, rec = reciprocal(k1)
    half_idx, half_rec = reciprocal(int(round(k1 / 2)))
    member = torch.zeros(n, n, dtype=torch.bool, device=feats.device)
    member[rows[:, None].expand_as(idx)[rec], idx[rec]] = True  # R(i, k1)
    cand_sets, cand_rec = half_idx[idx], half_rec[idx]  # [n, k1 + 1, h]: each neighbour's R(c, k1 / 2)
    shared = (member.gather(1, cand_sets.reshape(n, -1)).view_as(cand_sets) & cand_rec).sum(-1)
    accept = rec & (shared > 2 / 3 * cand_rec.sum(-1))
    add = accept[..., None] & cand_rec
    expanded = member.clone()
    expanded[rows[:, None, None].expand_as(cand_sets)[add], cand_sets[add]] = True
    V = torch.where(expanded, torch.exp(-dist), dist.new_zeros(()))
    V /= V.sum(1, keepdim=True)
    if k2 != 1:  # local query expansion over the k2 nearest
        V = torch.cat([V[near[i:i + block, :k2]].mean(1) for i in range(0, n, block)])
    Vt = V.T.contiguous()
    jaccard = dist.new_empty(nq, n)
    for i in range(nq):
        cols = V[i].nonzero().squeeze(1)
        m = torch.minimum(Vt[cols], V[i, cols, None]).sum(0)
        jaccard[i] = 1 - m / (2 - m)
    return ((1 - lambda_value) * jaccard + lambda_value * dist[:nq])[:, nq:]


@torch.no_grad()
def retrieval_metrics(
    q_feats: torch.Tensor,
    g_feats: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    distance: str = "euclidean",
    ranks: Sequence[int] = (1, 5, 10),
    block: int | None = None,
    distmat: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """mAP and CMC of the query features ``[nq, D]`` against the gallery features ``[ng, D]`` (see the module
    docstring): ``{"map", "rank1", "rank5", "rank10", "valid_queries"}`` as float tensors on the features'
    device. ``block``: query rows per step (default: about 8M distances per step). Raises ``ValueError`` when no
    query has a match in the gallery (the metrics would be undefined). ``distmat [nq, ng]``: ranks these
    distances instead of ``distance``'s (e.g. :func:`re_ranking`'s)."""
    if q_feats.ndim != 2 or g_feats.ndim != 2 or q_feats.shape[1] != g_feats.shape[1]:
        raise ValueError(f"features must be [nq, D] and [ng, D]; got {tuple(q_feats.shape)} and {tuple(g_feats.shape)}")
    if not (len(q_pids) == len(q_camids) == len(q_feats)) or not (len(g_pids) == len(g_camids) == len(g_feats)):
        raise ValueError("each query / gallery item needs one feature, one pid and one camid")
    if len(g_feats) == 0:
        raise ValueError("the gallery is empty")
    if distmat is not None and tuple(distmat.shape) != (len(q_feats), len(g_feats)):
        raise ValueError(f"distmat must be [nq, ng] = [{len(q_feats)}, {len(g_feats)}]; got {tuple(distmat.shape)}")
    dev = q_feats.device
    block = block or max(1, (1 << 23) // len(g_feats))
    g_pids, g_camids = g_pids.to(dev), g_camids.to(dev)
    ap_sum = torch.zeros((), dtype=torch.float64, device=dev)
    hits = torch.zeros(len(ranks), dtype=torch.float64, device=dev)
    valid = 0
    for i in range(0, len(q_feats), block):
        qp, qc = q_pids[i:i + block].to(dev), q_camids[i:i + block].to(dev)
        d = distance_matrix(q_feats[i:i + block], g_feats, distance) if distmat is None else distmat[i:i + block].to(dev)
        order = d.argsort(dim=1, stable=True)
        same = g_pids[order] == qp[:, None]
        keep = ~(same & (g_camids[order] == qc[:, None]))  # same identity seen by the same camera: left out
        match = same & keep
        rank = keep.cumsum(1)  # 1-based rank of each kept item in its query's kept list
        n_rel = match.sum(1)
        ok = n_rel > 0
        prec = match.cumsum(1).double() / rank.clamp(min=1).double()
        ap = (prec * match).sum(1) / n_rel.clamp(min=1)
        first = torch.where(match, rank, torch.full_like(rank, torch.iinfo(rank.dtype).max)).min(1).values
        ap_sum += ap[ok].sum()
        hits += torch.stack([(first[ok] <= k).sum() for k in ranks]).double()
        valid += int(ok.sum())
    if valid == 0:
        raise ValueError("no query has a match in the gallery (same identity from another camera): "
                         "the retrieval metrics are undefined; check the query / gallery split")
    out = {"map": (ap_sum / valid).float()}
    out.update({f"rank{k}": (h / valid).float() for k, h in zip(ranks, hits)})
    out["valid_queries"] = torch.tensor(float(valid), device=dev)
    return out
