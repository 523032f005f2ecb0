"""ABMIL: attention-based deep multiple-instance learning with gated attention.

Paper: Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018
(AMLab-Amsterdam/AttentionDeepMIL). The feature-bag form follows ACMIL's ``ABMIL`` baseline
(dazhangyu123/ACMIL, ``architecture/transformer.py``): ``DimReduction`` (Linear without bias + ReLU),
gated attention with 128 hidden units, one ``Linear(D_inner, C)`` classifier trained with
cross-entropy on logits. Image bags go through Ilse's LeNet-style instance encoder first.

Choices: ``inner_dim`` defaults to ``in_dim // 2`` (ACMIL's 512 -> 256, 1024 -> 512 ...); the LeNet
encoder ends in an adaptive 4x4 pool so that 28 px instances (Ilse's) and other sizes both work; bags
are batched with a padding mask (the official code takes one bag at a time), padded instances get
no attention.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import GatedAttention, masked_softmax
from ..registry import register_model

PAPER = "Ilse et al., Attention-based Deep Multiple Instance Learning, ICML 2018"


class LeNetInstanceEncoder(nn.Module):
    """Ilse et al.'s MNIST-bags encoder: conv 20@5x5 - pool - conv 50@5x5 - pool - FC 500 + ReLU."""

    def __init__(self, in_chans: int = 1, out_dim: int = 500):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # identity at 28 px, as in the paper
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ABMIL(nn.Module):
    """Gated-attention MIL over feature bags ``[B, N, D]`` or image bags ``[B, N, C, H, W]``."""

    def __init__(
        self,
        *,
        num_classes: int = 2,
        in_dim: int | None = None,
        in_chans: int = 1,
        inner_dim: int | None = None,
        attn_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        if in_dim is None:  # image bags: learn the instance encoder end to end
            self.encoder = LeNetInstanceEncoder(in_chans)
            self.reduce = nn.Identity()
            dim = self.encoder.out_dim
        else:
            self.encoder = None
            dim = inner_dim or max(in_dim // 2, 1)
            self.reduce = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.ReLU())
        self.in_dim, self.dim = in_dim, dim
        self.attention = GatedAttention(dim, attn_dim, branches=1, dropout=dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def instance_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 5:
            if self.encoder is None:
                raise ValueError("this ABMIL was built for feature bags (in_dim set); got image bags [B, N, C, H, W]")
            B, N = x.shape[:2]
            flat = x.flatten(0, 1)
            if mask is None:
                return self.reduce(self.encoder(flat)).view(B, N, -1)
            h = flat.new_zeros(B * N, self.dim)
            keep = mask.flatten()
            h[keep] = self.encoder(flat[keep])  # padded instances cost nothing
            return h.view(B, N, -1)
        if self.encoder is not None:
            raise ValueError("this ABMIL was built for image bags; pass in_dim=D to build it for feature bags")
        return self.reduce(x)

    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmaxed instance attention ``[B, N]`` (zero on padding)."""
        return self._attend(self.instance_features(x, mask), mask)[1]

    def _attend(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.attention(h)  # [B, 1, N]
        a = masked_softmax(logits, None if mask is None else mask[:, None, :])
        return (a @ h)[:, 0], a[:, 0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z, _ = self._attend(self.instance_features(x, mask), mask)
        return self.classifier(z)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def freeze_backbone(self) -> None:
        """Freeze the instance encoder / reduction; attention and classifier keep training."""
        for m in (self.encoder, self.reduce):
            if m is not None:
                m.requires_grad_(False)


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER, mean=(0.1307,), std=(0.3081,),
                source="zoo (ACMIL's ABMIL baseline + Ilse's LeNet encoder for image bags)")
def abmil(pretrained: bool = False, **kwargs) -> ABMIL:
    if pretrained:
        raise ValueError("abmil has no published weights; use init_from=CKPT or pretrained_file=")
    return ABMIL(**kwargs)
