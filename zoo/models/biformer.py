"""BiFormer: vision transformer with bi-level routing attention (BRA).

Paper: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023 (arXiv 2303.08810).
Origin: rayleizhu/BiFormer @ 1697bbbe, ``models/biformer.py``, ``ops/bra_legacy.py`` and ``models/_common.py``
(the legacy op is the one the released T/S/B checkpoints were trained with). Rewritten here; the maths is
the official code's, checked side by side with it to 1e-4 on shared weights.

BRA (per stage with ``topk > 0``), on an NHWC map split into ``n_win x n_win`` regions:
1. one shared ``Linear(dim, 3 dim)`` gives q, k, v (``qk_dim = dim``);
2. region affinity ``(mean_r(q) * scale) @ mean_r(k)^T`` on *detached* q and k (no gradient through routing);
3. each query region keeps the ``topk`` regions of highest affinity (routing weights are not used);
4. token-to-token multi-head attention of the region's queries over the routed regions' tokens with the
   official **full-width** scale ``dim ** -0.5`` (not ``head_dim ** -0.5``);
5. LCE: ``+ DWConv5x5(v)`` with v laid out as the image, then the output linear.
Stage 4 (``topk=-2``) is ``AttentionLePE``: global attention with 8 heads whatever the width, no qkv bias,
scale ``head_dim ** -0.5`` and the 5x5 depthwise LePE applied to the attention *input* ``x`` (not to v).
Block: ``x + DWConv3x3(x)`` (conditional position embedding), then pre-norm attention and a ratio-3 GELU MLP,
LayerNorm eps 1e-6, no layer scale. Stem: Conv3x3/2 (C/2) - BN - GELU - Conv3x3/2 (C) - BN; downsampling:
Conv3x3/2 - BN; head: BatchNorm2d - global average pool - Linear. Linear layers: trunc_normal(0.02), zero bias.

Documented choices / deviations:
- **Speed.** The official op gathers k and v together, splits and rearranges them (three k-fold copies) and
  materialises the attention matrix. Here qkv is laid out by region once, the routed regions' k|v are picked
  with one ``index_select`` (the single k-fold copy the algorithm needs: each region attends to its own set),
  and attention runs in ``F.scaled_dot_product_attention`` on strided views (no further copies); the output
  goes back to the image layout inside the ``+ LCE`` add (no separate re-layout copy). Where routing keeps at
  least a quarter of the regions (``MASKED_FROM``; BiFormer-T/S: stage 3, 16 of 49) the k-fold copy costs
  more than the scores it saves, and the layer runs as ``"masked"`` instead (below; same maths).
  Side-by-side speed and memory against the official code: ``results/biformer.md``.
- **attn_impl** (constructor kwarg of :class:`BiFormer` / ``create_model``, not in the state dict):
  ``"gather"`` (default, above), ``"masked"`` (every BRA layer: per image one dense SDPA call over all tokens,
  keys outside the query region's routed regions masked by a ``-inf`` float bias, i.e. weight exactly zero;
  ``n_win**2 / topk`` times the score work, no k-fold copy, and the mask needs no gradient, so torch's fused
  CPU kernel runs forward and backward) or ``"flex"``: block-sparse ``torch.compile(flex_attention)``, no k-fold
  copy. Per image, all regions' tokens form one sequence, region-major, each region one block of ``tp``
  tokens (``t`` padded to a multiple of 16 on CUDA, the Triton kernel's smallest tile; no padding on CPU);
  ``BlockMask.from_kv_blocks`` lists the routed regions of each query block, and the mask_mod (which eager
  flex_attention uses alone) says the same plus the padded keys. Every block is a partial block: full blocks
  (no mask_mod) hit a C++ codegen error in torch 2.14's CPU kernel. Same outputs as gather (1e-7 on CPU).
  torch 2.14 limits: no FlexAttention backward on CPU (torch raises; train on CPU with gather); each
  (shape, grad mode) is one compile, and past dynamo's recompile limit (8) flex runs eager (correct,
  dense). Measured on CPU flex is slower than gather (BiFormer-T 224, batch 1: 0.20 s vs 0.14 s), so gather
  stays the default; GPU numbers: ``bench/gpu_attention.py``.
- **Padding.** Sizes that are not multiples of ``n_win`` are always zero-padded (the official ``auto_pad``;
  without padding nothing changes). Unlike the official code, padded tokens are masked: region means are taken
  over real tokens only, regions with no real token cannot be routed to, padded keys get no attention, and LCE
  runs on the unpadded v (zero border, as for an input of that size). For divisible sizes this is the
  official computation.
- **Module names** are timm-like (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j``, ``attn.qkv``,
  ``attn.proj``, ``mlp.fc1/fc2``); :func:`checkpoint_filter` maps the official keys
  (``downsample_layers.*``, ``stages.i.j.*``, ``attn.qkv.qkv``, ``attn.wo``, ``mlp.0/3``), raw or under ``model``.
- ``n_win`` (regions per side) is a constructor argument, as the official dense-task configs change it
  (8 for segmentation at 512, 16 for detection); ``topk`` must not exceed ``n_win ** 2``.
- **timm surface.** ``forward_intermediates(x, indices, norm, stop_early, output_fmt="NCHW",
  intermediates_only)`` indexes the four stages (strides 4, 8, 16, 32; ``feature_info`` has one entry per
  stage, ``module="stages.i"``); ``norm=True`` applies the final BatchNorm to the last stage's map only (it is
  sized for it). :class:`BiFormerFPN` puts the zoo's semantic-FPN decoder on the four maps, with a
  LayerNorm2d per output as the official segmentation backbone has. ``set_grad_checkpointing`` checkpoints
  every block (non-reentrant; the official ``use_checkpoint_stages`` wraps whole stages with fairscale).
  ``global_pool`` is ``"avg"`` (the official mean over positions) or ``""`` (no pooling: the classifier, if
  any, is applied at every position, giving ``[B, num_classes, h, w]``).
- ``no_weight_decay()`` is empty: the official method returns ``{'pos_embed', 'cls_token'}``, which names no
  parameter of the model (its conditional position embeddings are the depthwise convs
  ``...blocks.j.pos_embed.weight``, and timm matches whole parameter names), so official training decays
  every parameter but the 1-D ones and the biases, which the zoo's optimiser already leaves out.
- ``pretrained=True`` is not supported (the official OneDrive links are dead and nothing can be downloaded
  here): pass ``pretrained_file=`` with an official ``.pth`` instead.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.layers.helpers import get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..contract import Capabilities, ZooModel
from ..layers.routing_attention import BiLevelRoutingAttention, region_valid_tokens
from ..registry import register_model
from ..spec import Metric, Reference, Weights
from .fpn import FPNDecoder, SemanticFPN

PAPER = "Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention, CVPR 2023"
SOURCE = "zoo rewrite of rayleizhu/BiFormer@1697bbbe (models/biformer.py, ops/bra_legacy.py)"


class AttentionLePE(nn.Module):
    """Stage-4 global attention (official ``_common.AttentionLePE``): 8 heads by default whatever the width,
    no qkv bias, scale ``head_dim ** -0.5``, LePE = 5x5 depthwise conv on the attention input ``x``."""

    def __init__(self, *, dim: int, num_heads: int = 8, qk_scale: float | None = None, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        q, k, v = self.qkv(x).view(n, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(n, h, w, c) + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class Block(nn.Module):
    """``x + DWConv3x3(x)``, then pre-norm attention and MLP (official ``models/biformer.Block``). NCHW in/out."""

    def __init__(self, *, dim: int, num_heads: int, n_win: int, topk: int, mlp_ratio: float = 3.0,
                 drop_path: float = 0.0, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 attn_impl: str = "gather"):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim)  # official: padding=1
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim=dim, num_heads=num_heads, n_win=n_win, topk=topk,
                                                side_dwconv=side_dwconv, attn_impl=attn_impl)
        elif topk == -2:
            self.attn = AttentionLePE(dim=dim, side_dwconv=side_dwconv)  # official passes no num_heads: 8
        else:
            raise ValueError(f"topk must be > 0 (BRA) or -2 (global attention + LePE), got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[Block]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x, use_reentrant=False)  # each block recomputed in backward
        return self.blocks(x)


# ---------------------------------------------------------------------------------------- model
class BiFormer(ZooModel, nn.Module):
    """BiFormer classifier with timm's model surface (see the module docstring) and ``attention_maps``."""

    zoo_capabilities = Capabilities(attention_maps=True, bench_extras=True)

    def bench_extras(self, img_size: int | None = None) -> dict:
        """``total_gmacs_analytic``: the multiply-adds of bi-level routing attention as the paper counts them
        (each query against its top-k routed regions only), counted with every layer on the gather path;
        ``total_gmacs_executed``: what the configured execution computes (dense masked scores where "gather"
        runs as "masked", see ``zoo.layers.routing_attention.MASKED_FROM``; None with "flex", which torch's FLOP counter cannot trace)."""
        from ..bench import _count_gmacs

        size = img_size or 224
        stem = self.stem[0]
        x = torch.empty(1, stem.in_channels, size, size, device=stem.weight.device)
        bras = [m for m in self.modules() if isinstance(m, BiLevelRoutingAttention)]
        flex = any(m.attn_impl == "flex" for m in bras)
        executed = None if flex else _count_gmacs(self, x)
        saved = [m.attn_impl for m in bras]
        for m in bras:
            m.attn_impl, m.auto_masked = "gather", False
        try:
            analytic = _count_gmacs(self, x)
        finally:
            for m, impl in zip(bras, saved):
                m.attn_impl, m.auto_masked = impl, True
        return {"total_gmacs_analytic": round(analytic, 4),
                "total_gmacs_executed": None if executed is None else round(executed, 4)}

    def __init__(
        self,
        *,
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        head_dim: int = 32,
        topks: Sequence[int] = (1, 4, 16, -2),
        n_win: int = 7,
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        attn_impl: str = "gather",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool)
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.n_win = n_win
        self.stem = nn.Sequential(  # official downsample_layers[0]
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(embed_dims[0] // 2), nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, 2, 1), nn.BatchNorm2d(embed_dims[0]),
        )
        total = sum(depths)
        dpr = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linspace, meta-device safe
        stages, cur = [], 0
        for i, (d, dim) in enumerate(zip(depths, embed_dims)):
            down = nn.Identity() if i == 0 else nn.Sequential(
                nn.Conv2d(embed_dims[i - 1], dim, 3, 2, 1), nn.BatchNorm2d(dim))
            blocks = [Block(dim=dim, num_heads=dim // head_dim, n_win=n_win, topk=topks[i], mlp_ratio=mlp_ratios[i],
                            drop_path=dpr[cur + j], side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                            attn_impl=attn_impl)
                      for j in range(d)]
            stages.append(Stage(down, blocks))
            cur += d
        self.stages = nn.ModuleList(stages)
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}") for i, c in enumerate(embed_dims)]
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm surface
    @staticmethod
    def _check_pool(global_pool: str) -> str:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        return global_pool

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.head = (nn.Linear(self.num_features, num_classes, **get_device_dtype(self))
                     if num_classes > 0 else nn.Identity())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # see the module docstring: the official names match no parameter

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        if pre_logits:
            return x
        if self.global_pool == "":  # no pooling: the classifier at every position
            return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs, NCHW (strides 4, 8, 16, 32), with timm's semantics: ``indices`` an int (the last n
        stages), a list of stage indices (negative allowed) or None (all). ``norm`` applies the final
        BatchNorm to the last stage's map; ``stop_early`` skips the stages after the last one taken.
        Returns the list if ``intermediates_only``, else ``(final features, list)`` where the final
        features equal ``forward_features(x)`` when every stage ran."""
        if output_fmt != "NCHW":
            raise ValueError(f"BiFormer intermediates are NCHW maps only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm and the head, as timm does);
        returns the kept indices, non-negative."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and only applied to) the last stage
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    # ---- explanation
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, stage: int = 1, block: int = -1,
                       query_regions: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Bi-level routing of one BRA block (default: last block of stage 2, 0-based ``stage=1``).

        For K chosen query regions (row-major region indices; default: the first, middle and last region
        holding real tokens, i.e. top-left, centre, bottom-right for unpadded maps):
        ``routed``: ``[B, K, S, S]`` 1 on the regions routed to (the query region itself is marked 0.5 when
        not routed); ``attention``: ``[B, K, h, w]`` token attention of the query region's tokens (mean over
        its real queries and the heads) on the stage's feature map, zero outside the routed regions.
        """
        attn = self.stages[stage].blocks[block].attn
        if not isinstance(attn, BiLevelRoutingAttention):
            raise ValueError(f"stage {stage} has no bi-level routing attention (global attention stage)")
        captured = {}
        handle = attn.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
        try:
            self.forward_intermediates(x, indices=[stage], stop_early=True, intermediates_only=True)
        finally:
            handle.remove()
        xa = captured["x"]
        n, h, w, _ = xa.shape
        s = attn.n_win
        idx, probs, (hp, wp) = attn.routing_and_probs(xa)
        rh, rw = hp // s, wp // s
        t = rh * rw
        valid = region_valid_tokens(h, w, hp, wp, s, x.device) if (hp, wp) != (h, w) else torch.ones(s * s, t, dtype=torch.bool, device=x.device)
        if query_regions is None:  # first, middle and last region holding real tokens
            real = valid.any(1).nonzero().flatten().tolist()
            query_regions = list(dict.fromkeys([real[0], real[len(real) // 2], real[-1]]))
        qr = torch.as_tensor(list(query_regions), device=x.device)
        p = probs[:, qr].mean(2)  # (n, K, t, k*t): mean over heads
        qv = valid[qr].to(p.dtype)  # average over the real queries of the region only
        p = (p * qv[None, :, :, None]).sum(2) / qv.sum(1).clamp_min(1)[None, :, None]  # (n, K, k*t)
        sel = idx[:, qr]  # (n, K, k)
        routed = torch.zeros(n, len(qr), s * s, device=x.device)
        routed.scatter_(2, qr.view(1, -1, 1).expand(n, -1, 1), 0.5)
        routed.scatter_(2, sel, 1.0)
        tok = torch.zeros(n, len(qr), s * s, t, device=x.device)
        tok.scatter_add_(2, sel[..., None].expand(-1, -1, -1, t), p.view(n, len(qr), -1, t))
        tok = tok.view(n, len(qr), s, s, rh, rw).permute(0, 1, 2, 4, 3, 5).reshape(n, len(qr), hp, wp)[..., :h, :w]
        return {f"s{stage + 1}_routed_regions": routed.view(n, -1, s, s), f"s{stage + 1}_token_attention": tok}


# ---------------------------------------------------------------------------------------- segmentation
class BiFormerFPN(ZooModel, nn.Module):
    """Semantic-FPN segmenter on a BiFormer encoder (LayerNorm2d per stage output, as the official
    segmentation backbone). ``forward(x) -> [B, num_classes, H, W]``."""

    zoo_capabilities = Capabilities(attention_maps=True, trainable_groups=True)

    def __init__(self, *, num_classes: int = 21, in_chans: int = 3, decoder_channels: int = 64,
                 dropout: float = 0.1, encoder: dict | None = None, decoder: str = "light"):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = BiFormer(in_chans=in_chans, num_classes=0, **(encoder or {}))
        self.encoder.norm = nn.Identity()  # the classifier's final BN is unused by dense heads
        dims = self.encoder.embed_dims
        self.out_norms = nn.ModuleList(LayerNorm2d(c) for c in dims)
        if decoder == "mmseg":  # the official sfpn configs: FPN neck 256 + FPNHead 128
            self.decoder, self.head = SemanticFPN(list(dims), num_classes, dropout=dropout), nn.Identity()
        elif decoder == "light":
            self.decoder = FPNDecoder(dims, decoder_channels)
            self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(decoder_channels, num_classes, 1))
        else:
            raise ValueError(f"decoder must be 'light' or 'mmseg', got {decoder!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder.forward_intermediates(x, intermediates_only=True)
        feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        logits = self.head(self.decoder(feats))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def get_classifier(self) -> nn.Module:
        return self.decoder.cls_seg if isinstance(self.head, nn.Identity) else self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def freeze_backbone(self) -> None:
        self.encoder.requires_grad_(False)

    def attention_maps(self, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
        return self.encoder.attention_maps(x, **kw)


# ---------------------------------------------------------------------------------------- weights
def _official_key(k: str) -> str:
    """One official key -> zoo key."""
    parts = k.split(".")
    if parts[0] == "downsample_layers":
        i = int(parts[1])
        k = ".".join(["stem", *parts[2:]]) if i == 0 else ".".join(["stages", str(i), "downsample", *parts[2:]])
    elif parts[0] == "stages" and len(parts) > 2 and parts[2].isdigit():
        k = ".".join(["stages", parts[1], "blocks", *parts[2:]])
    return (k.replace(".attn.qkv.qkv.", ".attn.qkv.").replace(".attn.wo.", ".attn.proj.")
            .replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2."))


def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """Official BiFormer checkpoint (raw state dict or wrapped under ``model``) -> zoo keys. Zoo-layout
    dicts pass unchanged; for :class:`BiFormerFPN` the backbone keys go under ``encoder.`` (head dropped)."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {_official_key(k): v for k, v in state_dict.items()}
    if isinstance(model, BiFormerFPN) and not any(k.startswith("encoder.") for k in out):
        # a classification checkpoint initialises the encoder; decoder and head keep their fresh init
        enc = {f"encoder.{k}": v for k, v in out.items() if not k.startswith(("head.", "norm."))}
        out = {**{k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}, **enc}
    return out


# ---------------------------------------------------------------------------------------- variants
def _biformer(pretrained: bool, **kwargs) -> BiFormer:
    if pretrained:
        raise ValueError("BiFormer weights cannot be downloaded (the official OneDrive links are dead); "
                         "pass pretrained_file='biformer_small_best.pth' (an official checkpoint) instead")
    return BiFormer(**kwargs)


# the official DeiT pipeline: ImageNet mean/std, bicubic, resize 256 -> crop 224 (crop_pct 0.875)
_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2303.08810",), license="mit", source=SOURCE,
             checkpoint_filter=checkpoint_filter, min_size=32, first_conv="stem.0")
_OFFICIAL = Weights(official_file=".pth", note="the official download links are dead")


@register_model(weights=_OFFICIAL, reference=Reference(params_m=13.14, gflops=2.2, metrics=(Metric("top1", 81.4, "imagenet-1k", 224),)),
                **_SPEC)
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    return _biformer(pretrained, **{**dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512)), **kwargs})


@register_model(weights=_OFFICIAL, reference=Reference(params_m=25.54, gflops=4.5, metrics=(Metric("top1", 83.8, "imagenet-1k", 224),)),
                **_SPEC)
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    return _biformer(pretrained, **{**dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512)), **kwargs})


@register_model(weights=_OFFICIAL, reference=Reference(params_m=56.80, gflops=9.8, metrics=(Metric("top1", 84.3, "imagenet-1k", 224),)),
                **_SPEC)
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    return _biformer(pretrained, **{**dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768)), **kwargs})


NANO = dict(depths=(1, 2, 2, 1), embed_dims=(32, 64, 128, 256), n_win=4, topks=(2, 4, 8, -2))


@register_model(input_size=(3, 64, 64), weights=Weights(note="CPU variant: train it"),
                **{**_SPEC, "min_size": 8, "source": SOURCE + "; nano config: zoo"})
def biformer_nano(pretrained: bool = False, **kwargs) -> BiFormer:
    """CPU-sized BiFormer for 32-64 px: 4x4 regions, top-(2, 4, 8) routing, global attention in stage 4."""
    return _biformer(pretrained, **{**NANO, **kwargs})


@register_model(task="segmentation", input_size=(3, 64, 64), min_size=8, paper=PAPER, checkpoint_filter=checkpoint_filter,
                paper_ids=("arXiv:2303.08810",), license="mit",
                source=SOURCE + "; semantic-FPN decoder from zoo/models/fpn.py", weights=Weights(note="CPU variant: train it"))
def biformer_fpn_nano(pretrained: bool = False, **kwargs) -> BiFormerFPN:
    kwargs["encoder"] = {**NANO, **(kwargs.get("encoder") or {})}
    return BiFormerFPN(**kwargs)


@register_model(task="segmentation", input_size=(3, 512, 512), min_size=32, paper=PAPER, checkpoint_filter=checkpoint_filter,
                paper_ids=("arXiv:2303.08810",), license="mit",
                source=SOURCE + " (semantic_segmentation/configs/ade20k/sfpn.biformer_small.py); mmseg Semantic FPN",
                weights=Weights(note="an ImageNet BiFormer-S encoder file (`pretrained_file=`)"),
                reference=Reference(metrics=(Metric("miou", 48.9, "ade20k (80k iters)", 512),)))
def biformer_small_fpn(pretrained: bool = False, **kwargs) -> BiFormerFPN:
    """BiFormer-S + Semantic FPN for ADE20K as the official sfpn config: n_win 8 at 512 (auto-padded for
    other sizes), drop path 0.15, LayerNorm2d per stage output, FPN neck 256 + FPNHead 128."""
    enc = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), n_win=8, drop_path_rate=0.15)
    kwargs["encoder"] = {**enc, **(kwargs.get("encoder") or {})}
    return BiFormerFPN(**{"decoder": "mmseg", **kwargs})
