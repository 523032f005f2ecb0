"""Sparsifiner: learned instance-dependent sparse attention on timm's DeiT / ViT, and on LV-ViT-S.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
Wei et al., CVPR 2023 (arXiv 2303.13755). Origin: the official code lim142857/Sparsifiner (commit 9a11e263,
MIT), ``src/models/sparsifiner.py`` (``MaskPredictor``, ``Attention``), ``src/losses.py`` and ``src/main.py``
(two-phase training), default YAML ``sparsifiner_default_config.yaml``. Built on timm's
``VisionTransformer`` / ``Block`` / ``Attention`` so that DeiT weights load unchanged (parameter names of
the official model: ``blocks.i.attn.mask_predictor.{proj_c_q,proj_c_k,proj_n,proj_back_n}``).

Connectivity predictor (one per layer, per head; ``q, k: [B, H, N, d]``), as in the official code:
  1. channel reduction ``q' = proj_c_q(q)``, ``k' = proj_c_k(k)`` (d -> d / ``reduce_c_factor``, default 2);
  2. low-rank token projection ``k'' = k'^T P_n`` with ``P_n: [N, N // reduce_n_factor]`` (YAML: 6);
  3. coefficients ``C = softmax(q' k'' * num_heads**-0.5)`` (the code's scale, not head_dim**-0.5), class
     query row dropped; sparsified at inference to the top ``coef_topk`` = 8 per row;
  4. up-projection basis ``W_up = P_back^T``, thresholded at inference as ``Threshold(|W_up|, 2e-2)``
     (absolute values are kept, as the code does); approximate attention ``A_hat = C @ W_up``;
  5. binary mask: the top ``ceil(attn_keep_rate * N)`` keys per query row of ``A_hat``; class-token row
     dense. The mask is detached: the task loss never trains the predictor.
In training mode of phase one ("predictor", the code's ``attn_recon``) the attention is dense, the basis
is not thresholded and the coefficients not top-k'd; everywhere else (phase two training and eval) the
mask is computed as at inference, like the code.

Documented choices and deviations:
- REAL sparse execution at inference (the code computes dense attention and masks it): the work of QK^T
  and AV shrinks to K / N. ``execution="csr"``: sparse kernels, SDDMM (``torch.sparse.sampled_addmm``) for
  the kept scores + CSR x dense SpMM for AV, the SpMM run by ``F.embedding_bag`` (FBGEMM; faster than torch's
  CSR matmul on CPU, see ``results/sparsifiner.md``) (no autograd; the inference path; the class row rides
  in the same pattern as a dense row); ``"sdpa"``: the mask as a float bias to torch's fused
  ``scaled_dot_product_attention`` (dense work, differentiable; the training path); ``"gather"``: each
  non-class query gathers its K keys and values (differentiable, sparse work, but slow on CPU);
  ``"auto"`` (default) picks csr when grad is off, else sdpa (the fastest measured on CPU in each mode:
  ``results/sparsifiner.md``); ``"masked"`` is the code's dense-then-mask path, kept for checks. All give
  the same output (tests: within 1e-5). The predictor's
  top-8 coefficients x basis product is the same SpMM (t * N multiply-adds per query; no gradient needed,
  the mask is detached). The bench's ``gflops`` column counts these kernels as executed and equals the
  analytic ``total_gmacs_analytic`` (tested).
- Speed: on CPU the gain comes with token sparsity; attention sparsity alone at 197 tokens costs more
  (selecting the connectivity) than the dense attention it replaces. Measurements, with the commands that
  gave them: ``results/sparsifiner.md``.
- The predictor's products are reassociated (same function, fewer multiply-adds):
  ``k'' = W_k (k^T P_n) + b_k (1^T P_n)`` and ``q' k'' = q^T (W_q^T k'') + b_q^T k''``.
- Token sparsity (optional; ``token_pruning_loc``, default ``()`` as the default YAML, the code default
  is ``(3, 6, 9)``): after those layers the patch tokens are ranked by the class-token attention
  averaged over heads (EViT-style, as the code) and the top ``ceil(rho^j (N - 1))`` are kept.
  Pruned tokens are REMOVED (the code zeroes them): outputs of kept tokens are the same, except that
  the code's class token still spends softmax mass on pruned tokens (their zeroed keys give logit 0);
  here it does not. The attention budget is ``min(ceil(rate N), kept patches)`` computed per call,
  not by mutating ``self.attn_budget`` in place (the code's stateful bug).
- ``P_n`` / ``P_back`` are sized for the token count, so the input size is fixed per model.
- Training phases are a constructor argument ``phase`` that sets ``requires_grad``: "predictor"
  trains only ``mask_predictor`` parameters, "backbone" (default) everything else. The code excludes
  ``pos_embed`` and ``cls_token`` from its optimiser; ``freeze_pos_embed=True`` does the same.
- ``forward_train(x, y)``: phase one ``0.01 * mean_layers MSE_sum(A_hat, A_teacher[:, :, 1:])``; phase
  two ``CE + 0.5 KL(teacher || student) (log-target) + 0.5 MSE(last-layer patch tokens)``, the code's
  weights. The frozen dense teacher is built lazily from ``teacher_ckpt`` (a zoo checkpoint, a timm
  DeiT weights file or an official one), kept outside the module tree (not in state_dict, not moved
  by ``.to``: it follows the input's device). Without a teacher, phase one fits the model's own dense
  attention (the same thing when the student starts from the teacher, as in the code) and phase two
  is plain CE. Mixup / soft targets and EMA of the official recipe are not reproduced.
- ``attn_keep_rate >= 1`` runs plain dense attention (no predictor): the dense DeiT baseline.
- LV-ViT-S (``sparsifiner_lvvit_small``, the code's ``sparsifiner_lvvit``): the same blocks with LV-ViT's
  4-layer conv patch embedding (``p_emb="4_2"``), no qkv bias, MLP ratio 3, residual branches divided by
  ``skip_lam=2``, LayerNorm eps 1e-5 and the token-labeling ``aux_head`` (eval logits ``cls + 0.5 max_tokens
  aux``; the token distillation compares the aux-head outputs, the code's ``features``). Parameter count as
  the official SparsifinerLVViT (backbone = TokenLabeling's ``lvvit_s``; tested); the side-by-side
  comparison with the official code is in ``results/sparsifiner.md``.

timm surface (``VisionTransformer``'s, with these choices):
- ``forward_features(x)`` / ``forward_head(x, pre_logits)`` / ``forward``: as timm; the LV-ViT head adds the
  token-labeling term to the logits only (``pre_logits=True`` is the pooled class token, ``[B, embed_dim]``).
  ``reset_classifier(n, global_pool)`` replaces the class head and, on LV-ViT, the ``aux_head`` too
  (``n = 0``: neither, so ``forward`` returns the pooled features).
- ``set_grad_checkpointing()``: each block runs under ``torch.utils.checkpoint`` (non-reentrant). The pass
  state the blocks record (approximate attention, connectivity, class-row attention) is collected from a
  private copy per block, so the recomputation in backward neither duplicates it nor sees later pruning.
- ``forward_intermediates`` / ``prune_intermediate_layers`` / ``feature_info``: as timm's ViT (one entry per
  block, stride = patch size) when every block keeps the full token grid (``token_pruning_loc=()``, the
  default). With token pruning each sample keeps its own token subset: there is no grid to return, so they
  raise and the instance's ``features_unsupported`` says why (use ``token_pruning_loc=()`` for features,
  or ``connectivity()`` / ``attention_maps()``); ``feature_info`` is then empty.
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..contract import Capabilities, ZooModel
from ..errors import UnsupportedError
from ..layers.pos_embed import check_patch_grid, check_pos_embed_init, init_sincos_pos_embed_
from ..layers.sparsifiner_attention import SparseContext, SparsifinerBlock
from ..registry import register_model
from ..spec import Reference, Weights

PAPER = "Wei et al., Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers, CVPR 2023"
PHASES = ("predictor", "backbone")


class ConvStemPatchEmbed(PatchEmbed):
    """LV-ViT's ``PatchEmbed4_2`` (``p_emb="4_2"``): a 7x7 stride-2 conv and two 3x3 convs (64 channels, BN +
    ReLU each, no conv bias), then a (p/2) x (p/2) stride-(p/2) projection: the same token grid as a p x p
    patch embedding. Parameter names as the official code (``conv1, bn1, conv2, bn2, conv3, bn3, proj``)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 stem_chs: int = 64, **_: Any):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        c = stem_chs
        self.conv1 = nn.Conv2d(in_chans, c, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


# ---------------------------------------------------------------------------------------- model
class Sparsifiner(ZooModel, VisionTransformer):
    """DeiT / ViT with a connectivity predictor per layer and sparse attention (see module docstring)."""

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, bench_extras=True)

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_keep_rate: float | Sequence[float] = 0.25,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        share_inout_proj: bool = False,
        basis_threshold: float = 2e-2,
        coef_topk: int = 8,
        token_keep_rate: float = 1.0,
        token_pruning_loc: Sequence[int] = (),
        execution: str = "auto",
        phase: str = "backbone",
        freeze_pos_embed: bool = False,
        teacher_ckpt: str | None = None,
        cls_weight: float = 1.0,
        cls_distill_weight: float = 0.5,
        token_distill_weight: float = 0.5,
        attn_recon_weight: float = 0.01,
        label_smoothing: float = 0.1,
        map_queries: Sequence[int] | None = None,
        pos_embed_init: str = "trunc_normal",
        p_emb: str | None = None,
        skip_lam: float = 1.0,
        aux_head: bool = False,
        norm_eps: float = 1e-6,
    ):
        check_pos_embed_init(pos_embed_init)
        check_patch_grid(img_size, patch_size)
        num_tokens = (img_size // patch_size) ** 2 + 1
        predictor_kwargs = dict(reduce_n_factor=reduce_n_factor, reduce_c_factor=reduce_c_factor,
                                share_inout_proj=share_inout_proj, basis_threshold=basis_threshold, coef_topk=coef_topk)
        rates = list(attn_keep_rate) if isinstance(attn_keep_rate, (list, tuple)) else [float(attn_keep_rate)] * depth
        if len(rates) != depth:
            raise ValueError(f"attn_keep_rate has {len(rates)} entries for {depth} layers")
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            block_fn=partial(SparsifinerBlock, num_tokens=num_tokens, attn_keep_rate=rates[0], execution=execution,
                             predictor_kwargs=predictor_kwargs, skip_lam=skip_lam),
            norm_layer=partial(nn.LayerNorm, eps=norm_eps),  # DeiT 1e-6; LV-ViT uses torch's default 1e-5
            **({"embed_layer": ConvStemPatchEmbed} if p_emb == "4_2" else {}),
        )
        if p_emb not in (None, "4_2"):
            raise ValueError(f"p_emb must be None (linear patch embedding) or '4_2' (LV-ViT conv stem), got {p_emb!r}")
        # LV-ViT token-labeling head: a classifier on every patch token; eval logits = cls + 0.5 * max over tokens
        self.aux_head = nn.Linear(embed_dim, num_classes) if aux_head and num_classes > 0 else None
        for blk, r in zip(self.blocks, rates):
            blk.attn.attn_keep_rate = r
        self.num_tokens = num_tokens
        # token sparsity: rho, rho^2, rho^3 ... after the listed layers (DynamicViT schedule, as the code)
        self.token_pruning_loc = tuple(int(i) for i in token_pruning_loc)
        self.token_budgets = {loc: math.ceil(token_keep_rate ** (j + 1) * (num_tokens - 1))
                              for j, loc in enumerate(self.token_pruning_loc)}
        self.loss_weights = dict(cls=cls_weight, cls_distill=cls_distill_weight, token_distill=token_distill_weight,
                                 attn_recon=attn_recon_weight)
        self.label_smoothing = label_smoothing
        self.teacher_ckpt = teacher_ckpt
        self.map_queries = list(map_queries) if map_queries is not None else None
        self._arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                          embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          p_emb=p_emb, skip_lam=skip_lam, aux_head=aux_head, norm_eps=norm_eps, **predictor_kwargs)
        self.__dict__["_teacher"] = None  # unregistered: not in state_dict, not a parameter of the student
        self.freeze_pos_embed = freeze_pos_embed
        if pos_embed_init == "sincos":  # 2-D sin-cos start (class token at 0), still learned: helps tiny data
            init_sincos_pos_embed_(self.pos_embed, self.patch_embed.grid_size, embed_dim)
        if self.token_pruning_loc:  # per-sample token subsets: no spatial grid after the first pruning layer
            self.features_unsupported = (
                f"token pruning after blocks {self.token_pruning_loc} keeps a different token subset per sample, so "
                "there is no spatial grid to return; build with token_pruning_loc=() for features, or use "
                "connectivity() / attention_maps() to inspect the pruned model")
            self.feature_info = []
        self.set_phase(phase)

    # ------------------------------------------------------------------ phases
    def set_phase(self, phase: str) -> None:
        """"predictor": only ``mask_predictor`` parameters train; "backbone": all others (predictor frozen)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase
        for name, p in self.named_parameters():
            is_pred = ".mask_predictor." in name
            p.requires_grad_(is_pred if phase == "predictor" else not is_pred)
        if phase == "backbone" and self.freeze_pos_embed:  # the code keeps these out of its optimiser
            self.pos_embed.requires_grad_(False)
            self.cls_token.requires_grad_(False)

    def _mode(self) -> str:
        return "recon" if (self.training and self.phase == "predictor") else "sparse"

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor, ctx: SparseContext | None = None, **_: Any) -> torch.Tensor:  # type: ignore[override]
        ctx = ctx or SparseContext(mode=self._mode())
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for i, blk in enumerate(self.blocks):
            ctx.need_cls_attn = i in self.token_budgets and ctx.mode != "recon"
            x = self._block(blk, x, ctx)
            if ctx.need_cls_attn:
                x = self._prune(x, ctx, self.token_budgets[i])
        return self.norm(x)

    def _block(self, blk: SparsifinerBlock, x: torch.Tensor, ctx: SparseContext) -> torch.Tensor:
        """One block, under activation checkpointing when enabled (and grad is on). The block records into a
        private copy of ``ctx`` taken now (the recomputation in backward sees this pass state, not the state of
        later layers, and its records are dropped); the first run's records are merged into ``ctx``."""
        if not (self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()):
            return blk(x, ctx)
        snap = replace(ctx, approx=[], attn=[], idx=[], keeps=[], cls_attn=None)

        def run(x: torch.Tensor) -> tuple[torch.Tensor, SparseContext]:
            local = replace(snap, approx=[], attn=[], idx=[], keeps=[], cls_attn=None)
            return blk(x, local), local

        x, local = checkpoint(run, x, use_reentrant=False)
        for name in ("approx", "attn", "idx", "keeps"):
            getattr(ctx, name).extend(getattr(local, name))
        ctx.cls_attn = local.cls_attn
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ViT ``forward_intermediates`` (block outputs, prefix tokens split off, NCHW on the patch grid)
        over the same (sparse) forward as :meth:`forward_features`; raises under token pruning (see
        ``features_unsupported``)."""
        if self.features_unsupported:
            raise UnsupportedError(self.features_unsupported)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        ctx = SparseContext(mode=self._mode())
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        intermediates = []
        for i, blk in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            x = self._block(blk, x, ctx)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in intermediates]
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: drop the blocks after the last kept index (and the norm / heads when asked)."""
        if self.features_unsupported:
            raise UnsupportedError(self.features_unsupported)
        return super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's ViT grouping (each block with its predictor; ``coarse`` changes nothing, as timm's ViT), the
        class and token-labeling heads last."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm\.", (99999,))], head=r"^fc_norm|^head|^aux_head")

    def _prune(self, x: torch.Tensor, ctx: SparseContext, budget: int) -> torch.Tensor:
        """Keep the ``budget`` patch tokens the class token attends to most (mean over heads); remove the rest."""
        B, n, C = x.shape
        if ctx.keep is None:
            ctx.keep = torch.arange(n, device=x.device).expand(B, n)
        budget = min(budget, n - 1)
        sel = ctx.cls_attn[:, :, 1:].mean(1).topk(budget, dim=-1).indices.sort(-1).values  # [B, budget]
        ctx.keep = torch.cat([ctx.keep[:, :1], ctx.keep[:, 1:].gather(1, sel)], dim=1)
        ctx.pruned = True
        return torch.cat([x[:, :1], x[:, 1:].gather(1, sel[..., None].expand(-1, -1, C))], dim=1)

    def forward(self, x: torch.Tensor, ctx: SparseContext | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x, ctx))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class-token logits; with the LV-ViT ``aux_head`` ``+ 0.5 * max_tokens aux_head(tokens)`` (the official
        inference output). Training with a teacher returns the class-token logits only, as the code (the token
        head then learns from the token distillation); without a teacher there is no token-level target, so
        training uses the inference output and the cross-entropy trains both heads (a documented choice: the
        code never trains without its teacher, and an untrained token head would corrupt eval logits)."""
        out = super().forward_head(x, pre_logits)
        if self.aux_head is None or pre_logits or (self.training and self.teacher_ckpt):
            return out
        return out + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).amax(1)

    def distill_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the token distillation compares, from the last-layer patch tokens: the tokens themselves
        (DeiT), or their ``aux_head`` outputs (LV-ViT: the code's ``features``)."""
        return tokens if self.aux_head is None else self.aux_head(tokens)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's; an LV-ViT model also gets a fresh ``aux_head`` for ``num_classes`` (none for 0)."""
        super().reset_classifier(num_classes, global_pool)
        self._arch["num_classes"] = num_classes  # the teacher is built for the current classes
        if self._arch["aux_head"]:
            self.aux_head = None
            if num_classes > 0:
                self.aux_head = nn.Linear(self.embed_dim, num_classes).to(self.head.weight).train(self.training)

    # ------------------------------------------------------------------ teacher + training objective
    def teacher(self, device: torch.device | None = None) -> nn.Module | None:
        """The frozen dense teacher, built from ``teacher_ckpt`` on first use (None without one)."""
        t = self.__dict__["_teacher"]
        if t is None and self.teacher_ckpt:
            t = build_teacher(self.teacher_ckpt, **self._arch)
            self.__dict__["_teacher"] = t
        if t is not None and device is not None and next(t.parameters()).device != device:
            t.to(device)
        return t

    @torch.no_grad()
    def _teacher_out(self, x: torch.Tensor, attn: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
        t = self.teacher(x.device)
        ctx = SparseContext(mode="dense", record_attn=attn)
        feats = t.forward_features(x, ctx)
        return VisionTransformer.forward_head(t, feats), feats, ctx.attn  # class-token logits (the code's teacher: no aux)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, **_: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = self.loss_weights
        has_teacher = self.teacher_ckpt is not None
        if self.phase == "predictor":
            ctx = SparseContext(mode="recon", record_attn=not has_teacher)
            logits = self.forward_head(self.forward_features(x, ctx))
            targets = self._teacher_out(x, attn=True)[2] if has_teacher else [a.detach() for a in ctx.attn]
            sparse_layers = [i for i, b in enumerate(self.blocks) if b.attn.attn_keep_rate < 1]
            pairs = list(zip(ctx.approx, [targets[i] for i in sparse_layers]))
            if not pairs:
                raise ValueError("phase 'predictor' needs attn_keep_rate < 1 in at least one layer")
            recon = sum(F.mse_loss(a, t[:, :, 1:, :], reduction="sum") for a, t in pairs) / len(pairs)
            return logits, {"attn_recon": w["attn_recon"] * recon}
        ctx = SparseContext(mode="sparse")
        feats = self.forward_features(x, ctx)
        logits = self.forward_head(feats)
        losses = {"ce": w["cls"] * F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)}
        if has_teacher:
            t_logits, t_feats, _ = self._teacher_out(x, attn=False)
            losses["cls_distill"] = w["cls_distill"] * F.kl_div(
                F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean", log_target=True)
            t_tok = t_feats[:, 1:]
            if ctx.keep is not None:  # kept tokens only, as the code's masked MSE
                t_tok = t_tok.gather(1, (ctx.keep[:, 1:] - 1)[..., None].expand(-1, -1, t_tok.shape[-1]))
            with torch.no_grad():
                t_tok = self.teacher().distill_tokens(t_tok)
            losses["token_distill"] = w["token_distill"] * F.mse_loss(self.distill_tokens(feats[:, 1:]), t_tok)
        return logits, losses

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def connectivity(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Binary connectivity mask of every layer, ``[B, H, N, N]`` over the original token positions
        (class row dense; rows / columns of pruned tokens zero); None for dense layers."""
        ctx = SparseContext(mode="sparse", record_idx=True)
        self.forward_features(x, ctx)
        out = []
        for idx, keep in zip(ctx.idx, ctx.keeps):
            if idx is None:
                out.append(None)
                continue
            B, H, m, _ = idx.shape
            small = torch.zeros(B, H, m, m + 1, device=x.device).scatter_(-1, idx, 1.0)
            small = torch.cat([torch.ones(B, H, 1, m + 1, device=x.device), small], dim=2)
            if keep is None:
                out.append(small)
                continue
            full = torch.zeros(B, H, self.num_tokens, self.num_tokens, device=x.device)
            kr = keep[:, None, :, None].expand(B, H, m + 1, m + 1)
            kc = keep[:, None, None, :].expand(B, H, m + 1, m + 1)
            rows = torch.zeros(B, H, m + 1, self.num_tokens, device=x.device).scatter_(-1, kc, small)
            full.scatter_(2, kr[..., :1].expand(B, H, m + 1, self.num_tokens), rows)
            out.append(full)
        return out

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Learned connectivity of chosen query patches (``map_queries``, default four quadrant centres) in
        the last sparse layer: ``{"connectivity_lL": [B, Q, h, w]}``, the fraction of heads that connect
        each query to each key patch."""
        gh, gw = self.patch_embed.grid_size
        queries = self.map_queries or [(gh // 4) * gw + gw // 4, (gh // 4) * gw + 3 * gw // 4,
                                       (3 * gh // 4) * gw + gw // 4, (3 * gh // 4) * gw + 3 * gw // 4]
        masks = self.connectivity(x)
        layer = max((i for i, m in enumerate(masks) if m is not None), default=None)
        if layer is None:
            return {}
        m = masks[layer].mean(1)  # [B, N, N]
        rows = m[:, [1 + qi for qi in queries], 1:]  # [B, Q, N-1]
        return {f"connectivity_l{layer}": rows.reshape(x.shape[0], len(queries), gh, gw)}

    def bench_extras(self, img_size: int | None = None) -> dict[str, Any]:
        """Analytic MHSA multiply-adds (QK^T + AV) per image: dense vs kept entries + predictor cost."""
        dense, sparse, pred = mhsa_macs(self)
        total_dense, total_sparse = total_macs(self)
        return {"attn_keep_rate": self.blocks[0].attn.attn_keep_rate, "mhsa_gmacs_dense": round(dense / 1e9, 4),
                "mhsa_gmacs_sparse": round(sparse / 1e9, 4), "predictor_gmacs": round(pred / 1e9, 4),
                "mhsa_flops_reduction": round(1 - sparse / dense, 4),
                "total_gmacs_analytic": round(total_sparse / 1e9, 4),
                "total_flops_reduction": round(1 - total_sparse / total_dense, 4)}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def mhsa_macs(model: Sparsifiner) -> tuple[float, float, float]:
    """(dense MHSA MACs, sparse MHSA MACs incl. predictor, predictor MACs) per image, with the predictor's
    executed products (reassociated low-rank, top-k coefficients x gathered basis rows). Token pruning
    shrinks n after the pruning layers."""
    N, D = model.num_tokens, model.embed_dim
    dense = sparse = pred = 0.0
    n = N
    for i, blk in enumerate(model.blocks):
        a, mp = blk.attn, blk.attn.mask_predictor
        H, d, c, r = a.num_heads, a.head_dim, mp.reduced_c, mp.reduced_n
        dense += 2 * N * N * D
        if a.attn_keep_rate >= 1:
            sparse += 2 * n * n * D
        else:
            K = a.budget(n, pruned=n < N)
            p = H * (d * n * r + c * d * r + d * c * r + (n - 1) * d * r + (n - 1) * min(mp.coef_topk, r) * n)
            pred += p
            sparse += p + 2 * n * D + 2 * (n - 1) * K * D  # class row dense + K keys per other row
        if i in model.token_budgets:
            n = 1 + min(model.token_budgets[i], n - 1)
    return dense, sparse, pred


def total_macs(model: Sparsifiner) -> tuple[float, float]:
    """(dense model MACs, this model's MACs) per image, analytic: patch embedding, the linear layers of every
    block at its token count, MHSA from :func:`mhsa_macs`, head. (Equal to the bench's ``gflops`` column,
    which counts the executed sparse kernels.)"""
    N, D = model.num_tokens, model.embed_dim
    pe = model.patch_embed
    stem = pe.proj.weight.numel() * (N - 1) + D * model.num_classes
    if isinstance(pe, ConvStemPatchEmbed):  # LV-ViT's three stride-2-resolution convs before the projection
        stem += sum(c.weight.numel() for c in (pe.conv1, pe.conv2, pe.conv3)) * (pe.img_size[0] // 2) * (pe.img_size[1] // 2)
    dense = sparse = float(stem)
    n = N
    for i, blk in enumerate(model.blocks):
        per_tok = 4 * D * D + 2 * D * blk.mlp.fc1.out_features
        dense += N * per_tok
        sparse += n * per_tok
        if i in model.token_budgets:
            n = 1 + min(model.token_budgets[i], n - 1)
    if model.aux_head is not None:  # eval: the token-labeling head on every remaining patch token
        dense += (N - 1) * D * model.num_classes
        sparse += (n - 1) * D * model.num_classes
    d_mhsa, s_mhsa, _ = mhsa_macs(model)
    return dense + d_mhsa, sparse + s_mhsa


# ---------------------------------------------------------------------------------------- weights
def checkpoint_filter_fn(state_dict: dict, model: Sparsifiner) -> dict:
    """timm / official DeiT or Sparsifiner weights -> this model: unwrap ``model``, resample ``pos_embed``,
    drop DeiT's distillation token / head, and keep the model's own (fresh) predictor where the file has none."""
    sd = state_dict.get("model", state_dict)
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith(("dist_token", "head_dist")):
            continue
        if k == "pos_embed" and v.shape != own["pos_embed"].shape:
            gs = model.patch_embed.grid_size
            v = resample_abs_pos_embed(v, new_size=gs, num_prefix_tokens=1)
        if k.endswith(("proj_n", "proj_back_n")) and k in own and v.shape != own[k].shape:
            continue  # predictor sized for another token count: re-initialised
        out[k] = v
    for k, v in own.items():
        if ".mask_predictor." in k and k not in out:
            out[k] = v
    return out


def build_teacher(path: str, **arch: Any) -> Sparsifiner:
    """A frozen dense model (attention keep rate 1) with the weights of ``path`` (zoo checkpoint, timm or
    official file); every backbone key must be present."""
    from ..weights import extract_state_dict, load_into, safe_load

    t = Sparsifiner(**arch, attn_keep_rate=1.0, phase="backbone")
    load_into(t, checkpoint_filter_fn(extract_state_dict(safe_load(path)), t), source=path)
    return t.eval().requires_grad_(False)


def _create(pretrained: bool, timm_name: str | None, url: str | None = None, **kwargs: Any) -> Sparsifiner:
    model = Sparsifiner(**kwargs)
    if pretrained:
        from ..weights import download_weights, extract_state_dict, load_into, safe_load

        if timm_name is not None:
            import timm

            sd, source = timm.create_model(timm_name, pretrained=True).state_dict(), f"timm:{timm_name}"
        elif url is not None:
            sd, source = extract_state_dict(safe_load(download_weights(url))), url
        else:
            raise ValueError("this variant has no published weights; train it or use pretrained_file=")
        load_into(model, checkpoint_filter_fn(sd, model), source=source)  # backbone; the predictor starts fresh
        model.set_phase(model.phase)
    return model


# the official DeiT/DynamicViT pipeline: ImageNet mean/std, bicubic, resize 256 -> crop 224 (crop_pct 0.875)
_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2303.13755",), license="mit", fixed_input_size=True,
             first_conv="patch_embed.proj", checkpoint_filter=checkpoint_filter_fn)
_NOTE = ("paper abstract: MHSA FLOPs -48..-69%, top-1 drop <= 0.4 (ImageNet-1k; dense backbone top-1 {}); "
         "per-model table values unverified")


@register_model(input_size=(3, 224, 224), source="zoo (timm ViT) + lim142857/Sparsifiner; backbone timm:deit_tiny_patch16_224",
                weights=Weights(backbone="deit_tiny_patch16_224.fb_in1k", official_file="checkpoint"),
                reference=Reference(params_m=5.80, gflops=1.26, note=_NOTE.format(72.2)), **_SPEC)
def sparsifiner_deit_tiny(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    return _create(pretrained, "deit_tiny_patch16_224", **{**dict(embed_dim=192, depth=12, num_heads=3), **kwargs})


@register_model(input_size=(3, 224, 224), source="zoo (timm ViT) + lim142857/Sparsifiner; backbone timm:deit_small_patch16_224",
                weights=Weights(backbone="deit_small_patch16_224.fb_in1k", official_file="checkpoint"),
                reference=Reference(params_m=22.25, gflops=4.6, note=_NOTE.format(79.9)), **_SPEC)
def sparsifiner_deit_small(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    return _create(pretrained, "deit_small_patch16_224", **{**dict(embed_dim=384, depth=12, num_heads=6), **kwargs})


@register_model(input_size=(3, 224, 224), source="zoo (timm ViT) + lim142857/Sparsifiner; backbone timm:deit_base_patch16_224",
                weights=Weights(backbone="deit_base_patch16_224.fb_in1k", official_file="checkpoint"),
                reference=Reference(params_m=86.97, gflops=17.6, note=_NOTE.format(81.8)), **_SPEC)
def sparsifiner_deit_base(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    return _create(pretrained, "deit_base_patch16_224", **{**dict(embed_dim=768, depth=12, num_heads=12), **kwargs})


LVVIT_S_URL = "https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/lvvit_s-26M-224-83.3.pth.tar"
_LVVIT_NOTE = ("LV-ViT-S backbone: 26.15M params, 83.3 top-1 (TokenLabeling README; ours 26.152M); Sparsifiner-LV-ViT-S table values unverified; "
               "inference logits = class head + 0.5 max over the token-labeling head, as the official code")


@register_model(input_size=(3, 224, 224),
                source="zoo (timm ViT blocks) + lim142857/Sparsifiner src/models/sparsifiner_lvvit.py; backbone LV-ViT-S (zihangJiang/TokenLabeling)",
                weights=Weights(url=LVVIT_S_URL, official_file="checkpoint"), reference=Reference(note=_LVVIT_NOTE),
                **{**_SPEC, "first_conv": "patch_embed.conv1", "classifier": ("head", "aux_head")})
def sparsifiner_lvvit_small(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    """Sparsifiner on LV-ViT-S, as the official ``sparsifiner_lvvit``: 384-d, 16 layers, 6 heads, MLP ratio 3, no
    qkv bias, the 4-layer conv patch embedding (``p_emb="4_2"``), residual branches divided by ``skip_lam=2``,
    and the token-labeling ``aux_head``; no token pruning (the official LV-ViT model has none; the option works).
    ``pretrained=True`` downloads the official LV-ViT-S weights (the backbone; the predictor starts fresh)."""
    arch = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, qkv_bias=False, p_emb="4_2", skip_lam=2.0,
                aux_head=True, norm_eps=1e-5)
    return _create(pretrained, None, url=LVVIT_S_URL, **{**arch, **kwargs})


@register_model(input_size=(3, 32, 32), source="zoo (timm ViT, 32 px, patch 4, 4 x 64-d, 4 heads, MLP ratio 2, sin-cos start)",
                weights=Weights(note="CPU variant: train it"), **_SPEC)
def sparsifiner_deit_nano(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    """CPU variant for the embedded digits: 4x4 patches (64 tokens + class token), keep rate 0.25 -> 16 keys per
    query, the code's ``reduce_n_factor=6`` (rank 10). The position embedding starts from a 2-D sin-cos table
    (still learned): on digits it learns much faster than 8x8 patches with a trunc-normal start.
    ``attn_keep_rate=1.0`` is its dense DeiT baseline (the teacher of the digits experiment)."""
    return _create(pretrained, None, **{**dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                               mlp_ratio=2.0, pos_embed_init="sincos"), **kwargs})
