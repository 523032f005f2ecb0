"""CLAM-SB: clustering-constrained attention MIL, single attention branch.

Paper: Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide images",
Nature Biomedical Engineering 2021 (arXiv 2004.09666); official code mahmoodlab/CLAM (``models/model_clam.py``
``CLAM_SB``, training in ``utils/core_utils.py``, the README's command line for the defaults).

The model, as the official code has it (``size_arg="small"``, ``gate=True``):
- ``fc``: ``Linear(D, 512) - ReLU - Dropout(0.25)``;
- gated attention ``Attn_Net_Gated(512, 256)``: ``tanh(a(h)) * sigmoid(b(h))``, each branch with its own
  ``Dropout(0.25)``, then ``Linear(256, 1)``; softmax over the bag; ``z = sum_i a_i h_i``;
- the bag classifier ``Linear(512, C)``; one instance classifier ``Linear(512, 2)`` per class;
- instance-level clustering (``forward_train``): for the bag's class, its ``k_sample=8`` most attended
  instances are pseudo-positive and its 8 least attended pseudo-negative for that class's instance
  classifier; with ``subtyping`` the other classes' classifiers also see the 8 most attended as negative
  (and the instance loss is averaged over classes); the instance loss is the smooth top-1 SVM
  (``--inst_loss svm``, the README's command), the bag loss CE;
- total ``bag_weight * CE + (1 - bag_weight) * instance`` with ``bag_weight=0.7``.

Choices and deviations (documented):
- bags are batched with a padding mask (the official code takes one bag at a time): padded instances are
  never attended, and the instance loss is computed per bag over its real instances (then averaged);
- bags smaller than ``2 * k_sample`` use ``k = n // 2`` instances on each side (the official ``topk`` fails
  below ``k_sample``, and overlapping top and bottom sets would label one instance both ways); a one-instance
  bag has no instance loss;
- ``subtyping`` defaults to on for more than two classes (CLAM's subtyping task runs with ``--subtyping``),
  so every instance classifier is trained; off for two classes, as CLAM's tumour-vs-normal task;
- the losses are returned weighted (``bag_ce`` = 0.7 CE, ``instance`` = 0.3 instance loss); the task sums them;
- the smooth top-1 SVM is the zoo's few lines of oval-group/smooth-topk's ``SmoothTop1SVM`` (alpha 1, tau 1,
  the hard loss where the top-2 margin exceeds ``tau log 1000``); torchmil's port misbehaves with the
  ``[n, 1]`` targets its CLAM passes, and torchmil's ``CLAM_SB`` is binary (one logit, BCE), has no ``fc`` or
  attention dropout, and selects instances for the instance loss without the padding mask;
- image bags ``[B, N, C, H, W]`` go through Ilse et al.'s LeNet encoder (500-d) before ``fc``;
- official checkpoint keys (``attention_net.*``, ``classifiers.*``, ``instance_classifiers.*``) are the zoo's;
  official checkpoints load (``pretrained_file=``, :func:`checkpoint_filter`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Capabilities
from ..registry import register_model
from ..spec import TrainDefaults, Weights
from .acmil import BagNet

PAPER = "Lu et al., Data-efficient and weakly supervised computational pathology on whole-slide images, Nat. Biomed. Eng. 2021"


def smooth_top1_svm(logits: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """oval-group/smooth-topk's ``SmoothTop1SVM``: ``tau * logsumexp((x + alpha [c != y] - x_y) / tau)``, the hard
    ``max(x + alpha [c != y]) - x_y`` where the top-2 margin is at least ``tau log 1000``; mean over rows."""
    delta = alpha * (torch.arange(logits.shape[-1], device=logits.device) != y[:, None]).to(logits.dtype)
    shifted = logits + delta - logits.gather(1, y[:, None])
    top2 = logits.topk(min(2, logits.shape[-1]), dim=1).values
    hard = (top2[:, 0] - top2[:, -1]) >= tau * math.log(1e3)
    loss = torch.where(hard, shifted.max(1).values, tau * torch.logsumexp(shifted / tau, 1))
    return loss.mean()


class GatedAttentionCLAM(nn.Module):
    """CLAM's ``Attn_Net_Gated``: ``c(dropout(tanh(a h)) * dropout(sigmoid(b h)))`` -> one logit per instance."""

    def __init__(self, dim: int = 512, attn_dim: int = 256, dropout: float = 0.25, gate: bool = True):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gate else None
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention_a(h)
        if self.attention_b is not None:
            a = a * self.attention_b(h)
        return self.attention_c(a)[..., 0]  # [B, N]


class CLAMSB(BagNet):
    """CLAM-SB. ``forward(x [B, N, D] or [B, N, C, H, W], mask [B, N]) -> logits [B, num_classes]``;
    ``forward_train(x, y, mask)`` adds the instance-level clustering loss."""

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, attention_weights=True,
                                    trainable_groups=True)

    def __init__(
        self,
        *,
        num_classes: int = 2,
        in_dim: int | None = None,
        in_chans: int = 1,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        gate: bool = True,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        inst_loss: str = "svm",
        subtyping: bool | None = None,
    ):
        super().__init__()
        if inst_loss not in ("svm", "ce"):
            raise ValueError(f"inst_loss must be 'svm' (smooth top-1 SVM, CLAM's README) or 'ce'; got {inst_loss!r}")
        if not 0 <= bag_weight <= 1:
            raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight}")
        feat = self._init_bag_input(in_dim, in_chans)
        self.num_classes, self.k_sample, self.bag_weight, self.inst_loss = num_classes, k_sample, bag_weight, inst_loss
        self.subtyping = num_classes > 2 if subtyping is None else bool(subtyping)
        self.attention_net = nn.Sequential(nn.Linear(feat, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                           GatedAttentionCLAM(hidden_dim, attn_dim, dropout, gate))
        self.classifiers = nn.Linear(hidden_dim, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(num_classes))

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None):
        """-> (logits [B, C], attention logits [B, N] (padding at the dtype's minimum), h [B, N, hidden])."""
        h = self.attention_net[:3](self.bag_features(x, mask))
        raw = self.attention_net[3](h)
        if mask is not None:
            raw = raw.masked_fill(~mask, torch.finfo(raw.dtype).min)
        attn = raw.softmax(-1)
        return self.classifiers(torch.einsum("bn,bnd->bd", attn, h)), raw, h

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(x, mask)[0]

    def _instance_loss(self, raw: torch.Tensor, h: torch.Tensor, y: int) -> torch.Tensor:
        """One bag's clustering loss: ``raw [n]`` attention logits and ``h [n, D]`` of its real instances."""
        k = min(self.k_sample, raw.shape[0] // 2)
        top, bottom = raw.topk(k).indices, (-raw).topk(k).indices
        loss_fn = smooth_top1_svm if self.inst_loss == "svm" else F.cross_entropy
        pos, neg = torch.ones(k, dtype=torch.long, device=h.device), torch.zeros(k, dtype=torch.long, device=h.device)
        total = loss_fn(self.instance_classifiers[y](h[torch.cat([top, bottom])]), torch.cat([pos, neg]))
        if self.subtyping:  # the other classes' classifiers: the most attended instances are not theirs
            for c in range(self.num_classes):
                if c != y:
                    total = total + loss_fn(self.instance_classifiers[c](h[top]), neg)
            total = total / self.num_classes
        return total

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        logits, raw, h = self._forward(x, mask)
        inst = []
        for b in range(x.shape[0]):
            keep = mask[b] if mask is not None else torch.ones(raw.shape[1], dtype=torch.bool, device=raw.device)
            if int(keep.sum()) >= 2:
                inst.append(self._instance_loss(raw[b, keep], h[b, keep], int(y[b])))
        instance = torch.stack(inst).mean() if inst else logits.sum() * 0  # one-instance bags: no pairs to cluster
        return logits, {"bag_ce": self.bag_weight * F.cross_entropy(logits, y),
                        "instance": (1 - self.bag_weight) * instance}

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Instance attention ``[B, 1, N]`` (softmaxed, zero on padding)."""
        return self._forward(x, mask)[1].softmax(-1)[:, None]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"attention": [B, 1, h, w]}`` on the tile grid of ``coords``, else a square grid in bag order."""
        return {"attention": self.bag_maps(self.attention_weights(x, mask), coords)}

    def get_classifier(self) -> nn.Module:
        return self.classifiers

    def freeze_backbone(self) -> None:
        """Freeze the instance encoder (image bags) and the feature reduction; the rest keeps training."""
        self._freeze(self.attention_net[0])


def checkpoint_filter(state_dict: dict, model: CLAMSB) -> dict:
    """Official CLAM checkpoints: the ``attention_net.module.`` of a DataParallel-wrapped attention net, and the
    SVM loss's ``instance_loss_fn.labels`` buffer (the official eval.py drops it too)."""
    return {k.replace("attention_net.module.", "attention_net."): v for k, v in state_dict.items()
            if not k.startswith("instance_loss_fn.")}


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER, mean=(0.1307,), std=(0.3081,), license="gpl-3.0",
                source="mahmoodlab/CLAM models/model_clam.py CLAM_SB (small, gated, k_sample 8, bag_weight 0.7, SVM)",
                checkpoint_filter=checkpoint_filter,
                paper_ids=("arXiv:2004.09666",), weights=Weights(note="train it; official checkpoints load (`pretrained_file=`)"),
                train_defaults=TrainDefaults(name="adam", lr=2e-4, weight_decay=1e-5, betas=(0.9, 0.999), scheduler="none",
                                             warmup_epochs=0, min_lr_ratio=0.0, label_smoothing=0.0, epochs=200,
                                             source="mahmoodlab/CLAM README command: --lr 2e-4 --reg 1e-5, 200 epochs "
                                                    "with early stopping"))
def clam_sb(pretrained: bool = False, **kwargs) -> CLAMSB:
    return CLAMSB(**kwargs)
