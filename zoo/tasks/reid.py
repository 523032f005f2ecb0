"""Object re-identification: identity classification + batch-hard triplet loss, retrieval evaluation.

Any zoo / timm classification net trains for Re-ID through the contract: its feature is
``forward_head(forward_features(x), pre_logits=True)`` (``[B, head_hidden_size]``) and its own classifier is
not used (the net is built with ``num_classes=0``, so a checkpoint's net is a feature extractor). The task
adds, per feature head, TransReID's ``neck="bnneck"`` (``model/make_model.py``, ``build_transformer``):

* ``BatchNorm1d`` on the feature, its bias frozen at 0 (``bottleneck.bias.requires_grad_(False)``), then a
  bias-free identity classifier ``Linear(dim, num_ids, bias=False)`` initialised N(0, 0.001);
* the triplet loss on the feature BEFORE the BN, cross-entropy (``optim.label_smoothing``) on the logits
  after it; ``id_loss_weight * CE + triplet_loss_weight * triplet`` (TransReID's ``make_loss``);
* batch-hard triplet (Hermans et al.; TransReID's ``loss/triplet_loss.py``): Euclidean distances, for every
  anchor the farthest positive and the nearest negative of the batch, ``max(0, d_ap - d_an + margin)`` or,
  with ``triplet_margin=None``, the soft margin ``log(1 + exp(d_ap - d_an))`` (TransReID's ``NO_MARGIN``).
  The anchor counts among its positives, as TransReID's mask does (with P x K batches, K >= 2, a real
  positive is always farther); anchors without a negative (a batch of one identity) are left out.

A net that declares ``feature_objective`` (DCAL: SA, GLCA and PWCA branches) names its heads
(``feature_heads()``) and trains them itself with this task's criterion (``forward_train_features``), so the
task has no model-specific branch; every head gets its own BNNeck and classifier.

Evaluation (val and test): one loader over the query then the gallery images, batches
``(images, pids, camids, is_query)``. The test feature is the pre-logits feature (``neck_feat="before"``) or
its BNNeck output (``"after"``; for several heads, each head's slice through its own BN), L2-normalised
with ``feat_norm`` (TransReID's ``TEST.NECK_FEAT`` / ``TEST.FEAT_NORM``); retrieval by ``distance``
(:mod:`zoo.reid_metrics`: same-pid same-camera gallery items excluded per query) -> ``{stage}/map``,
``{stage}/rank1``, ``/rank5``, ``/rank10``; ``val/map`` is monitored (max). The counts are checked against
the datamodule's ``split_sizes(stage)``: a metric over part of a split is an error, not a number. Under DDP
every rank evaluates the whole split (``zoo.data.ReIDDataModule``'s ``EvalSampler``: retrieval needs every
query against every gallery item) and computes the same metrics; nothing is gathered, and a loader sharded
across ranks fails the count check. ``re_ranking=True`` (TransReID's ``TEST.RE_RANKING``) ranks the test split
by k-reciprocal re-ranked distances (``zoo.reid_metrics.re_ranking``, squared Euclidean on the test features,
``k1=50, k2=15, lambda=0.3`` by default); validation, the monitor, keeps the plain ranking, as TransReID's.

Options (``reid:`` in a run's config, defaults in :data:`DEFAULT_REID` = TransReID's ``config/defaults.py``;
its ViT recipes, ``configs/*/vit_base.yml``, set ``NO_MARGIN: True`` and ``NECK_FEAT: 'before'``). Not
followed from TransReID: bias parameters use the base lr without weight decay (TransReID: lr x 2,
weight decay 1e-4), as every zoo task groups parameters.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..contract import capabilities, no_weight_decay
from ..reid_metrics import DISTANCES, re_ranking, retrieval_metrics
from ..validate import ConfigError
from .base import ZooTask

DEFAULT_REID: dict[str, Any] = dict(
    neck="bnneck",            # MODEL.NECK: "bnneck" | "none" (the classifier on the raw feature)
    neck_feat="after",        # TEST.NECK_FEAT: the test feature "before" or "after" the BNNeck
    feat_norm=True,           # TEST.FEAT_NORM: L2-normalise the test features
    distance="euclidean",     # squared Euclidean (TransReID's euclidean_distance) | "cosine"
    triplet_margin=0.3,       # SOLVER.MARGIN; null: soft margin (MODEL.NO_MARGIN: True)
    id_loss_weight=1.0,       # MODEL.ID_LOSS_WEIGHT
    triplet_loss_weight=1.0,  # MODEL.TRIPLET_LOSS_WEIGHT
    re_ranking=False,         # TEST.RE_RANKING: k-reciprocal re-ranking of the test distances (zoo.reid_metrics)
    re_ranking_k1=50,         # TransReID's processor: re_ranking(qf, gf, k1=50, k2=15, lambda_value=0.3)
    re_ranking_k2=15,
    re_ranking_lambda=0.3,
)
# the options that change evaluation only: evaluate.py takes them over a checkpoint's (+reid.KEY=VALUE)
EVAL_OPTIONS = ("neck_feat", "feat_norm", "distance", "re_ranking", "re_ranking_k1", "re_ranking_k2", "re_ranking_lambda")
CHOICES = {"neck": ("bnneck", "none"), "neck_feat": ("before", "after"), "distance": DISTANCES}
STAGES = ("val", "test")


def check_reid_options(options: dict | None) -> dict[str, Any]:
    """``options`` over :data:`DEFAULT_REID`, every key known and every value valid, else a ``ConfigError``."""
    out = dict(DEFAULT_REID)
    for key, value in (options or {}).items():
        if key not in DEFAULT_REID:
            raise ConfigError(f"unknown config key reid.{key}; valid keys of reid: {', '.join(sorted(DEFAULT_REID))}")
        out[key] = value
    for key, choices in CHOICES.items():
        if out[key] not in choices:
            raise ConfigError(f"reid.{key}={out[key]!r} is not valid; choose one of {', '.join(choices)}")
    for key in ("feat_norm", "re_ranking"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"reid.{key}={out[key]!r} has the wrong type; it takes true or false")
    for key in ("re_ranking_k1", "re_ranking_k2"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ConfigError(f"reid.{key}={out[key]!r}: give an integer >= 1")
    lam = out["re_ranking_lambda"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise ConfigError(f"reid.re_ranking_lambda={lam!r}: give a number in [0, 1]")
    m = out["triplet_margin"]
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0):
        raise ConfigError(f"reid.triplet_margin={m!r}: give a margin >= 0, or null for the soft margin")
    for key in ("id_loss_weight", "triplet_loss_weight"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"reid.{key}={v!r}: give a number >= 0")
    return out


def batch_hard_triplet(feat: torch.Tensor, y: torch.Tensor, margin: float | None = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss of features ``[B, D]`` with identities ``y [B]`` (see the module docstring)."""
    f = feat.float()
    sq = f.pow(2).sum(1)
    d = (sq[:, None] + sq[None] - 2 * f @ f.T).clamp(min=1e-12).sqrt()  # TransReID's euclidean_dist
    same = y[:, None] == y[None]
    d_ap = d.masked_fill(~same, float("-inf")).max(1).values
    d_an = d.masked_fill(same, float("inf")).min(1).values
    ok = torch.isfinite(d_an)
    if not bool(ok.any()):  # one identity in the batch: no negative anywhere
        return f.sum() * 0.0
    diff = d_ap[ok] - d_an[ok]
    return (F.relu(diff + margin) if margin is not None else F.softplus(diff)).mean()


class ReIDHead(nn.Module):
    """TransReID's BNNeck for one feature: ``BatchNorm1d`` (bias frozen at 0) + bias-free identity classifier;
    ``neck=False``: the classifier on the feature itself."""

    def __init__(self, dim: int, num_ids: int, neck: bool = True):
        super().__init__()
        self.bottleneck = nn.BatchNorm1d(dim) if neck else nn.Identity()
        if neck:
            self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_ids, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feat [B, dim]`` -> ``(BN feature [B, dim], identity logits [B, num_ids])``."""
        bn = self.bottleneck(feat)
        return bn, self.classifier(bn)


class ReIDFeatures(Metric):
    """The evaluation split's features, pids, camids and query flags in loader order (not synced across DDP
    ranks: every rank holds the whole split)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(sync_on_compute=False)
        for name in ("feats", "pids", "camids", "is_query"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, feats: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor, is_query: torch.Tensor) -> None:
        self.feats.append(feats.detach().float())
        self.pids.append(pids.long())
        self.camids.append(camids.long())
        self.is_query.append(is_query.bool())

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"feats", "pids", "camids", "is_query"}``, concatenated in loader order."""
        return {k: dim_zero_cat(getattr(self, k)) for k in ("feats", "pids", "camids", "is_query")}


class ReIDTask(ZooTask):
    """Re-ID training and retrieval evaluation for a classification net (see the module docstring).

    ``num_classes``: the training identities when the task is built for a run (``build_task`` passes the
    datamodule's); the task then stores ``num_classes=0`` (its net's) and ``num_ids`` (its classifiers'), so a
    checkpoint rebuilds both. ``reid``: the options (:func:`check_reid_options`)."""

    task = "reid"
    monitor = "val/map"
    monitor_mode = "max"

    def __init__(self, net: nn.Module | None = None, *, model: dict, num_classes: int, optim: dict | None = None,
                 data_info: dict | None = None, freeze_backbone: bool = False, reid: dict | None = None,
                 num_ids: int | None = None):
        if freeze_backbone:
            raise ConfigError("model.freeze_backbone=true is not supported for Re-ID: the retrieval feature is the "
                              "backbone's; train it (a smaller lr is the way to keep it close to its weights)")
        if num_ids is None:  # built for a run: num_classes counts the training identities
            num_ids, num_classes = int(num_classes), 0
        reid = check_reid_options(reid)  # the saved hyper-parameters hold every option
        if net is not None and net.num_classes:  # the classification contract's (timm's) attribute
            net.reset_classifier(0)  # the identity classifiers are the task's (after the BNNeck)
        super().__init__(net, model=model, num_classes=num_classes, optim=optim, data_info=data_info)
        self.reid, self.num_ids = reid, int(num_ids)
        caps = capabilities(self.net)
        if caps.own_objective and not caps.feature_objective:
            raise ConfigError(f"{type(self.net).__name__} trains with its own objective on class logits and has no "
                              "Re-ID mode (feature_objective); pick another model for Re-ID data")
        if float(self.optim["mixup_alpha"]) > 0 or float(self.optim["cutmix_alpha"]) > 0:
            raise ConfigError("mixup / cutmix mix identities; set optim.mixup_alpha=0 optim.cutmix_alpha=0 for Re-ID")
        if caps.feature_objective:
            train_heads, self.test_heads = self.net.feature_heads(), self.net.feature_heads(inference=True)
        else:
            train_heads = self.test_heads = {"feat": int(self.net.head_hidden_size)}
        missing = [h for h in self.test_heads if h not in train_heads]
        if missing or sum(self.test_heads.values()) != self.net.head_hidden_size:
            raise ValueError(f"{type(self.net).__name__}: inference heads {self.test_heads} must be trained heads "
                             f"({list(train_heads)}) whose widths add up to head_hidden_size={self.net.head_hidden_size}")
        neck = reid["neck"] == "bnneck"
        self.heads = nn.ModuleDict({h: ReIDHead(dim, self.num_ids, neck) for h, dim in train_heads.items()})
        self._parts: dict[str, torch.Tensor] = {}

    def set_eval_options(self, options: dict[str, Any]) -> None:
        """Evaluation options (:data:`EVAL_OPTIONS`) over the checkpoint's, e.g. re-ranking a trained model's
        test split; a training option here is an error (it would not change what the checkpoint learned)."""
        training = sorted((set(options) & set(DEFAULT_REID)) - set(EVAL_OPTIONS))
        if training:
            raise ConfigError(f"reid.{training[0]} is a training option; evaluation takes {', '.join(EVAL_OPTIONS)}")
        self.reid = check_reid_options({**self.reid, **options})

    def make_metrics(self) -> nn.Module:
        return ReIDFeatures()

    # ------------------------------------------------------------------ training
    def criterion(self, head: str, feat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """One head's Re-ID loss: ``id_loss_weight * CE(classifier(BN(feat)), y) + triplet_loss_weight *
        triplet(feat, y)``; the parts are summed over the heads for logging (``train/id``, ``train/triplet``)."""
        o = self.reid
        _, logits = self.heads[head](feat)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=float(self.optim.get("label_smoothing", 0.0)))
        tri = batch_hard_triplet(feat, y, o["triplet_margin"])
        for k, v in (("id", ce), ("triplet", tri)):
            self._parts[k] = self._parts.get(k, 0.0) + v.detach()
        return o["id_loss_weight"] * ce + o["triplet_loss_weight"] * tri

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, pids = batch[0], batch[1]
        x = self.to_memory_format(x)
        self._parts = {}
        if capabilities(self.net).feature_objective:
            losses = self.net.forward_train_features(x, pids, self.criterion)
        else:
            feat = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
            losses = {"reid": self.criterion("feat", feat, pids)}
        loss = sum(losses.values())
        bs = pids.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        logged = {f"train/{k}": v.detach() for k, v in losses.items()} if len(losses) > 1 else {}
        self.log_dict({**logged, **{f"train/{k}": v for k, v in self._parts.items()}}, batch_size=bs)
        return loss

    # ------------------------------------------------------------------ evaluation
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval feature ``[B, head_hidden_size]`` (before or after the BNNeck, not normalised)."""
        f = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        if self.reid["neck_feat"] == "before" or self.reid["neck"] == "none":
            return f
        parts = f.split(list(self.test_heads.values()), dim=1)
        return torch.cat([self.heads[h](p)[0] for h, p in zip(self.test_heads, parts)], 1)

    def _eval_step(self, batch: Any, stage: str, batch_idx: int = 0) -> None:
        if len(batch) != 4:
            raise ValueError(f"Re-ID {stage} batches are (images, pids, camids, is_query); got {len(batch)} items")
        x, pids, camids, is_query = batch
        x = self.to_memory_format(x)
        feats = self.features(x)
        self._check_finite(stage, batch_idx, x, feats, feats.float().sum())
        self.metrics[stage].update(feats, pids, camids, is_query)

    def _expected_sizes(self, stage: str) -> dict[str, int] | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        sizes = getattr(dm, "split_sizes", None)
        return None if sizes is None else {k: int(v) for k, v in sizes(stage).items()}

    def _log_epoch_metrics(self, stage: str) -> None:
        store = self.metrics[stage]
        trainer = self._trainer
        if trainer is not None and trainer.sanity_checking:  # a few batches: no retrieval metric over them
            store.reset()
            return
        values = self.retrieval(store.compute(), stage, self._expected_sizes(stage))
        store.reset()
        if values:
            self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)

    def retrieval(self, items: dict[str, torch.Tensor], stage: str,
                  expected: dict[str, int] | None) -> dict[str, torch.Tensor]:
        """The split's metrics from its features, pids, camids and query flags; the query / gallery counts must be ``expected``'s."""
        partial = self._trainer is not None and bool(self._trainer.fast_dev_run)
        if expected is None and self._trainer is not None and self._trainer.world_size > 1:
            raise RuntimeError("Re-ID evaluation under DDP needs the datamodule's split_sizes(stage) to check that "
                               "every rank saw the whole split; evaluate with a datamodule, or on one device")
        q = items["is_query"]
        nq, ng = int(q.sum()), int((~q).sum())
        if expected is not None and (nq, ng) != (expected["query"], expected["gallery"]):
            if not partial:
                raise RuntimeError(
                    f"the {stage} loader gave {nq} query and {ng} gallery images but the split has "
                    f"{expected['query']} and {expected['gallery']}: Re-ID metrics need the whole split "
                    f"(trainer.limit_{stage}_batches=1.0)")
        if nq == 0 or ng == 0:
            if partial:
                return {}
            raise RuntimeError(f"the {stage} split has {nq} query and {ng} gallery images; both must be non-empty")
        f = items["feats"]
        if self.reid["feat_norm"]:
            f = F.normalize(f, dim=1)
        r = self.reid
        # re-ranking only where it is reported: the validation monitor stays the plain ranking, as TransReID's
        distmat = (re_ranking(f[q], f[~q], r["re_ranking_k1"], r["re_ranking_k2"], r["re_ranking_lambda"])
                   if r["re_ranking"] and stage == "test" else None)
        try:
            out = retrieval_metrics(f[q], f[~q], items["pids"][q], items["pids"][~q], items["camids"][q],
                                    items["camids"][~q], distance=r["distance"], distmat=distmat)
        except ValueError:
            if partial:  # fast_dev_run: a batch or two need not hold a query with a match
                return {}
            raise
        out.pop("valid_queries")
        return out

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The net's groups (its ``no_weight_decay()`` names and 1-D parameters undecayed) and the heads' (the
        classifiers decayed, the BN weights not; the frozen BN biases are not optimised)."""
        net = param_groups_weight_decay(self.net, weight_decay,
                                        no_weight_decay_list=no_weight_decay(self.net, "classification"))
        return net + param_groups_weight_decay(self.heads, weight_decay)

