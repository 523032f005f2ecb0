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
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "cosine")

__all__ = ["DISTANCES", "distance_matrix", "retrieval_metrics"]


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
) -> dict[str, torch.Tensor]:
    """mAP and CMC of the query features ``[nq, D]`` against the gallery features ``[ng, D]`` (see the module
    docstring): ``{"map", "rank1", "rank5", "rank10", "valid_queries"}`` as float tensors on the features'
    device. ``block``: query rows per step (default: about 8M distances per step). Raises ``ValueError`` when no
    query has a match in the gallery (the metrics would be undefined)."""
    if q_feats.ndim != 2 or g_feats.ndim != 2 or q_feats.shape[1] != g_feats.shape[1]:
        raise ValueError(f"features must be [nq, D] and [ng, D]; got {tuple(q_feats.shape)} and {tuple(g_feats.shape)}")
    if not (len(q_pids) == len(q_camids) == len(q_feats)) or not (len(g_pids) == len(g_camids) == len(g_feats)):
        raise ValueError("each query / gallery item needs one feature, one pid and one camid")
    if len(g_feats) == 0:
        raise ValueError("the gallery is empty")
    dev = q_feats.device
    block = block or max(1, (1 << 23) // len(g_feats))
    g_pids, g_camids = g_pids.to(dev), g_camids.to(dev)
    ap_sum = torch.zeros((), dtype=torch.float64, device=dev)
    hits = torch.zeros(len(ranks), dtype=torch.float64, device=dev)
    valid = 0
    for i in range(0, len(q_feats), block):
        qp, qc = q_pids[i:i + block].to(dev), q_camids[i:i + block].to(dev)
        order = distance_matrix(q_feats[i:i + block], g_feats, distance).argsort(dim=1, stable=True)
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
