"""DSMIL: dual-stream multiple-instance learning.

Paper: Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
Classification with Self-supervised Contrastive Learning", CVPR 2021 (arXiv 2011.08939); official code
binli123/dsmil-wsi (``dsmil.py``: ``FCLayer``, ``BClassifier``, ``MILNet``; training in ``train_tcga.py``).

The model, as the official code has it (``train_tcga.py`` defaults: ``non_linearity=1``, no value passing):
- stream one, ``i_classifier``: ``Linear(D, C)`` scores every instance; per class, the highest-scoring
  instance is that class's critical instance; its max-pooled score is the first prediction;
- stream two, ``b_classifier``: queries ``q = Linear(D, 128) - ReLU - Linear(128, 128) - Tanh``, the attention of
  each instance to each class's critical instance ``softmax_N(q_i . q_crit / sqrt(128))``, the bag embedding
  ``B = A^T V`` (``V`` = the features; with ``passing_v`` ``Dropout - Linear(D, D) - ReLU``), and
  ``fcc = Conv1d(C, C, kernel_size=D)`` giving the bag logits;
- loss (``forward_train``): ``0.5 * bag loss + 0.5 * max-instance loss``; orthogonal weight init, zero biases.

Choices and deviations (documented):
- C-way softmax cross-entropy on both streams, as ACMIL's baseline runner trains DSMIL; the official script
  uses one sigmoid logit per positive class with BCE (``--num_classes=1`` for a binary task). The zoo's logits
  are ``[B, C]`` like every MIL net's, so its checkpoints are not the official binary ones;
- bags are batched with a padding mask (the official code takes one bag at a time): padded instances are never
  the critical instance, never attended, and never the max-pooled one; a batch equals its bags one at a time;
- the prediction is the bag stream's logits (the official ``--average`` default False);
- torchmil's ``DSMIL`` is binary (one logit, BCE) and picks the critical instance and the max-pooled score
  without the padding mask;
- image bags ``[B, N, C, H, W]`` go through Ilse et al.'s LeNet encoder (500-d): the instance features;
- official key names (``i_classifier.fc.0``, ``b_classifier.q``, ``b_classifier.fcc``) are the zoo's;
- no ``freeze_backbone``: DSMIL has no feature reduction of its own, the streams read the features directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Capabilities
from ..layers import masked_softmax
from ..registry import register_model
from ..spec import TrainDefaults, Weights
from .acmil import BagNet

PAPER = ("Li et al., Dual-stream Multiple Instance Learning Network for Whole Slide Image Classification with "
         "Self-supervised Contrastive Learning, CVPR 2021")


class FCLayer(nn.Module):
    """Stream one: ``Linear(D, C)`` instance scores."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_size, out_size))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class BClassifier(nn.Module):
    """Stream two: attention to each class's critical instance, then ``Conv1d(C, C, D)`` on the bag embeddings."""

    def __init__(self, input_size: int, output_class: int, q_dim: int = 128, nonlinear: bool = True,
                 passing_v: bool = False, dropout_v: float = 0.0):
        super().__init__()
        self.q = (nn.Sequential(nn.Linear(input_size, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
                  if nonlinear else nn.Linear(input_size, q_dim))
        self.v = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(input_size, input_size), nn.ReLU())
                  if passing_v else nn.Identity())
        self.fcc = nn.Conv1d(output_class, output_class, kernel_size=input_size)

    def forward(self, feats: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None):
        """``feats [B, N, D]``, instance ``scores [B, N, C]`` -> (bag logits [B, C], attention [B, N, C])."""
        V, Q = self.v(feats), self.q(feats)
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        crit = scores.argmax(1)  # [B, C]: each class's critical instance
        q_max = self.q(feats.gather(1, crit[..., None].expand(-1, -1, feats.shape[-1])))  # [B, C, q]
        A = masked_softmax(Q @ q_max.transpose(1, 2) / math.sqrt(Q.shape[-1]),
                           None if mask is None else mask[..., None], dim=1)  # [B, N, C]
        return self.fcc(A.transpose(1, 2) @ V)[..., 0], A  # [B, C, D] -> [B, C]


class DSMIL(BagNet):
    """DSMIL. ``forward(x [B, N, D] or [B, N, C, H, W], mask [B, N]) -> bag logits [B, num_classes]``;
    ``forward_train(x, y, mask)`` adds the max-instance stream's loss."""

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, attention_weights=True)

    def __init__(self, *, num_classes: int = 2, in_dim: int | None = None, in_chans: int = 1, q_dim: int = 128,
                 nonlinear: bool = True, passing_v: bool = False, dropout_v: float = 0.0):
        super().__init__()
        feat = self._init_bag_input(in_dim, in_chans)
        self.num_classes = num_classes
        self.i_classifier = FCLayer(feat, num_classes)
        self.b_classifier = BClassifier(feat, num_classes, q_dim, nonlinear, passing_v, dropout_v)
        for m in (self.i_classifier, self.b_classifier):  # the official apply_sparse_init
            m.apply(_orthogonal_init)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None):
        """-> (bag logits [B, C], instance scores [B, N, C], attention [B, N, C])."""
        feats = self.bag_features(x, mask)
        scores = self.i_classifier(feats)
        logits, attn = self.b_classifier(feats, scores, mask)
        return logits, scores, attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(x, mask)[0]

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        logits, scores, _ = self._forward(x, mask)
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        max_pred = scores.max(1).values  # [B, C]: the max-pooled instance scores
        return logits, {"bag_ce": 0.5 * F.cross_entropy(logits, y), "max_ce": 0.5 * F.cross_entropy(max_pred, y)}

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each class's attention over the instances ``[B, C, N]`` (softmaxed, zero on padding)."""
        return self._forward(x, mask)[2].transpose(1, 2)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"class_attention": [B, C, h, w]}`` on the tile grid of ``coords``, else a square grid in bag order."""
        return {"class_attention": self.bag_maps(self.attention_weights(x, mask), coords)}

    def get_classifier(self) -> nn.Module:
        return self.b_classifier.fcc


def _orthogonal_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv1d)) and not m.weight.is_meta:
        nn.init.orthogonal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER, mean=(0.1307,), std=(0.3081,), license="mit",
                source="binli123/dsmil-wsi dsmil.py MILNet (nonlinear queries, 128-d), C-way CE as ACMIL's baseline",
                paper_ids=("arXiv:2011.08939",), weights=Weights(note="train it"),
                train_defaults=TrainDefaults(name="adam", lr=1e-4, weight_decay=1e-3, betas=(0.5, 0.9), scheduler="cosine",
                                             warmup_epochs=0, min_lr_ratio=0.05, label_smoothing=0.0, epochs=50,
                                             source="binli123/dsmil-wsi train_tcga.py: Adam betas (0.5, 0.9), cosine "
                                                    "to 5e-6"))
def dsmil(pretrained: bool = False, **kwargs) -> DSMIL:
    return DSMIL(**kwargs)
