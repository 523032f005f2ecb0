"""HaloNet: blocked local self-attention with halo keys in place of 3x3 convs.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", Vaswani et al., CVPR 2021
(arXiv 2103.12731). There is no official code; timm's ``byoanet.py`` / ``layers/halo_attn.py`` is the
reference implementation, so the zoo wraps timm rather than rewriting it (same parameters, same
weights, same ``pretrained=True`` downloads).

Documented choices (timm's, kept for weight compatibility):
- halo padding keys are not masked (they enter the softmax with logit 0 plus position bias);
- the relative-position height-axis permutation is timm's (pytorch-image-models#1059);
- query blocks are not centred windows: translation equivariance is given up by design.

Every halo layer needs its input map divisible by its block size; the spec's ``size_divisor`` is the
resulting rule on the image (256 for b=8 with halo attention in stage 4), checked before the forward.

``attn_impl`` (every builder): how the halo layers execute, ``"timm"`` (timm's forward) or ``"sdpa"``
(``scaled_dot_product_attention`` with timm's relative-position logits as a float bias); same parameters,
same state dict, same outputs (see ``zoo.layers.halo_attention``). The default, ``"sdpa"``, is the one
measured faster on CPU, in inference and training (``results/halonet.md``).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg
from torch import nn

from ..contract import Capabilities, ZooModel
from ..layers.halo_attention import set_halo_attn_impl
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = "Vaswani et al., Scaling Local Self-Attention for Parameter Efficient Visual Backbones, CVPR 2021"
# timm's pretrained_cfgs: ImageNet mean/std for the halonet weights (haloregnetz_b: 0.5), bicubic, crop 0.94-0.95
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# A 3-stage HaloNet for 32-64 px images: block 4, halo 1, attention in the last two stages.
TINY_CFG = ByoModelCfg(
    blocks=(
        ByoBlockCfg(type="bottle", d=1, c=64, s=1, gs=0, br=0.5),
        ByoBlockCfg(type="self_attn", d=2, c=128, s=2, gs=0, br=0.5),
        ByoBlockCfg(type="self_attn", d=2, c=256, s=2, gs=0, br=0.5),
    ),
    stem_chs=32,
    stem_type="3x3",
    stem_pool="",
    num_features=0,
    act_layer="silu",
    self_attn_layer="halo",
    self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=4),
)


class HaloAttentionMaps:
    """``attention_maps(x)``: the attention mass each position receives in the last halo layer.

    Recomputes timm's HaloAttn probabilities (queries over their block's halo window), sums them over
    the block's queries and folds the windows back onto the feature map: ``{"halo_received": [B, heads, h, w]}``.
    """

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        layers = [m for m in self.modules() if isinstance(m, HaloAttn)]
        captured = {}
        handle = layers[-1].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
        try:
            self.forward_features(x)
        finally:
            handle.remove()
        return {"halo_received": _halo_received(layers[-1], captured["x"])}


def _halo_received(attn: HaloAttn, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of ``attn`` on ``x`` folded back to key positions (timm HaloAttn maths)."""
    B, C, H, W = x.shape
    bs, hs, heads = attn.block_size, attn.halo_size, attn.num_heads
    win = attn.win_size
    nh, nw = H // bs, W // bs
    q = attn.q(x)  # queries may be strided; the mass we fold is over keys, so only counts matter
    qb = attn.block_size_ds
    q = q.reshape(-1, attn.dim_head_qk, nh, qb, nw, qb).permute(0, 1, 3, 5, 2, 4)
    q = q.reshape(B * heads, attn.dim_head_qk, -1, nh * nw).transpose(1, 3)  # [B*h, blocks, qb*qb, d]
    kv = attn.kv(x)
    kv = F.pad(kv, [hs, hs, hs, hs])
    kv = kv.unfold(2, win, bs).unfold(3, win, bs).reshape(
        B * heads, attn.dim_head_qk + attn.dim_head_v, nh * nw, -1).permute(0, 2, 3, 1)
    k = kv[..., : attn.dim_head_qk]
    if attn.scale_pos_embed:
        logits = (q @ k.transpose(-1, -2) + attn.pos_embed(q)) * attn.scale
    else:
        logits = (q @ k.transpose(-1, -2)) * attn.scale + attn.pos_embed(q)
    probs = logits.softmax(-1).sum(2)  # [B*h, blocks, win*win]: mass received per window key
    cols = probs.reshape(B, heads, nh * nw, win * win).permute(0, 1, 3, 2).reshape(B, heads * win * win, nh * nw)
    pad = (H + 2 * hs, W + 2 * hs)
    folded = F.fold(cols, pad, kernel_size=win, stride=bs).reshape(B, heads, *pad)
    return folded[..., hs: hs + H, hs: hs + W]


class ZooByobNet(ZooModel, HaloAttentionMaps, ByobNet):
    """timm's ByobNet with ``attention_maps`` (state dicts are unchanged); the rest of the surface is timm's
    (``forward_intermediates`` over the stages, ``set_grad_checkpointing`` through ``checkpoint_seq``)."""

    zoo_capabilities = Capabilities(attention_maps=True)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None, as timm trained its HaloNets: the relative-position tables (2-d) are decayed, only norms
        and biases are skipped (by timm's optimizer factory)."""
        return set()


ATTN_IMPL = "sdpa"  # the default execution of the halo layers: measured faster on CPU (results/halonet.md)


def _timm_halonet(variant: str, pretrained: bool, attn_impl: str = ATTN_IMPL, **kwargs) -> nn.Module:
    model = timm.create_model(variant, pretrained=pretrained, **kwargs)
    model.__class__ = ZooByobNet  # same modules and keys; adds attention_maps
    return set_halo_attn_impl(model, attn_impl)


_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2103.12731",), classifier="head.fc")


@register_model(input_size=(3, 256, 256), size_divisor=256, crop_pct=0.95, first_conv="stem.conv1.conv",
                source="timm:halonet26t.a1h_in1k", weights=Weights(timm="halonet26t.a1h_in1k"),
                reference=Reference(params_m=12.48, gflops=3.19, metrics=(Metric("top1", 79.13, "imagenet-1k", 256),)), **_SPEC)
def halonet26t(pretrained: bool = False, **kwargs) -> nn.Module:
    return _timm_halonet("halonet26t", pretrained, **kwargs)


@register_model(input_size=(3, 256, 256), size_divisor=256, crop_pct=0.94, first_conv="stem.conv1.conv",
                source="timm:halonet50ts.a1h_in1k", weights=Weights(timm="halonet50ts.a1h_in1k"),
                reference=Reference(params_m=22.73, gflops=5.30, metrics=(Metric("top1", 81.64, "imagenet-1k", 256),)), **_SPEC)
def halonet50ts(pretrained: bool = False, **kwargs) -> nn.Module:
    return _timm_halonet("halonet50ts", pretrained, **kwargs)


@register_model(input_size=(3, 256, 256), size_divisor=256, crop_pct=0.94, first_conv="stem.conv1.conv",
                source="timm:sehalonet33ts.ra2_in1k", weights=Weights(timm="sehalonet33ts.ra2_in1k"),
                reference=Reference(params_m=13.69, gflops=3.55, metrics=(Metric("top1", 80.98, "imagenet-1k", 256),)), **_SPEC)
def sehalonet33ts(pretrained: bool = False, **kwargs) -> nn.Module:
    return _timm_halonet("sehalonet33ts", pretrained, **kwargs)


@register_model(input_size=(3, 256, 256), size_divisor=256, crop_pct=0.94, first_conv="stem.conv1.conv",
                source="timm:eca_halonext26ts.c1_in1k", weights=Weights(timm="eca_halonext26ts.c1_in1k"),
                reference=Reference(params_m=10.76, gflops=2.44, metrics=(Metric("top1", 79.52, "imagenet-1k", 256),)), **_SPEC)
def eca_halonext26ts(pretrained: bool = False, **kwargs) -> nn.Module:
    return _timm_halonet("eca_halonext26ts", pretrained, **kwargs)


@register_model(input_size=(3, 224, 224), size_divisor=224, crop_pct=0.94, **_INCEPTION, first_conv="stem.conv",
                source="timm:haloregnetz_b.ra3_in1k", weights=Weights(timm="haloregnetz_b.ra3_in1k"),
                reference=Reference(params_m=11.68, gflops=1.97, metrics=(Metric("top1", 81.06, "imagenet-1k", 224),)), **_SPEC)
def haloregnetz_b(pretrained: bool = False, **kwargs) -> nn.Module:
    return _timm_halonet("haloregnetz_b", pretrained, **kwargs)


@register_model(input_size=(3, 256, 256), size_divisor=256, crop_pct=0.95, first_conv="stem.conv1.conv",
                source="timm:halonet_h1 (untrained)", weights=Weights(note="none published: timm has the config only"),
                reference=Reference(params_m=8.1, gflops=3.0, note="the paper's H1 on imagenet-1k@256"), **_SPEC)
def halonet_h1(pretrained: bool = False, **kwargs) -> nn.Module:
    return _timm_halonet("halonet_h1", pretrained, **kwargs)


@register_model(input_size=(3, 32, 32), size_divisor=32, first_conv="stem.conv", source="zoo (timm ByobNet, 3 stages, b=4 h=1)",
                weights=Weights(note="CPU variant: train it (python train.py)"), **_INCEPTION, **_SPEC)
def halonet_tiny(pretrained: bool = False, attn_impl: str = ATTN_IMPL, **kwargs) -> nn.Module:
    return set_halo_attn_impl(ZooByobNet(cfg=TINY_CFG, **kwargs), attn_impl)
