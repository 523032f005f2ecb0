"""A small Semantic-FPN segmenter on any feature backbone: the segmentation baseline.

Lateral 1x1 convs and a top-down pathway (Lin et al., FPN, CVPR 2017), each level refined by a
3x3 conv-BN-ReLU, upsampled to the finest level and summed (Kirillov et al., Panoptic FPN, CVPR 2019),
then a 1x1 classifier and bilinear upsampling to the input size. Later segmenters in the zoo are
measured against it.

The backbone (``backbone=``) is a timm model built ``features_only`` or a zoo classification model
(``backbone="biformer_nano"``, ``"halonet_tiny"``, ...), see :func:`zoo.backbones.create_backbone`;
``out_indices`` picks its levels (timm's meaning; ``None`` = all of the backbone's default levels).
The registered variants' own ``out_indices`` are chosen for their own backbone: name the levels
(or ``None``) with another backbone.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone, variant_backbone
from ..contract import Capabilities, ZooModel
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = "Kirillov et al., Panoptic Feature Pyramid Networks, CVPR 2019 (semantic FPN branch)"


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNDecoder(nn.Module):
    """Feature pyramid -> one map at the finest stride with ``channels`` channels."""

    def __init__(self, in_channels: list[int], channels: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])
        outs = [self.smooth[-1](x)]
        for i in range(len(feats) - 2, -1, -1):
            x = self.lateral[i](feats[i]) + F.interpolate(x, size=feats[i].shape[-2:], mode="nearest")
            outs.append(self.smooth[i](x))
        size = outs[-1].shape[-2:]
        return sum(F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs)


class SemanticFPN(nn.Module):
    """mmseg's Semantic FPN exactly as the BiFormer / PVT / UniFormer ADE20K configs use it: an FPN neck
    (1x1 laterals to ``neck_channels``, top-down nearest upsampling and sum, a plain 3x3 conv per level,
    no norm or activation) and ``FPNHead`` (per level, ``log2(stride / 4)`` rounds of 3x3 conv-BN-ReLU to
    ``channels`` + 2x bilinear upsampling, one conv without upsampling for stride 4; summed; dropout 0.1
    and a 1x1 classifier). Input: features at strides 4, 8, 16, 32; output: logits at stride 4."""

    def __init__(self, in_channels: list[int], num_classes: int, *, neck_channels: int = 256,
                 channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(neck_channels, neck_channels, 3, padding=1) for _ in in_channels)
        self.scale_heads = nn.ModuleList()
        for i in range(len(in_channels)):
            layers: list[nn.Module] = []
            for j in range(max(1, i)):  # strides 4, 8, 16, 32 -> 1, 1, 2, 3 convs; upsample after each but level 0
                layers.append(conv_bn_relu(neck_channels if j == 0 else channels, channels))
                if i > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.cls_seg = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        x = self.scale_heads[0](outs[0])
        for head, o in zip(self.scale_heads[1:], outs[1:]):
            x = x + F.interpolate(head(o), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls_seg(x)


class FPNSegmenter(ZooModel, nn.Module):
    """``forward(x [B, C, H, W]) -> logits [B, num_classes, H, W]``.

    ``backbone``: a timm or zoo model name (``encoder`` is its older name); ``backbone_kwargs`` go to its
    constructor; ``pretrained_encoder`` loads the backbone's published weights.
    """

    zoo_capabilities = Capabilities(trainable_groups=True)

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        num_classes: int = 21,
        in_chans: int = 3,
        pretrained_encoder: bool = False,
        decoder_channels: int = 128,
        out_indices: int | Sequence[int] | None = (1, 2, 3, 4),
        dropout: float = 0.1,
        backbone_kwargs: dict[str, Any] | None = None,
        encoder: str | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = create_backbone(encoder or backbone, out_indices=out_indices, pretrained=pretrained_encoder,
                                       in_chans=in_chans, **(backbone_kwargs or {}))
        self.decoder = FPNDecoder(self.encoder.feature_info.channels(), decoder_channels)
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(decoder_channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.decoder(self.encoder(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def get_classifier(self) -> nn.Module:
        return self.head

    def freeze_backbone(self) -> None:
        self.encoder.requires_grad_(False)


def _fpn(backbone: str, pretrained: bool, /, **kwargs) -> FPNSegmenter:
    return FPNSegmenter(pretrained_encoder=pretrained, **variant_backbone(backbone, kwargs))


_SPEC = dict(task="segmentation", paper=PAPER, paper_ids=("arXiv:1901.02446",), size_divisor=32)


@register_model(input_size=(3, 512, 512), source="zoo (timm resnet50 features_only + semantic FPN)",
                weights=Weights(backbone="resnet50.a1_in1k"), crop_pct=0.95, **_SPEC)
def fpn_resnet50(pretrained: bool = False, **kwargs) -> FPNSegmenter:
    return _fpn("resnet50", pretrained, **kwargs)


@register_model(input_size=(3, 256, 256), source="zoo (timm resnet18 features_only + semantic FPN)",
                weights=Weights(backbone="resnet18.a1_in1k"), crop_pct=0.95, **_SPEC)
def fpn_resnet18(pretrained: bool = False, **kwargs) -> FPNSegmenter:
    return _fpn("resnet18", pretrained, **kwargs)


@register_model(input_size=(3, 64, 64), source="zoo (timm resnet10t features_only + 64-ch semantic FPN)",
                weights=Weights(backbone="resnet10t.c3_in1k"), **_SPEC)
def fpn_tiny(pretrained: bool = False, **kwargs) -> FPNSegmenter:
    kwargs.setdefault("decoder_channels", 64)
    if kwargs.get("backbone") is None and kwargs.get("encoder") is None:  # its own resnet10t's five levels:
        kwargs.setdefault("out_indices", (0, 1, 2, 3, 4))  # keep the stride-2 map, shapes at 64 px are small
    return _fpn("resnet10t", pretrained, **kwargs)
