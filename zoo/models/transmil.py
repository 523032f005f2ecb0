"""TransMIL: transformer-based correlated MIL.

Paper: Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image
Classification", NeurIPS 2021 (arXiv 2106.00908); official code szc19990412/TransMIL (``models/TransMIL.py``,
the optimiser in ``Camelyon/TransMIL.yaml``).

The model, as the official code has it:
- ``_fc1``: ``Linear(D, 512) - ReLU``;
- the bag "squared": its first instances repeated up to ``ceil(sqrt(N))**2``, a class token in front;
- ``TransLayer`` (pre-norm, residual): ``NystromAttention(dim=512, dim_head=64, heads=8, num_landmarks=256,
  pinv_iterations=6, residual=True, dropout=0.1)`` from the ``nystrom-attention`` package the official code
  imports; then PPEG (depth-wise 7x7 + 5x5 + 3x3 convolutions on the instance grid, plus identity); a second
  TransLayer; LayerNorm; the class token's ``Linear(512, C)``. Cross-entropy, no objective of its own.

Choices and deviations (documented):
- bags of a batch run one at a time over their real instances: the squaring and PPEG's grid depend on the bag
  length and the Nystrom pseudo-inverse is initialised from a maximum over the whole batch, so padding could
  not be masked out; the loop makes a padded batch equal its bags one at a time, as the official code runs them;
- ``attention_weights``: the class token's row of the last layer's (Nystrom-approximated) attention over the
  bag's instances, averaged over heads (torchmil's choice; the official code returns no attention);
- ``dim`` (default 512, the official size) must be divisible by the 8 heads; ``num_landmarks`` defaults to the
  official ``dim // 2``. The Nystrom attention pads the sequence (at the front, with zero tokens it does not mask,
  as the official code calls it) to a multiple of the landmark count: a bag of 10 instances runs as 256 tokens at
  the official width, 239 of them zeros that take attention mass and most of the time, so small bags want
  fewer landmarks (the digit-bags recipe uses 8);
- torchmil's ``TransMIL`` is binary (one logit, BCE), takes no padding mask, has 4 heads, no value-residual
  convolution and no attention dropout: the zoo builds on the package the official code uses instead;
- image bags ``[B, N, C, H, W]`` go through Ilse et al.'s LeNet encoder (500-d) before ``_fc1``;
- official checkpoint keys (``_fc1``, ``layer1``, ``pos_layer``, ``layer2``, ``norm``, ``_fc2``, ``cls_token``,
  the ``model.`` prefix of its Lightning checkpoints removed) are the zoo's.
"""
from __future__ import annotations

import math

import torch
from nystrom_attention import NystromAttention
from torch import nn

from ..contract import Capabilities
from ..errors import ModelArgumentError
from ..registry import register_model
from ..spec import TrainDefaults, Weights
from .acmil import BagNet

PAPER = ("Shao et al., TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image "
         "Classification, NeurIPS 2021")


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` with the official settings."""

    def __init__(self, dim: int = 512, heads: int = 8, dropout: float = 0.1, num_landmarks: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=dim // heads, heads=heads, num_landmarks=num_landmarks or dim // 2,
                                     pinv_iterations=6, residual=True, dropout=dropout)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        if return_attn:
            out, attn = self.attn(self.norm(x), return_attn=True)
            return x + out, attn
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: the instance tokens on their ``H x W`` grid + depth-wise 7/5/3 convolutions."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        cls_token, feat = x[:, :1], x[:, 1:].transpose(1, 2).reshape(B, C, H, W)
        feat = self.proj(feat) + feat + self.proj1(feat) + self.proj2(feat)
        return torch.cat([cls_token, feat.flatten(2).transpose(1, 2)], 1)


class TransMIL(BagNet):
    """TransMIL. ``forward(x [B, N, D] or [B, N, C, H, W], mask [B, N]) -> logits [B, num_classes]``."""

    zoo_capabilities = Capabilities(attention_maps=True, attention_weights=True, trainable_groups=True)

    def __init__(self, *, num_classes: int = 2, in_dim: int | None = None, in_chans: int = 1, dim: int = 512,
                 heads: int = 8, dropout: float = 0.1, num_landmarks: int | None = None):
        super().__init__()
        if dim % heads or dim < 2 * heads:
            raise ModelArgumentError(f"TransMIL: dim={dim} must be a multiple of heads={heads} (the official 512 / 8)")
        if num_landmarks is not None and num_landmarks < 1:
            raise ModelArgumentError(f"TransMIL: num_landmarks={num_landmarks}; give a positive count (default dim // 2)")
        feat = self._init_bag_input(in_dim, in_chans)
        self.num_classes = num_classes
        self._fc1 = nn.Sequential(nn.Linear(feat, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, dropout, num_landmarks)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, dropout, num_landmarks)
        self.norm = nn.LayerNorm(dim)
        self._fc2 = nn.Linear(dim, num_classes)

    def _one_bag(self, h: torch.Tensor, with_attn: bool = False):
        """The official forward on one bag ``h [1, n, dim]`` -> logits ``[1, C]`` (and the class token's
        attention over the ``n`` instances, ``[1, n]``)."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([self.cls_token.expand(1, -1, -1), h, h[:, :side * side - n]], 1)  # square the bag
        h = self.pos_layer(self.layer1(h), side, side)
        if with_attn:
            h, attn = self.layer2(h, return_attn=True)  # [1, heads, L', L'], the sequence padded at the front
            L = side * side + 1
            attn = attn[:, :, -L, -L + 1:][..., :n].mean(1)  # the class token's row, the real instances
        else:
            h = self.layer2(h)
        logits = self._fc2(self.norm(h)[:, 0])
        return (logits, attn) if with_attn else logits

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None, with_attn: bool = False):
        h = self._fc1(self.bag_features(x, mask))
        outs = [self._one_bag(h[b:b + 1] if mask is None else h[b:b + 1, mask[b]], with_attn) for b in range(h.shape[0])]
        if not with_attn:
            return torch.cat(outs)
        attn = h.new_zeros(h.shape[:2])
        for b, (_, a) in enumerate(outs):
            attn[b, slice(None) if mask is None else mask[b]] = a[0]
        return torch.cat([o for o, _ in outs]), attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(x, mask)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The class token's last-layer attention over the instances ``[B, 1, N]`` (zero on padding)."""
        return self._forward(x, mask, with_attn=True)[1][:, None]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"cls_attention": [B, 1, h, w]}`` on the tile grid of ``coords``, else a square grid in bag order."""
        return {"cls_attention": self.bag_maps(self.attention_weights(x, mask), coords)}

    def get_classifier(self) -> nn.Module:
        return self._fc2

    def freeze_backbone(self) -> None:
        """Freeze the instance encoder (image bags) and the feature reduction; the rest keeps training."""
        self._freeze(self._fc1)


def checkpoint_filter(state_dict: dict, model: TransMIL) -> dict:
    """The official Lightning checkpoint's ``model.`` prefix removed."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER, mean=(0.1307,), std=(0.3081,), license="unknown",
                source="szc19990412/TransMIL models/TransMIL.py (512-d, 8 heads, Nystrom attention, PPEG)",
                checkpoint_filter=checkpoint_filter, paper_ids=("arXiv:2106.00908",),
                weights=Weights(note="train it; official checkpoints load (`pretrained_file=`)"),
                train_defaults=TrainDefaults(name="lookahead_radam", lr=2e-4, weight_decay=1e-5, betas=(0.9, 0.999),
                                             scheduler="none", warmup_epochs=0, min_lr_ratio=0.0, label_smoothing=0.0,
                                             epochs=200, source="szc19990412/TransMIL Camelyon/TransMIL.yaml"))
def transmil(pretrained: bool = False, **kwargs) -> TransMIL:
    return TransMIL(**kwargs)
