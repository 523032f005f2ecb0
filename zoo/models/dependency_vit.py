"""DependencyViT and DependencyViT-Lite: reversed attention, dependency trees, dynamic pooling.

Paper: Ding, Shen, Fan, Chen, Chen, Luo, Tenenbaum, Gan, "Visual Dependency Transformers: Dependency Tree
Emerges from Reversed Attention", CVPR 2023 (arXiv 2304.03282).
Origin: written for the zoo on timm's ViT pieces (``VisionTransformer`` for patch embedding, position
embedding, norm and head; ``Mlp``, ``DropPath``, ``LayerScale``). There is no official code
(``dingmyu/DependencyViT`` holds only a LICENSE); the only public implementation is a third-party draft
(timm PR #2062, ``fffffgggg54/pytorch-image-models@dependencyvit``), used here as a second opinion, not
copied. The paper's full text (method section, appendix, Table 1) could not be read from this machine;
what follows is built from the abstract, the Fig. 2 caption and the zoo's spec sheet.

Reversed attention (one block; ``x: [B, N, C]``, H heads)::

    A_F = softmax_keys(q k^T / sqrt(C_h))            # [B, H, N, N], row j (a child) sums to 1
    P   = softmax_heads(W_p x / tau)                 # head selector, [B, N, H], per sender
    M   = sigmoid(MLP(x))                            # message controller, [B, N, 1], per sender
    A_R = A_F^T * P * M                              # column j: child j spreads p_j,h * m_j over parents
    out_i = sum_j A_R[i, j] v_j = (A_F^T @ (P M v))_i
    A_M = sum_h A_R                                  # soft dependency mask [B, N(parent), N(child)]

The P and M factors scale *senders* (columns of A_R), so they are applied to ``v`` (N x C_h per head)
instead of to the N x N matrix: the block costs one ordinary (non-fused) attention plus a transposed
matmul operand, which BLAS reads in place (no copy). ``F.scaled_dot_product_attention`` cannot express
the transpose, hence the explicit matmuls. The head selector and the controller's first layer share one
matmul with ``qkv`` (weights concatenated at run time; parameters and state-dict keys unchanged).
Because ``sum_h P = 1`` and every column of ``A_F^T`` sums to 1, the total mass token j sends in a block
is exactly ``m_j``: the message controller *is* the "how many messages does this token send" score.

Documented choices (the paper leaves them open here, or they could not be checked):
- head selector: ``Linear(C, H, bias=False)``, softmax over heads at temperature ``tau = 0.1`` (the value
  the draft cites from the paper's appendix D.1), always computed in fp32 (the draft saw NaN at 0.1 under
  reduced precision). ``head_temperature`` is a constructor argument.
- message controller: timm ``Mlp(C -> C/2 -> 1, GELU, bias=False)`` + sigmoid (the draft's guess).
  Per layer by default (``cumulative_m=False``); ``cumulative_m=True`` gives the draft's variant
  ``m_l = m_{l-1} * sigmoid(MLP_l(x))`` which also multiplies the final features by ``m`` before pooling.
- no class token; the head reads the plain average of the final-norm tokens that survive pruning
  (``global_pool='avg'``, ``fc_norm=False``).
- heads: DeiT geometry, Tiny 192-d x 12 blocks x 3 heads, Small 384-d x 12 x 6 (the draft used 12 heads for
  both; the paper's head counts could not be checked). ``num_heads`` is a constructor argument; 12 heads of
  16 dims make the N x N softmax 4x larger (the measured cost is in ``results/dependency_vit.md``).
- ``qkv_bias=True`` (DeiT/ViT default; the draft used False), LayerScale off for the paper sizes (the
  draft's 1e-6 is a constructor argument, ``init_values``), learned absolute position embeddings resampled
  for other input sizes (``dynamic_img_size=True``).
- DependencyViT-Lite (dynamic pooling): after the attention of blocks 2, 5, 8 and 11 (1-indexed) the
  tokens that send the fewest messages (smallest ``m`` of that block) are dropped, 16% of the *original*
  token count at each stage (layers and ratio as in the draft; the paper's own table is unchecked):
  ``keep_k = floor(N0 * (1 - 0.16 k))`` -> 196, 164, 133, 101, 70 tokens at 224 px. Pruning sits between
  the attention and the MLP of the block, so the MLP of a pruning block already runs on fewer tokens.
  ``prune_score='received'`` ranks by the mass a token receives instead (the draft's first criterion).
  Top-k is a hard, non-differentiable selection; the kept tokens keep their gradients.
- dependency tree: the parent of child j is ``argmax_i A_M[i, j]`` (a token may pick itself: it is then a
  root). argmax pointers can form cycles; every cycle is broken at its member that receives the most
  mass, which becomes a root. The result is a forest: every non-root token has exactly one parent.
- part segmentation: in the chosen layer the ``num_parts`` tokens receiving most mass are cut from their
  parents; each token is labelled by its nearest ancestor that is a root or a cut token (= subtrees).
  Rendered as one label map per image (K=1, nearest-upsampled to pixels so regions stay crisp);
  tokens pruned before that layer get their own label (-1 -> the darkest colour).
- saliency: mass each token receives in the chosen layer, ``sum_j A_M[i, j]``.
- ``dependencyvit_base`` is not registered: the spec sheet could not confirm that the paper has it.
- ``dependencyvit_nano`` (CPU, 32 px digits): 4x4 patches (64 tokens), 64-d, 4 blocks, 4 heads, MLP ratio 2,
  and the position embedding *starts* from a 2-D sin-cos table (``pos_embed_init='sincos'``, still learned):
  a plain trunc-normal start learned digits much more slowly. ``dependencyvit_lite_nano`` prunes 25% of the
  64 tokens after blocks 2 and 4 (64 -> 48 -> 32).
- timm surface: ``forward_head`` pools with ``global_pool`` (``reset_classifier(0, global_pool='')`` returns
  the unpooled tokens), ``set_grad_checkpointing`` recomputes each block (its ``(tokens, m, positions)``
  state passes through ``torch.utils.checkpoint``, non-reentrant). ``forward_intermediates`` gives the block
  outputs (NCHW at stride ``patch_size``, or NLC), one per block, indexed like timm's ViT. Dynamic pooling
  removes tokens from the grid, so Lite can only give the blocks *before* its first pruning block (block 0
  alone for the registered Lite variants); ``feature_info`` lists just those, ``indices=None`` means all of
  them, and asking for a later block raises ``ValueError`` (read ``dependency_masks`` / ``dependency_tree``
  for positions, or ``forward_features`` for the surviving tokens).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, Mlp
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..contract import Capabilities, ZooModel
from ..layers.pos_embed import check_pos_embed_init, init_sincos_pos_embed_
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = "Ding et al., Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention, CVPR 2023"
_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the draft's inception mean/std; no published weights
LITE_PRUNE_LAYERS = (2, 5, 8, 11)  # 1-indexed blocks after whose attention tokens are dropped
LITE_PRUNE_RATIO = 0.16  # fraction of the original token count dropped at each pruning layer

__all__ = ["DependencyViT", "ReversedAttention", "DependencyBlock", "prune_tokens", "parents_from_mask"]


def prune_tokens(x: torch.Tensor, score: torch.Tensor, keep: int, *others: torch.Tensor):
    """Keep the ``keep`` tokens with the highest ``score`` ([B, N]); ``x`` and ``others`` are [B, N, ...].

    The kept tokens stay in their original order. Returns ``(x_kept, idx, *others_kept)``, idx [B, keep].
    """
    idx = score.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:]))

    return (take(x), idx, *[take(t) for t in others])


class ReversedAttention(nn.Module):
    """Multi-head reversed attention with head selector P and message controller M (see module docstring)."""

    def __init__(self, dim: int, *, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, head_temperature: float = 0.1, cumulative_m: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.head_temperature = head_temperature
        self.cumulative_m = cumulative_m
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.head_selector = nn.Linear(dim, num_heads, bias=False)
        self.message_controller = Mlp(dim, dim // 2, 1, act_layer=nn.GELU, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, m_prev: torch.Tensor | None = None, return_attn: bool = False):
        """``x [B, N, C]`` -> ``(out [B, N, C], m [B, N, 1], extras)``.

        extras holds ``a_f`` ([B, H, N, N], rows = children, each sums to 1), ``p`` ([B, N, H]) and, when
        ``return_attn``, the soft dependency mask ``a_m`` ([B, N parent, N child]).
        """
        B, N, C = x.shape
        H, mc = self.num_heads, self.message_controller
        # one matmul for qkv, head selector and the controller's first layer (thin matmuls are slow on CPU)
        w = torch.cat([self.qkv.weight, self.head_selector.weight, mc.fc1.weight])
        b = self.qkv.bias
        if b is not None:
            b = torch.cat([b, b.new_zeros(H + mc.fc1.out_features)])
        qkv, p, h = F.linear(x, w, b).split([3 * C, H, mc.fc1.out_features], dim=-1)
        q, k, v = qkv.reshape(B, N, 3, H, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = (p.float() / self.head_temperature).softmax(-1).to(x.dtype)  # [B, N, H], fp32 at tau = 0.1
        m = torch.sigmoid(mc.drop2(mc.fc2(mc.norm(mc.drop1(mc.act(h))))))  # timm Mlp.forward after fc1
        if self.cumulative_m and m_prev is not None:
            m = m * m_prev
        a_f = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, child j, parent i]
        send = (p * m).transpose(1, 2).unsqueeze(-1)  # [B, H, N, 1]: what each child sends per head
        out = self.attn_drop(a_f).transpose(-2, -1) @ (v * send)  # A_R @ v with A_R = A_F^T * P * M
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        extras = {"a_f": a_f, "p": p}
        if return_attn:
            extras["a_m"] = (a_f * send).sum(1).transpose(-2, -1)  # [B, parent i, child j]
        return out, m, extras


class DependencyBlock(nn.Module):
    """Pre-norm ViT block with reversed attention; optionally prunes tokens between attention and MLP.

    Takes timm ``Block``'s keyword arguments (so ``VisionTransformer(block_fn=...)`` builds it); the
    ones reversed attention has no use for (qk_norm, attn_layer, ...) are accepted and ignored.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, init_values: float | None = None,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, mlp_layer: type[nn.Module] = Mlp,
                 head_temperature: float = 0.1, cumulative_m: bool = False, **_: object):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ReversedAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                      proj_drop=proj_drop, head_temperature=head_temperature,
                                      cumulative_m=cumulative_m)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.prune_stage = 0  # k > 0: this block is the k-th pruning layer (set by DependencyViT)

    def forward(self, x: torch.Tensor, m: torch.Tensor | None, pos: torch.Tensor, *, keep: int | None = None,
                prune_score: str = "sent", return_attn: bool = False):
        """``(x [B, N, C], m, pos [B, N] original token indices)`` -> the same triple (+ extras)."""
        y, m, extras = self.attn(self.norm1(x), m, return_attn=return_attn or prune_score == "received")
        x = x + self.drop_path1(self.ls1(y))
        if keep is not None and keep < x.shape[1]:
            if prune_score == "sent":
                score = m.detach().squeeze(-1)  # = total mass each token sends in this block
            else:
                score = extras["a_m"].detach().sum(-1)  # mass each token receives
            x, _, m, pos = prune_tokens(x, score, keep, m, pos)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, m, pos, extras


class DependencyViT(ZooModel, VisionTransformer):
    """timm ``VisionTransformer`` with reversed-attention blocks, no class token, average pooling and
    optional dynamic pooling (DependencyViT-Lite). Parameter names follow timm's ViT, plus
    ``blocks.i.attn.head_selector`` and ``blocks.i.attn.message_controller``."""

    zoo_capabilities = Capabilities(attention_maps=True, bench_extras=True)

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, init_values: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, head_temperature: float = 0.1,
                 cumulative_m: bool = False, prune_layers: Sequence[int] = (), prune_ratio: float = 0.0,
                 prune_score: str = "sent", explain_layer: int = -1, num_parts: int = 6,
                 pos_embed_init: str = "trunc_normal"):
        check_pos_embed_init(pos_embed_init)

        def block_fn(**kw):
            return DependencyBlock(**kw, head_temperature=head_temperature, cumulative_m=cumulative_m)

        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, init_values=init_values, class_token=False, global_pool="avg",
                         fc_norm=False, dynamic_img_size=True, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, block_fn=block_fn)
        prune_layers = sorted(set(int(i) for i in prune_layers))
        if prune_layers and (min(prune_layers) < 1 or max(prune_layers) > depth):
            raise ValueError(f"prune_layers are 1-indexed blocks in 1..{depth}, got {prune_layers}")
        if prune_layers and not 0 < prune_ratio * len(prune_layers) < 1:
            raise ValueError(f"need 0 < prune_ratio * len(prune_layers) < 1, got {prune_ratio} * {len(prune_layers)}")
        if prune_score not in ("sent", "received"):
            raise ValueError(f"prune_score must be 'sent' or 'received', got {prune_score!r}")
        for k, i in enumerate(prune_layers, 1):
            self.blocks[i - 1].prune_stage = k
        self.prune_layers, self.prune_ratio, self.prune_score = tuple(prune_layers), prune_ratio, prune_score
        self.cumulative_m = cumulative_m
        self.explain_layer, self.num_parts = explain_layer, num_parts
        if pos_embed_init == "sincos":  # fixed 2-D sin-cos start, still learned: helps tiny data sets
            init_sincos_pos_embed_(self.pos_embed, self.patch_embed.grid_size, embed_dim)
        # block outputs that still hold the whole patch grid: all blocks, or those before Lite's first pruning
        self.feature_info = self.feature_info[:self._num_grid_blocks()]

    # ------------------------------------------------------------------ token counts
    def keep_counts(self, num_tokens: int) -> list[int]:
        """Tokens each block's MLP sees, for ``num_tokens`` patch tokens: floor(N0 (1 - k r)) after stage k."""
        out, n = [], num_tokens
        for blk in self.blocks:
            if blk.prune_stage:
                n = max(1, math.floor(num_tokens * (1 - blk.prune_stage * self.prune_ratio) + 1e-6))
            out.append(n)
        return out

    def _num_grid_blocks(self) -> int:
        """How many leading blocks output the whole patch grid (all, or those before the first pruning)."""
        return next((i for i, blk in enumerate(self.blocks) if blk.prune_stage), len(self.blocks))

    # ------------------------------------------------------------------ timm surface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}  # the only token-like parameter (no class/register/distillation token)

    # ------------------------------------------------------------------ forward
    def _blocks(self, x: torch.Tensor, record: Sequence[int] = (), last: int | None = None) -> Iterator[tuple]:
        """Patch tokens through blocks ``0..last`` (all by default); yields ``(i, x, m, pos, pos_in, extras)``
        after each block, ``pos_in`` being the block's input positions. With grad checkpointing each block
        is recomputed in backward; its whole state ``(x, m, pos)`` goes through the checkpoint."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        B, N0, _ = x.shape
        pos = torch.arange(N0, device=x.device).expand(B, N0)
        counts = self.keep_counts(N0)
        m = None
        blocks = self.blocks if last is None else self.blocks[:last + 1]
        for i, blk in enumerate(blocks):
            kw = dict(keep=counts[i] if blk.prune_stage else None, prune_score=self.prune_score,
                      return_attn=i in record)
            pos_in = pos
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x, m, pos, extras = torch.utils.checkpoint.checkpoint(blk, x, m, pos, use_reentrant=False, **kw)
            else:
                x, m, pos, extras = blk(x, m, pos, **kw)
            yield i, x, m, pos, pos_in, extras

    def _run(self, x: torch.Tensor, record: Sequence[int] = ()):
        """Patch tokens through all blocks. Returns ``(tokens, m, pos, {layer: (a_m, pos_before)})``."""
        recs = {}
        for i, x, m, pos, pos_in, extras in self._blocks(x, record):
            if i in record:
                recs[i] = (extras["a_m"], pos_in)
        return x, m, pos, recs

    def _final(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x * m if self.cumulative_m else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, m, _, _ = self._run(x)
        return self._final(x, m)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)  # global_pool over the tokens left: pruned ones cannot enter the pool
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _take_indices(self, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
        """timm's block indices (None: every block with a grid); a block after Lite's first pruning raises."""
        grid = self._num_grid_blocks()
        take, max_index = feature_take_indices(len(self.blocks), list(range(grid)) if indices is None else indices)
        if max_index >= grid:
            raise ValueError(
                f"DependencyViT-Lite drops tokens (dynamic pooling) in blocks {list(self.prune_layers)} "
                f"(1-indexed), so only blocks 0..{grid - 1} (0-indexed) keep the whole patch grid; asked for "
                f"{take}. For the later blocks read dependency_masks()/dependency_tree() (token positions per "
                "layer) or forward_features() (the surviving tokens).")
        return take, max_index

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs, timm's ViT semantics: ``indices`` int = last n blocks, list = block indices (negative
        allowed), None = every block in ``feature_info``. NCHW maps are ``[B, C, H / patch, W / patch]``,
        NLC keeps the tokens. Returns the list if ``intermediates_only``, else ``(forward_features(x), list)``
        (the final features of the last block run, when ``stop_early``)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = self._take_indices(indices)
        B, _, height, width = x.shape
        gh, gw = self.patch_embed.dynamic_feat_size((height, width))
        intermediates = []
        for i, x, m, _, _, _ in self._blocks(x, last=max_index if stop_early else None):
            if i in take:
                y = self.norm(x) if norm else x
                intermediates.append(y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                                     if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self._final(x, m), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last index kept (and the norm / head, as timm); returns the kept indices."""
        take, max_index = self._take_indices(indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    # ------------------------------------------------------------------ dependency structure
    def _layers(self, layers: Sequence[int] | int | None) -> list[int]:
        d = len(self.blocks)
        if layers is None:
            return list(range(d))
        layers = [layers] if isinstance(layers, int) else list(layers)
        return sorted({i % d for i in layers})

    @torch.no_grad()
    def dependency_masks(self, x: torch.Tensor, layers: Sequence[int] | int | None = None):
        """Soft dependency masks ``{layer: (a_m [B, n, n], pos [B, n])}`` (0-indexed layers; ``pos`` maps the
        layer's tokens to patch indices, since DependencyViT-Lite drops tokens)."""
        return self._run(x, record=self._layers(layers))[3]

    @torch.no_grad()
    def dependency_tree(self, x: torch.Tensor, layers: Sequence[int] | int | None = None) -> dict[int, torch.Tensor]:
        """Parent index per patch token per layer: ``{layer: long [B, N0]}`` in patch indices.

        ``-1``: a root; ``-2``: a token already pruned before that layer (Lite). Every other token has exactly
        one parent, and following parents always ends at a root (cycles are broken, see module docstring).
        """
        out = {}
        for layer, (a_m, pos) in self.dependency_masks(x, layers).items():
            B, n, _ = a_m.shape
            local = parents_from_mask(a_m)  # [B, n] local indices, -1 roots
            n0 = self._num_patches(x)
            full = torch.full((B, n0), -2, dtype=torch.long, device=a_m.device)
            glob = torch.where(local >= 0, pos.gather(1, local.clamp(min=0)), local)
            full.scatter_(1, pos, glob)
            out[layer] = full
        return out

    def _num_patches(self, x: torch.Tensor) -> int:
        gh, gw = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        return gh * gw

    # ------------------------------------------------------------------ explain
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dependency_parts`` (subtree labels, [B, 1, H, W]), ``saliency`` (mass received, [B, 1, h, w]) and
        ``dependency_mask`` (for the 8 tokens receiving most mass, the mass each token sends them,
        [B, 8, h, w]), all read from block ``explain_layer``."""
        layer = self._layers(self.explain_layer)[0]
        a_m, pos = self.dependency_masks(x, layer)[layer]
        B, n, _ = a_m.shape
        gh, gw = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        n0 = gh * gw
        received = a_m.sum(-1)  # [B, n]

        def to_grid(v: torch.Tensor, fill: float) -> torch.Tensor:  # [B, K, n] local -> [B, K, gh, gw]
            g = v.new_full((B, v.shape[1], n0), fill)
            g.scatter_(2, pos.unsqueeze(1).expand(-1, v.shape[1], -1), v)
            return g.view(B, -1, gh, gw)

        labels = part_labels(parents_from_mask(a_m), received, self.num_parts).float()
        parts = F.interpolate(to_grid(labels.unsqueeze(1), -1.0), size=x.shape[-2:], mode="nearest")
        top = received.topk(min(8, n), dim=1).indices  # [B, K]
        rows = a_m.gather(1, top.unsqueeze(-1).expand(-1, -1, n))  # [B, K, n]: what each child sends to them
        return {"dependency_parts": parts, "saliency": to_grid(received.unsqueeze(1), 0.0),
                "dependency_mask": to_grid(rows, 0.0)}

    def bench_extras(self, img_size: int) -> dict:
        n = (img_size // self.patch_embed.patch_size[0]) ** 2
        return {"tokens_per_block": "/".join(str(c) for c in self.keep_counts(n))} if self.prune_layers else {}


def parents_from_mask(a_m: torch.Tensor) -> torch.Tensor:
    """Soft dependency mask ``[B, n parent, n child]`` -> parent index per child ``long [B, n]``, -1 = root.

    argmax over parents; self-parents become roots; every cycle of argmax pointers is broken at the member
    that receives the most mass (it becomes a root), so the result is a forest.
    """
    B, n, _ = a_m.shape
    parent = a_m.argmax(1)  # [B, n]
    received = a_m.sum(-1)
    ar = torch.arange(n, device=a_m.device)
    parent = torch.where(parent == ar, torch.full_like(parent, -1), parent)
    par, rec = parent.cpu().tolist(), received.cpu().tolist()
    for b in range(B):
        p, state = par[b], [0] * n  # 0 unseen, 1 on the current walk, 2 done
        for s in range(n):
            walk, j = [], s
            while j >= 0 and state[j] == 0:
                state[j] = 1
                walk.append(j)
                j = p[j]
            if j >= 0 and state[j] == 1:  # closed a cycle: j ... back to j
                cyc = walk[walk.index(j):]
                p[max(cyc, key=lambda t: rec[b][t])] = -1
            for t in walk:
                state[t] = 2
    return torch.tensor(par, dtype=torch.long, device=a_m.device)


def part_labels(parent: torch.Tensor, received: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Subtree label per token: the nearest ancestor (or itself) that is a root or one of the ``num_parts``
    tokens receiving most mass. Labels are ranks 0..K-1 (by received mass of the subtree's head)."""
    B, n = parent.shape
    cut = received.topk(min(num_parts, n), dim=1).indices
    head = torch.zeros(B, n, dtype=torch.bool, device=parent.device)
    head.scatter_(1, cut, True)
    head |= parent < 0
    anc = torch.where(head, torch.arange(n, device=parent.device).expand(B, n), parent)
    for _ in range(max(1, n.bit_length())):  # pointer doubling: heads point at themselves
        anc = anc.gather(1, anc)
    # relabel the heads by received mass, so that colours are stable between images
    order = (received + head.float() * 1e6).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=parent.device).expand(B, n))
    return rank.gather(1, anc)


# ---------------------------------------------------------------------------------------- variants
def _create(pretrained: bool, name: str, **kwargs) -> DependencyViT:
    return DependencyViT(**kwargs)


# the draft code's preprocessing: Inception mean/std, bicubic, crop_pct 0.9
_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2304.03282",), mean=_MEAN, std=_STD, crop_pct=0.9,
             size_divisor=16, min_size=64, first_conv="patch_embed.proj")
_NOT_FOUND = "paper's Table 1 not readable offline; see the report"
_LITE = dict(prune_layers=LITE_PRUNE_LAYERS, prune_ratio=LITE_PRUNE_RATIO)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)  # DeiT-Ti geometry (the draft: 12 heads of 16)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)  # DeiT-S geometry (the draft: 12 heads of 32)


@register_model(source="zoo (timm ViT pieces; no official code)",
                weights=Weights(note="none published"), reference=Reference(note=_NOT_FOUND), **_SPEC)
def dependencyvit_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(pretrained, "dependencyvit_tiny", **{**_TINY, **kwargs})


@register_model(source="zoo (timm ViT pieces; no official code)",
                weights=Weights(note="none published"), reference=Reference(note=_NOT_FOUND), **_SPEC)
def dependencyvit_small(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(pretrained, "dependencyvit_small", **{**_SMALL, **kwargs})


@register_model(source="zoo (timm ViT pieces; no official code)",
                weights=Weights(note="none published"), reference=Reference(note=_NOT_FOUND), **_SPEC)
def dependencyvit_lite_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(pretrained, "dependencyvit_lite_tiny",
                   **{**_TINY, **_LITE, **kwargs})


@register_model(source="zoo (timm ViT pieces; no official code)",
                weights=Weights(note="none published"), reference=Reference(note=_NOT_FOUND), **_SPEC)
def dependencyvit_lite_small(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(pretrained, "dependencyvit_lite_small",
                   **{**_SMALL, **_LITE, **kwargs})


_NANO = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_parts=4,
             pos_embed_init="sincos")


@register_model(input_size=(3, 32, 32), size_divisor=4, min_size=16, source="zoo (CPU variant for 32 px)",
                task="classification", paper=PAPER, paper_ids=("arXiv:2304.03282",), mean=_MEAN, std=_STD, crop_pct=0.9,
                first_conv="patch_embed.proj", weights=Weights(note="CPU variant: train it"))
def dependencyvit_nano(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(pretrained, "dependencyvit_nano", **{**_NANO, **kwargs})


@register_model(input_size=(3, 32, 32), size_divisor=4, min_size=16, source="zoo (CPU variant for 32 px)",
                task="classification", paper=PAPER, paper_ids=("arXiv:2304.03282",), mean=_MEAN, std=_STD, crop_pct=0.9,
                first_conv="patch_embed.proj", weights=Weights(note="CPU variant: train it"))
def dependencyvit_lite_nano(pretrained: bool = False, **kwargs) -> nn.Module:
    return _create(pretrained, "dependencyvit_lite_nano",
                   **{**_NANO, "prune_layers": (2, 4), "prune_ratio": 0.25, **kwargs})
