"""DTFD-MIL: double-tier feature distillation MIL.

Paper: Zhang et al., "DTFD-MIL: Double-Tier Feature Distillation Multiple Instance Learning for Histopathology
Whole Slide Image Classification", CVPR 2022 (arXiv 2203.12081); official code hrzhang1123/DTFD-MIL
(``Main_DTFD_MIL.py``, ``Model/Attention.py``, ``Model/network.py``).

The model, as the official code has it:
- ``DimReduction``: ``ReLU(Linear(D, 512, bias=False))``;
- tier 1: the bag's instances split at random into ``groups=4`` pseudo-bags (``np.array_split`` of a random
  permutation), each pooled with gated attention (``Attention_Gated(512, 128)``, softmax within the pseudo-bag)
  and classified by ``Classifier_1fc(512, C)``; every pseudo-bag takes its bag's label;
- distillation: ``afs`` (the code's default) passes each pseudo-bag's pooled feature to tier 2; ``maxmins`` /
  ``maxs`` pass the ``instance_per_group=1`` instances with the highest (and lowest) Grad-CAM-style score
  (``softmax_C`` of the instance's attention-weighted feature through the tier-1 classifier's weights, last class);
- tier 2: ``Attention_with_Classifier`` (gated attention over the distilled features, ``Linear(512, C)``): the bag
  logits;
- losses (``forward_train``): tier 1 CE (mean over pseudo-bags) + tier 2 CE. The official code steps two Adam
  optimisers, tier 1's on the tier-1 loss only and tier 2's on the tier-2 loss only; the zoo detaches tier 2's
  input, so one optimiser with the same settings takes exactly those gradients.

Choices and deviations (documented):
- bags are batched with a padding mask (the official code takes one bag at a time): pseudo-bags are drawn per
  bag over its real instances; a bag with fewer instances than ``groups`` makes that many pseudo-bags (the
  official code keeps empty ones, which classify a zero feature);
- in eval the pseudo-bags are a fixed interleaved split (instance ``i`` of the bag in pseudo-bag ``i mod
  groups``) instead of the official random one, so predictions are deterministic and a batch equals its bags
  one at a time;
- the official per-module gradient clipping at 5 is the trainer's business (``trainer.gradient_clip_val=5``
  clips all parameters together); the official lr decay (x0.2 at epoch 100 of 200) is the defaults'
  ``scheduler="step"`` at half of the run, whatever ``trainer.max_epochs`` is;
- torchmil's ``DTFDMIL`` is binary (one logit, BCE), has no dimension reduction or gating, and its ``maxmin``
  distillation passes every instance of a pseudo-bag (twice) rather than the top and bottom one;
- image bags ``[B, N, C, H, W]`` go through Ilse et al.'s LeNet encoder (500-d) before the reduction;
- the module names are the official ones: the official ``{"dim_reduction", "attention", "classifier",
  "att_classifier"}`` dict of state dicts is the zoo's state dict with ``PART.`` prefixes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Capabilities
from ..layers import GatedAttention, masked_softmax
from ..registry import register_model
from ..spec import TrainDefaults, Weights
from .acmil import BagNet

PAPER = ("Zhang et al., DTFD-MIL: Double-Tier Feature Distillation Multiple Instance Learning for Histopathology "
         "Whole Slide Image Classification, CVPR 2022")
DISTILL = ("afs", "maxmins", "maxs")


class DimReduction(nn.Module):
    def __init__(self, in_dim: int, dim: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(x))


class Classifier1fc(nn.Module):
    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class AttentionWithClassifier(nn.Module):
    """Tier 2: gated attention pooling over the distilled features, then a linear classifier."""

    def __init__(self, dim: int, attn_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.attention = GatedAttention(dim, attn_dim)
        self.classifier = Classifier1fc(dim, num_classes, dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        a = masked_softmax(self.attention(x)[:, 0], valid)  # [B, K]
        return self.classifier(torch.einsum("bk,bkd->bd", a, x))


def pseudo_bag_ids(valid: torch.Tensor, groups: int, random: bool) -> torch.Tensor:
    """Each real instance's pseudo-bag ``[B, N]`` (-1 on padding): ``np.array_split`` of a random permutation of
    the bag's instances into ``groups`` parts (``random``), else instance ``i`` in part ``i mod groups``."""
    n = valid.sum(1, keepdim=True)  # [B, 1]
    if not random:
        return torch.where(valid, (valid.cumsum(1) - 1) % groups, -1)
    key = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    pos = key.argsort(1).argsort(1)  # each instance's place in its bag's permutation; padding last
    q, r = n // groups, n % groups  # array_split: the first r parts have q + 1 instances, the others q
    big = r * (q + 1)
    part = torch.where(pos < big, pos // (q + 1), r + (pos - big) // q.clamp(min=1))
    return torch.where(valid, part, -1)


class DTFDMIL(BagNet):
    """DTFD-MIL. ``forward(x [B, N, D] or [B, N, C, H, W], mask [B, N]) -> tier-2 logits [B, num_classes]``;
    ``forward_train(x, y, mask)`` adds the tier-1 pseudo-bag loss."""

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, attention_weights=True,
                                    trainable_groups=True)

    def __init__(self, *, num_classes: int = 2, in_dim: int | None = None, in_chans: int = 1, dim: int = 512,
                 attn_dim: int = 128, groups: int = 4, distill: str = "afs", instance_per_group: int = 1,
                 dropout: float = 0.0, dropout_2: float = 0.0):
        super().__init__()
        if distill not in DISTILL:
            raise ValueError(f"distill must be one of {DISTILL} (the official AFS, MaxMinS, MaxS); got {distill!r}")
        if groups < 1 or instance_per_group < 1:
            raise ValueError(f"groups and instance_per_group must be >= 1; got {groups}, {instance_per_group}")
        feat = self._init_bag_input(in_dim, in_chans)
        self.num_classes, self.groups, self.distill, self.k = num_classes, groups, distill, instance_per_group
        self.dim_reduction = DimReduction(feat, dim)
        self.attention = GatedAttention(dim, attn_dim)
        self.classifier = Classifier1fc(dim, num_classes, dropout)
        self.att_classifier = AttentionWithClassifier(dim, attn_dim, num_classes, dropout_2)

    def _tier1(self, x: torch.Tensor, mask: torch.Tensor | None):
        """-> (pseudo-bag logits [B, M, C], pseudo-bags present [B, M], tier-2 input [B, K, dim] and its
        validity [B, K], pseudo-bag attention [B, M, N])."""
        h = self.dim_reduction(self.bag_features(x, mask))  # [B, N, dim]
        B, N, _ = h.shape
        valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=h.device)
        part = pseudo_bag_ids(valid, self.groups, random=self.training)
        member = part[:, None, :] == torch.arange(self.groups, device=h.device)[None, :, None]  # [B, M, N]
        present = member.any(-1)  # [B, M]
        attn = masked_softmax(self.attention(h).expand(-1, self.groups, -1), member) * present[..., None]
        pooled = attn @ h  # [B, M, dim]
        logits = self.classifier(pooled)
        if self.distill == "afs":
            return logits, present, pooled, present, attn
        # Grad-CAM-style instance score: the tier-1 classifier's weights on the attention-weighted features
        cam = (attn[..., None] * (h @ self.classifier.fc.weight.T)[:, None]).softmax(-1)[..., -1]  # [B, M, N]
        k = min(self.k, N)
        top = cam.masked_fill(~member, -1.0).topk(k, -1).indices  # scores are in [0, 1]
        picks = [top] if self.distill == "maxs" else [top, cam.masked_fill(~member, 2.0).topk(k, -1, largest=False).indices]
        idx = torch.cat(picks, -1)  # [B, M, k or 2k]
        ok = member.gather(-1, idx)  # a pseudo-bag smaller than k repeats nothing it lacks
        feats = h.gather(1, idx.flatten(1)[..., None].expand(-1, -1, h.shape[-1]))  # [B, M * k', dim]
        return logits, present, feats, ok.flatten(1), attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _, _, feats, ok, _ = self._tier1(x, mask)
        return self.att_classifier(feats, ok)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        logits1, present, feats, ok, _ = self._tier1(x, mask)
        logits = self.att_classifier(feats.detach(), ok)  # tier 2 trains on its own loss only (see docstring)
        ce = F.cross_entropy(logits1.transpose(1, 2), y[:, None].expand_as(present), reduction="none")  # [B, M]
        tier1 = ((ce * present).sum(1) / present.sum(1)).mean()  # the mean over each bag's pseudo-bags
        return logits, {"tier1_ce": tier1, "tier2_ce": F.cross_entropy(logits, y)}

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each instance's attention within its pseudo-bag ``[B, 1, N]`` (eval's fixed split; zero on padding)."""
        return self._tier1(x, mask)[4].sum(1, keepdim=True)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"pseudo_bag_attention": [B, 1, h, w]}`` on the tile grid of ``coords``, else a square grid in bag order."""
        return {"pseudo_bag_attention": self.bag_maps(self.attention_weights(x, mask), coords)}

    def get_classifier(self) -> nn.Module:
        return self.att_classifier.classifier.fc

    def freeze_backbone(self) -> None:
        """Freeze the instance encoder (image bags) and the feature reduction; the rest keeps training."""
        self._freeze(self.dim_reduction)


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER, mean=(0.1307,), std=(0.3081,), license="mit",
                source="hrzhang1123/DTFD-MIL Main_DTFD_MIL.py (4 pseudo-bags, AFS, 512-d)", paper_ids=("arXiv:2203.12081",),
                weights=Weights(note="train it; official checkpoints load (`pretrained_file=`)"),
                train_defaults=TrainDefaults(name="adam", lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999), scheduler="step",
                                             lr_decay_at=(0.5,), lr_decay_rate=0.2,
                                             warmup_epochs=0, min_lr_ratio=0.0, label_smoothing=0.0, epochs=200,
                                             source="hrzhang1123/DTFD-MIL Main_DTFD_MIL.py defaults"))
def dtfd(pretrained: bool = False, **kwargs) -> DTFDMIL:
    return DTFDMIL(**kwargs)
