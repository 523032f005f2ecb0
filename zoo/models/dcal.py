"""DCAL: dual cross-attention learning (GLCA + PWCA) on timm's DeiT / ViT.

Paper: Zhu, Ke, Li, Liu, Tian, Shan, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization
and Object Re-Identification", CVPR 2022 (arXiv 2205.02151). There is no official code; this file follows
the paper and the zoo's spec sheet for it. Built on timm's ``VisionTransformer`` /
``Block`` / ``Attention``: the self-attention (SA) stack has timm's parameter names, so timm DeiT / ViT
weights load unchanged (``pretrained=True`` or ``pretrained_file=``; ``pos_embed`` is resampled for other
input sizes, e.g. the 448 px FGVC recipe from 224 px weights, by timm's ``checkpoint_filter_fn``).

Three branches, trained jointly (``forward_train``), with ``x: [B, 1+N, D]`` tokens:

* SA: the L = ``depth`` (12) timm blocks, class token -> ``norm`` -> ``head``.
* GLCA (global-local cross-attention, M = 1 block with its OWN weights, norm and classifier):
  1. attention rollout over the SA blocks ``1..glca_input``: ``S_hat = S_bar_i ... S_bar_1`` with
     ``S_bar = 0.5 S + 0.5 I``, S = the block's attention probabilities averaged over heads, rows
     re-normalised; computed without gradient, in fp32. Only the class row is needed, so it is
     propagated as a row vector, ``e_0^T S_bar_L ... S_bar_1`` (N^2 per layer; the full N x N product,
     ``rollout()``, costs N^3 per layer and is kept for inspection and tests);
  2. the R = ``round(glca_ratio * N)`` patch tokens (at least 1) with the largest class-row rollout;
  3. queries: the class token + those R tokens; keys / values: ALL 1+N tokens of the same layer:
     ``softmax(Q_l K_g^T / sqrt(d)) V_g``, then the block's MLP, on the 1+R query tokens only;
  4. the GLCA class token -> ``glca_norm`` -> ``glca_head``.
* PWCA (pair-wise cross-attention, training only, T = ``depth`` blocks that SHARE every SA weight: they are
  the same ``Block`` modules, and the same ``norm`` / ``head``): a second token stream of image I1 runs
  through the blocks in lock-step with SA; at every block its queries attend to the concatenation of its
  own keys / values and those of a partner image I2, ``K_c = [K_1; K_2]``, ``V_c = [V_1; V_2]`` (2+2N
  keys, one joint softmax). Trained with I1's label.

Loss (Kendall et al. uncertainty weighting, as the paper):
``L = 1/2 (e^-w1 L_SA + e^-w2 L_GLCA + e^-w3 L_PWCA + w1 + w2 + w3)``; ``forward_train`` returns it as
three named terms ``{"sa", "glca", "pwca"}`` (``1/2 (e^-w_k L_k + w_k)`` each) so the task logs each
branch; their sum is L. The w's are one parameter, ``loss_log_vars`` (no weight decay).

Inference (``forward``): the sum of the SA and GLCA class probabilities. The model returns
``log((p_SA + p_GLCA) / 2)``: normalised log-probabilities, so argmax is the argmax of the summed
probabilities, ``softmax`` of the output gives back their mean, and the task's cross-entropy on the output
is the negative log-likelihood of that mean (a proper loss for ``val/loss``). ``inference="sa"`` or
``"glca"`` returns that branch's plain logits instead (the paper's SA-only inference ablation).

Documented choices (the paper leaves them open) and deviations:
- GLCA placement: after the L-th SA block, on its output tokens, with the rollout over all L blocks
  (reading (a) of the spec sheet; the more faithful re-implementation does the same). ``glca_input=L-1``
  gives reading (b): GLCA parallel to the last SA block, on the input of block L, rollout over blocks
  1..L-1. Either way the block computes queries, attention output and MLP for the 1+R selected tokens
  only, keys / values for all tokens: at 224 px on DeiT-T this is +1.9% MACs (the paper: about +2%).
- Head fusion in the rollout: plain mean over heads, then ``0.5 S + 0.5 I`` and row re-normalisation
  (the re-implementations do this; the paper does not say).
- R counts patch tokens only: ``round(0.1 * 784) = 78`` at 448 px / patch 16, ``round(0.1 * 196) = 20`` at
  224 px, 6 of 64 on the nano variant. The class token is always an extra query (both re-implementations
  include it; the paper's GLCA classifier reads a class token).
- GLCA start: with ``pretrained=True`` / a timm or DeiT file that has no ``glca_*`` keys, the GLCA block
  starts as a copy of the LAST SA block, ``glca_norm`` as a copy of ``norm`` and ``glca_head`` as a copy of
  ``head`` when the class counts match (else fresh); the paper does not say. Without weights everything
  starts with timm's ViT init.
- PWCA partner: another image of the same mini-batch, chosen by a random cyclic permutation (every image
  is someone's partner exactly once and never its own; with a batch of one the image is its own partner).
  The paper samples I2 from the training set at random, without class constraints; a shuffled batch is an
  equivalent sample. The partner's keys / values at block i are those of its SA stream at block i (the SA
  pass computes them anyway, so PWCA costs one extra stream, not two), and gradients flow through them.
- PWCA reuses the SA final norm and classifier as well ("shares weights with SA").
- Loss-weight init: ``w = 0`` (``loss_weight_init``; unstated in the paper; the re-implementations use 0,
  FairMOT used -1.85 / -1.05). ``loss_weighting="sum"`` gives a plain sum of the three losses.
  Cross-entropy with ``label_smoothing`` (default 0, as the paper's "cross-entropy").
- ``glca=False, pwca=False`` is the plain DeiT / ViT baseline (no extra parameters; CE only): the SA-only
  baseline of the paper's tables. Each branch can be switched off alone (loss weights follow).
- M = 1 GLCA block only (the paper's setting); T = L PWCA blocks (the paper's T = 12 = L).
- SA attention probabilities are needed for the rollout, so when GLCA is on the SA blocks run explicit
  (non-fused) attention; the PWCA stream and the GLCA block use ``F.scaled_dot_product_attention``.
- Input sizes: any multiple of the patch size (``dynamic_img_size``: ``pos_embed`` is resampled on the
  fly); build with ``img_size=448`` for the FGVC recipe so the resampling happens once, at load time.
- Re-ID (the paper's second task): with ``num_classes=0`` (no classifiers) the net is trained by
  :class:`zoo.tasks.ReIDTask` through the ``feature_objective`` capability. ``feature_heads()`` names the
  class-token features ``{"sa": D, "glca": D}``; ``forward_train_features(x, y, criterion)`` runs the three
  branches and scores the SA, GLCA and PWCA class tokens with the task's criterion (identity
  cross-entropy after a BNNeck + triplet loss: "a triplet loss added to each branch"), the PWCA token with
  the SA head's (PWCA shares every SA weight), and weighs the three losses as in FGVC (uncertainty
  weighting, ``loss_weighting``). The Re-ID feature at inference is ``forward_head(x, pre_logits=True)``:
  the SA and GLCA class tokens concatenated, ``[B, 2D]`` (``inference="sa"``: SA only, the paper's SA-only
  ablation). PWCA is never computed at inference. The recipes set R = ``glca_ratio=0.3`` (the paper's
  Re-ID ratio; 0.1 for FGVC) and 256 x 128 (persons) or 256 x 256 (VeRi-776) inputs.
- ``dcal_vit_base_r50``: the R50 + ViT-B/16 hybrid of the paper's Table 1, timm's ``vit_base_r50_s16_224``
  (a ResNetV2-50 stem of 3 + 4 + 9 bottleneck units, stride 16, as ``HybridEmbed`` with 1 x 1 patches) under
  the same DCAL blocks; its IN-21k weights are timm's ``vit_base_r50_s16_224.orig_in21k``. Parameter counts
  are measured in the README's model table.
- ``dcal_deit_nano`` (CPU, 32 px digits): 4x4 patches (64 tokens), 64-d, 4 blocks, 4 heads, MLP ratio 2, the
  position embedding starting from a 2-D sin-cos table (still learned), as ``dependencyvit_nano``.

"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from timm.layers import PatchEmbed
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _timm_filter
from torch import nn

from ..contract import Capabilities, ZooModel
from ..layers.cross_attention import DCALBlock, GLCABlock, residual_attention, rollout_cls_row
from ..layers.pos_embed import check_pos_embed_init, init_sincos_pos_embed_
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = ("Zhu et al., Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object "
         "Re-Identification, CVPR 2022")
INFERENCE = ("sum", "sa", "glca")

__all__ = ["DCAL", "DCALBlock", "GLCABlock", "rollout_cls_row", "checkpoint_filter_fn"]


# ---------------------------------------------------------------------------------------- model
class DCAL(ZooModel, VisionTransformer):
    """DeiT / ViT + GLCA + PWCA (see the module docstring).

    timm's model surface, with these documented choices:

    * ``forward(x) == forward_head(forward_features(x))``.
    * ``forward_features(x)``: ``[B, 2+N, D]`` = ``[SA class token, GLCA class token, the N SA patch tokens]``,
      each normed by its branch's norm: the layout of timm's distilled DeiT (class and distillation tokens
      first). That is everything the two classifiers read. The outputs of the R local GLCA queries are not
      in it: the GLCA classifier reads the GLCA class token only, and in a single attention + MLP block
      (M = 1) that token's output does not depend on which R queries were selected (``attention_maps`` shows
      the selection). With ``inference="sa"`` (or ``glca=False``) GLCA is not computed and the features are
      plain timm ViT's ``[B, 1+N, D]``.
    * ``forward_head(x, pre_logits=True)``: ``[SA class token; GLCA class token]`` concatenated,
      ``head_hidden_size = 2 D`` (``num_features = D``, the width of every token). These are the inputs of
      the two classifiers, and the paper's Re-ID inference feature is the same concatenation; a linear
      probe on it can represent the sum of two linear heads. With one inference branch (``"sa"`` /
      ``"glca"``): that branch's class token, ``head_hidden_size = D``.
    * ``reset_classifier(n, global_pool=None)`` replaces BOTH classifiers (``head`` and ``glca_head``); with
      ``n = 0`` ``forward`` returns the pre-logits features. ``global_pool``: ``"token"`` (the default: the
      class tokens) or ``""`` (unpooled: ``forward_head`` returns the tokens ``[B, T, D]``, or, with
      classifiers, every token through its branch's classifier ``[B, T, C]``). Average / attention pooling
      is refused: both heads of the method read class tokens.
    * ``set_grad_checkpointing()``: activation checkpointing of every SA block (together with its PWCA
      step in ``forward_train``: both streams go through a block at once) and of the GLCA block.
    * ``forward_intermediates``: the SA blocks' outputs with timm ViT's semantics (class token dropped,
      NCHW patch grid, ``norm=True`` applies the SA ``norm``); the final features are ``forward_features(x)``.
      ``stop_early`` cuts the SA stack after the last wanted block only with ``intermediates_only`` (GLCA
      needs the stack up to ``glca_input``). ``prune_intermediate_layers`` keeps the SA blocks up to the last
      wanted index; with ``prune_head`` (the default) it also removes both classifiers and the GLCA and PWCA
      branches: the net becomes a plain ViT feature extractor.
    """

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, bench_extras=True,
                                    feature_objective=True)

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        glca: bool = True,
        pwca: bool = True,
        glca_ratio: float = 0.1,
        glca_input: int | None = None,
        loss_weighting: str = "uncertainty",
        loss_weight_init: float | Sequence[float] = 0.0,
        label_smoothing: float = 0.0,
        inference: str = "sum",
        pos_embed_init: str = "trunc_normal",
        dynamic_img_size: bool = True,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
    ):
        check_pos_embed_init(pos_embed_init)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, dynamic_img_size=dynamic_img_size, block_fn=DCALBlock,
                         embed_layer=embed_layer)
        if not 0 < glca_ratio <= 1:
            raise ValueError(f"glca_ratio must be in (0, 1], got {glca_ratio}")
        glca_input = depth if glca_input is None else int(glca_input)
        if not 1 <= glca_input <= depth:
            raise ValueError(f"glca_input must be in 1..{depth} (SA blocks before GLCA), got {glca_input}")
        if loss_weighting not in ("uncertainty", "sum"):
            raise ValueError(f"loss_weighting must be 'uncertainty' or 'sum', got {loss_weighting!r}")
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {inference!r}")
        if inference != "sa" and not glca:
            inference = "sa"  # nothing else to fuse
        self.use_glca, self.use_pwca = bool(glca), bool(pwca)
        self.glca_ratio, self.glca_input = float(glca_ratio), glca_input
        self.loss_weighting, self.label_smoothing, self.inference = loss_weighting, label_smoothing, inference
        if self.use_glca:
            dpr = drop_path_rate  # the GLCA block sits at the top of the stack: the last block's rate
            self.glca_block = GLCABlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                        proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr)
            self.glca_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.glca_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self.glca_block.apply(self._init_extra)
            if isinstance(self.glca_head, nn.Linear):
                self._init_extra(self.glca_head)
        self.branches = ["sa"] + (["glca"] if self.use_glca else []) + (["pwca"] if self.use_pwca else [])
        if len(self.branches) > 1 and loss_weighting == "uncertainty":
            init = loss_weight_init if isinstance(loss_weight_init, (list, tuple)) else [loss_weight_init] * 3
            full = dict(zip(("sa", "glca", "pwca"), [float(v) for v in init]))
            self.loss_log_vars = nn.Parameter(torch.tensor([full[b] for b in self.branches]))
        else:  # one branch, or a plain sum: no loss weights (nothing in the state dict)
            self.register_parameter("loss_log_vars", None)
        if pos_embed_init == "sincos":  # fixed 2-D sin-cos start, still learned: helps tiny data sets
            init_sincos_pos_embed_(self.pos_embed, self.patch_embed.grid_size, embed_dim)
        # pre-logits: the class token of each inference branch (see the class docstring)
        self.head_hidden_size = embed_dim * (2 if self.inference == "sum" else 1)

    @staticmethod
    def _init_extra(m: nn.Module) -> None:  # timm's ViT default init for the extra modules
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    def num_selected(self, num_patches: int) -> int:
        """R: how many patch tokens GLCA takes as queries (besides the class token)."""
        return max(1, min(num_patches, round(self.glca_ratio * num_patches)))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    @staticmethod
    def partners(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """A random cyclic permutation: ``partner[i] != i`` for a batch of two or more."""
        perm = torch.randperm(batch_size, device=device)
        out = torch.empty_like(perm)
        out[perm] = perm.roll(-1)
        return out

    @property
    def _computes_glca(self) -> bool:
        """Whether ``forward`` runs the GLCA branch (not with ``inference="sa"``)."""
        return self.use_glca and self.inference != "sa"

    @staticmethod
    def _sa_step(blk: DCALBlock, record: bool, partner: torch.Tensor | None, x: torch.Tensor,
                 xp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One SA block and, when ``xp`` is given, its PWCA step: ``(x, probabilities or None, xp)``."""
        x, p, (k, v) = blk.forward_sa(x, need_probs=record)
        if xp is not None:
            xp = blk.forward_pwca(xp, k[partner], v[partner])
        return x, p, xp

    def _run(self, x: torch.Tensor, pwca: bool = False, glca: bool | None = None, glca_attn: bool = False,
             take: Sequence[int] = (), stop: int | None = None) -> dict[str, Any]:
        """One pass: SA tokens (normed), rollout class row, GLCA tokens (``glca``, default: the model has the
        branch), PWCA tokens (``pwca``); the un-normed outputs of the SA blocks in ``take`` as
        ``"intermediates"``. With ``stop`` the SA stack ends after that block and only the intermediates
        come back. With grad checkpointing every block step (SA, SA + PWCA, GLCA) is checkpointed."""
        glca = self.use_glca if glca is None else glca
        x = self._embed(x)
        xp = x if pwca else None
        partner = self.partners(x.shape[0], x.device) if pwca else None
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        probs: list[torch.Tensor] = []
        out: dict[str, Any] = {"intermediates": []}
        for i, blk in enumerate(self.blocks if stop is None else self.blocks[:stop + 1]):
            record = glca and i < self.glca_input
            if not record and not pwca:
                x = checkpoint(blk, x) if ckpt else blk(x)  # timm's fused path
            else:
                step = partial(self._sa_step, blk, record, partner)
                x, p, xp = checkpoint(step, x, xp) if ckpt else step(x, xp)
                if p is not None:
                    probs.append(p)
            if i in take:
                out["intermediates"].append(x)
            if glca and i + 1 == self.glca_input:
                out["glca_in"] = x
        if stop is not None:
            return out
        out["sa"] = self.norm(x)
        if pwca:
            out["pwca"] = self.norm(xp)
        if glca:
            with torch.no_grad():
                r = rollout_cls_row(probs)  # [B, 1+N]
            n = r.shape[1] - 1
            idx = r[:, 1:].topk(self.num_selected(n), dim=1).indices.sort(1).values
            if glca_attn:
                g, out["glca_probs"] = self.glca_block(out["glca_in"], idx, return_attn=True)
            else:
                g = checkpoint(self.glca_block, out["glca_in"], idx) if ckpt else self.glca_block(out["glca_in"], idx)
            out.update(rollout=r, glca_idx=idx, glca=self.glca_norm(g))
        return out

    @staticmethod
    def _features(o: dict[str, Any]) -> torch.Tensor:
        """``forward_features``' layout: ``[SA class, GLCA class, SA patches]`` (``[SA class, SA patches]``
        without GLCA)."""
        sa = o["sa"]
        return torch.cat([sa[:, :1], o["glca"][:, :1], sa[:, 1:]], 1) if "glca" in o else sa

    def _sa_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.fc_norm(tokens[:, 0])))

    def _glca_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.glca_head(self.head_drop(tokens[:, 0]))

    def _fuse(self, sa: torch.Tensor, glca: torch.Tensor | None) -> torch.Tensor:
        if self.inference == "sa" or glca is None:
            return sa
        if self.inference == "glca":
            return glca
        # log of the mean of the two class-probability vectors: argmax = argmax of their sum
        return torch.logsumexp(torch.stack([sa.float().log_softmax(-1), glca.float().log_softmax(-1)]), 0) - math.log(2)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, 2+N, D]``: SA class token, GLCA class token, SA patch tokens, each branch's tokens normed
        (``[B, 1+N, D]``, plain ViT, when ``forward`` does not use GLCA: ``inference="sa"`` or ``glca=False``)."""
        return self._features(self._run(x, glca=self._computes_glca))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # type: ignore[override]
        """``forward_features`` -> scores ``[B, C]`` (``log((p_SA + p_GLCA) / 2)`` with ``inference="sum"``,
        else one branch's logits), or the pre-logits ``[B, head_hidden_size]`` (``pre_logits=True`` or no
        classifier); ``global_pool=""``: the tokens unpooled (see the class docstring)."""
        glca = self._computes_glca
        if self.global_pool == "":
            x = self.head_drop(self.fc_norm(x))
            if pre_logits or self.num_classes == 0:
                return x
            if not glca:
                return self.head(x)
            return torch.cat([self.head(x[:, :1]), self.glca_head(x[:, 1:2]), self.head(x[:, 2:])], 1)
        sa = self.head_drop(self.fc_norm(x[:, 0]))
        g = self.head_drop(x[:, 1]) if glca else None
        if pre_logits or self.num_classes == 0:
            return {"sum": lambda: torch.cat([sa, g], -1), "sa": lambda: sa, "glca": lambda: g}[self.inference]()
        return self._fuse(self.head(sa), None if g is None else self.glca_head(g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Scores ``[B, C]``: ``log((p_SA + p_GLCA) / 2)`` (``inference="sum"``), else one branch's logits;
        ``forward_head(forward_features(x))``."""
        return self.forward_head(self.forward_features(x))

    def branch_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-branch logits ``{"sa", "glca"}`` (inference branches)."""
        o = self._run(x)
        out = {"sa": self._sa_logits(o["sa"])}
        if self.use_glca:
            out["glca"] = self._glca_logits(o["glca"])
        return out

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, **_: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(fused scores, {"sa", "glca", "pwca"} uncertainty-weighted loss terms)``; PWCA needs B >= 2 to
        have a real partner (with B = 1 the image is its own partner)."""
        o = self._run(x, pwca=self.use_pwca)
        logits = {"sa": self._sa_logits(o["sa"])}
        if self.use_glca:
            logits["glca"] = self._glca_logits(o["glca"])
        if self.use_pwca:
            logits["pwca"] = self._sa_logits(o["pwca"])
        ce = {b: F.cross_entropy(logits[b], y, label_smoothing=self.label_smoothing) for b in self.branches}
        losses = self._weigh(ce)
        return self._fuse(logits["sa"], logits.get("glca")), losses if len(ce) > 1 else {"ce": ce["sa"]}

    def _weigh(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-branch losses -> the terms whose sum is the objective: ``1/2 (e^-w_k L_k + w_k)`` each with
        uncertainty weighting, else the losses themselves (a plain sum)."""
        if self.loss_log_vars is None:
            return raw
        w = self.loss_log_vars
        return {b: 0.5 * (torch.exp(-w[i]) * raw[b] + w[i]) for i, b in enumerate(self.branches)}

    def feature_heads(self, inference: bool = False) -> dict[str, int]:
        """The class-token features a metric-learning task trains: ``{"sa": D, "glca": D}`` (``"sa"`` only without
        GLCA); ``inference=True``: those ``forward_head(x, pre_logits=True)`` concatenates, in its order."""
        heads = {"sa": self.embed_dim, **({"glca": self.embed_dim} if self.use_glca else {})}
        if inference:
            keep = {"sum": ("sa", "glca"), "sa": ("sa",), "glca": ("glca",)}[self.inference]
            heads = {h: d for h, d in heads.items() if h in keep}
        return heads

    def forward_train_features(self, x: torch.Tensor, y: torch.Tensor,
                               criterion: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
                               ) -> dict[str, torch.Tensor]:
        """Training on features (Re-ID): the class tokens of SA, GLCA and PWCA (``[B, D]`` each, as the heads read
        them), each scored by ``criterion(head, feature, y)``, PWCA with the ``"sa"`` head (shared weights);
        returns the weighted terms ``{"sa", "glca", "pwca"}`` (one branch: ``{"sa"}``)."""
        o = self._run(x, pwca=self.use_pwca)
        feats = {"sa": self.head_drop(self.fc_norm(o["sa"][:, 0]))}
        if self.use_glca:
            feats["glca"] = self.head_drop(o["glca"][:, 0])
        if self.use_pwca:
            feats["pwca"] = self.head_drop(self.fc_norm(o["pwca"][:, 0]))
        return self._weigh({b: criterion("sa" if b == "pwca" else b, f, y) for b, f in feats.items()})

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def rollout(self, x: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """The full attention rollout ``S_hat = S_bar_l ... S_bar_1`` over the first ``layers`` SA blocks
        (default ``glca_input``): ``[B, 1+N, 1+N]``, every row a distribution (N^3 per layer: inspection only)."""
        layers = self.glca_input if layers is None else layers
        x = self._embed(x)
        acc = None
        for blk in self.blocks[:layers]:
            x, p, _ = blk.forward_sa(x, need_probs=True)
            acc = residual_attention(p) if acc is None else residual_attention(p) @ acc
        return acc

    @torch.no_grad()
    def selected_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch positions (0..N-1, ascending) of the GLCA queries besides the class token: ``[B, R]``."""
        if not self.use_glca:
            raise ValueError("this model has no GLCA branch (glca=False)")
        return self._run(x)["glca_idx"]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rollout``: the class row of the attention rollout over the patches ``[B, 1, h, w]``;
        ``glca_queries``: the R patches GLCA selected, binary, at pixel resolution (crisp) ``[B, 1, H, W]``;
        ``glca_cls_attention``: the GLCA class query's attention per head ``[B, H, h, w]``.
        Without GLCA: the rollout of all SA blocks only."""
        gh, gw = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        B = x.shape[0]
        if not self.use_glca:
            r = self.rollout(x, layers=len(self.blocks))[:, 0, 1:]
            return {"rollout": r.reshape(B, 1, gh, gw)}
        o = self._run(x, glca_attn=True)
        sel = torch.zeros(B, gh * gw, device=x.device).scatter_(1, o["glca_idx"], 1.0).view(B, 1, gh, gw)
        return {"rollout": o["rollout"][:, 1:].reshape(B, 1, gh, gw),
                "glca_queries": F.interpolate(sel, size=x.shape[-2:], mode="nearest"),
                "glca_cls_attention": o["glca_probs"][:, :, 0, 1:].reshape(B, -1, gh, gw)}

    def bench_extras(self, img_size: int | None = None) -> dict[str, Any]:
        """Analytic multiply-adds per image at inference: the SA backbone, the GLCA block, the rollout."""
        hw = (img_size, img_size) if img_size else tuple(self.patch_embed.img_size)
        gh, gw = self.patch_embed.dynamic_feat_size(hw)
        n = gh * gw
        D, L = self.embed_dim, len(self.blocks)
        hid = self.blocks[0].mlp.fc1.out_features
        t = n + 1  # the hybrid's CNN stem is not counted: ViT blocks + patch projection only
        sa = L * (t * (4 * D * D + 2 * D * hid) + 2 * t * t * D) + n * self.patch_embed.proj.weight[0].numel() * D
        out = {"sa_gmacs_analytic": round(sa / 1e9, 4)}
        if self.use_glca:
            r = self.num_selected(n) + 1
            glca = t * 2 * D * D + r * (2 * D * D + 2 * D * hid) + 2 * r * t * D
            roll = self.glca_input * t * t  # class row x S_bar per layer
            out.update(glca_queries=r, glca_gmacs_analytic=round(glca / 1e9, 4),
                       rollout_gmacs_analytic=round(roll / 1e9, 4),
                       glca_macs_overhead=round((glca + roll) / sa, 4))
        return out

    # ------------------------------------------------------------------ timm surface
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Both classifiers (SA ``head``, ``glca_head``) to ``num_classes`` (0: none, ``forward`` gives the
        pre-logits); ``global_pool``: ``"token"`` or ``""`` (unpooled tokens)."""
        if global_pool not in (None, "", "token"):
            raise ValueError(f"DCAL's classifiers read class tokens: global_pool must be 'token' or '' (unpooled), "
                             f"got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)
        if getattr(self, "use_glca", False):
            ref = self.pos_embed
            self.glca_head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                              if num_classes > 0 else nn.Identity())
            self.glca_head.train(self.training)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "loss_log_vars"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm ViT's groups; the GLCA block and norm join the last SA block's group (the GLCA block starts as
        its copy and reads its output), the classifiers and loss weights form the last group."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^glca_block\.|^glca_norm\.|^norm\.", (99999,))],
                    head=r"^head\.|^glca_head\.|^fc_norm\.|^loss_log_vars")

    def forward_intermediates(  # type: ignore[override]
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the SA blocks ``indices`` (int: the last n; a list, negatives allowed; None: all) as timm's
        ViT gives them: patch tokens ``[B, D, h, w]`` (``"NCHW"``) or ``[B, N, D]`` (``"NLC"``), class token
        dropped (``return_prefix_tokens``: ``(map, class token)`` pairs), through the SA ``norm`` with
        ``norm``. Returns the list (``intermediates_only``) or ``(forward_features(x), list)``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        stop = (max_index if stop_early else len(self.blocks) - 1) if intermediates_only else None
        o = self._run(x, glca=self._computes_glca and stop is None, take=take, stop=stop)
        inter = [self.norm(t) if norm else t for t in o["intermediates"]]
        prefix = [t[:, :self.num_prefix_tokens] for t in inter]
        inter = [t[:, self.num_prefix_tokens:] for t in inter]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size(x.shape[-2:])
            inter = [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in inter]
        if return_prefix_tokens:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (self._features(o), inter)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep the SA blocks up to the last of ``indices``; ``prune_norm``: drop the SA ``norm``;
        ``prune_head``: drop both classifiers and the GLCA / PWCA branches (a plain ViT feature extractor).
        Returns the kept (absolute) indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        if not prune_head and self.use_glca and max_index + 1 < self.glca_input:
            raise ValueError(f"GLCA reads the output of SA block {self.glca_input - 1}: keep the blocks up to it, "
                             "or prune the head too (that removes GLCA)")
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            for name in ("glca_block", "glca_norm", "glca_head"):
                self._modules.pop(name, None)
            self.register_parameter("loss_log_vars", None)
            self.use_glca = self.use_pwca = False
            self.inference, self.branches, self.head_hidden_size = "sa", ["sa"], self.embed_dim
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


# ---------------------------------------------------------------------------------------- weights
def checkpoint_filter_fn(state_dict: dict, model: DCAL) -> dict:
    """timm / official DeiT or ViT weights (or a DCAL file) -> this model: timm's ViT filter (``pos_embed``
    resampled to the model's grid), DeiT's distillation token / head dropped, and, when the file has no GLCA
    weights, the GLCA block / norm / head started from the last SA block / ``norm`` / ``head``; the loss
    weights keep the model's own start."""
    sd = state_dict.get("model", state_dict)
    sd = {k: v for k, v in sd.items() if not k.startswith(("dist_token", "head_dist"))}
    if "pos_embed" in sd and sd["pos_embed"].shape[1] == model.pos_embed.shape[1] + 1:
        sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], 1)  # distilled DeiT
    out = _timm_filter(sd, model)
    own = model.state_dict()
    if getattr(model, "use_glca", False) and not any(k.startswith("glca_") for k in out):
        last = f"blocks.{len(model.blocks) - 1}."
        for k in list(out):
            if k.startswith(last):
                out["glca_block." + k[len(last):]] = out[k]
            elif k.startswith("norm."):
                out["glca_norm." + k[5:]] = out[k]
            elif k.startswith("head.") and f"glca_{k}" in own and own[f"glca_{k}"].shape == out[k].shape:
                out[f"glca_{k}"] = out[k]
    for k in ("glca_head.weight", "glca_head.bias", "loss_log_vars"):
        if k in own and k not in out:
            out[k] = own[k]
    if not getattr(model, "use_glca", False):
        out = {k: v for k, v in out.items() if not k.startswith("glca_")}
    if "loss_log_vars" in out and "loss_log_vars" not in own:
        out.pop("loss_log_vars")
    return out


def _create(pretrained: bool, timm_name: str | None, **kwargs: Any) -> DCAL:
    model = DCAL(**kwargs)
    if pretrained:
        if timm_name is None:
            raise ValueError("this variant has no published weights; train it or use pretrained_file=")
        import timm

        from ..weights import load_into

        src = timm.create_model(timm_name, pretrained=True)
        load_into(model, checkpoint_filter_fn(src.state_dict(), model), source=f"timm:{timm_name}")
    return model


# preprocessing: the timm backbone weights' pretrained_cfg (bicubic, crop 0.9); the paper's fine-grained
# recipe (resize 550, crop 448) is the data config's (resize_ratio), see configs/experiment/dcal_deit_tiny_cub.yaml
_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2205.02151",), size_divisor=16, min_size=16,
             crop_pct=0.9, first_conv="patch_embed.proj", classifier=("head", "glca_head"),
             checkpoint_filter=checkpoint_filter_fn)
_NOTE = "paper Table 1 (448 px; the backbone alone on CUB: {}); GLCA: +9% params, +2% FLOPs on DeiT-T"


def _fgvc(cub: float, cars: float, aircraft: float, baseline_cub: float, reid: tuple[Metric, ...] = ()) -> Reference:
    return Reference(metrics=(Metric("top1", cub, "cub200", 448), Metric("top1", cars, "stanford_cars", 448),
                              Metric("top1", aircraft, "fgvc_aircraft", 448), *reid), note=_NOTE.format(baseline_cub))


# paper Table 2, ViT-B: Re-ID mAP at 256 x 128 (VeRi-776: 256 x 256)
_REID_VIT_B = (Metric("map", 87.5, "market1501", 256), Metric("map", 80.1, "dukemtmc", 256),
               Metric("map", 64.0, "msmt17", 256), Metric("map", 80.2, "veri776", 256))


@register_model(input_size=(3, 224, 224), source="zoo (timm ViT); backbone timm:deit_tiny_patch16_224 (IN-1k)",
                weights=Weights(backbone="deit_tiny_patch16_224.fb_in1k"), reference=_fgvc(84.6, 89.4, 87.4, 82.1), **_SPEC)
def dcal_deit_tiny(pretrained: bool = False, **kwargs: Any) -> DCAL:
    return _create(pretrained, "deit_tiny_patch16_224", **{**dict(embed_dim=192, depth=12, num_heads=3), **kwargs})


@register_model(input_size=(3, 224, 224), source="zoo (timm ViT); backbone timm:deit_small_patch16_224 (IN-1k)",
                weights=Weights(backbone="deit_small_patch16_224.fb_in1k"), reference=_fgvc(87.6, 92.3, 90.0, 85.8), **_SPEC)
def dcal_deit_small(pretrained: bool = False, **kwargs: Any) -> DCAL:
    return _create(pretrained, "deit_small_patch16_224", **{**dict(embed_dim=384, depth=12, num_heads=6), **kwargs})


@register_model(input_size=(3, 224, 224), source="zoo (timm ViT); backbone timm:deit_base_patch16_224 (IN-1k)",
                weights=Weights(backbone="deit_base_patch16_224.fb_in1k"), reference=_fgvc(88.8, 93.8, 92.6, 88.0), **_SPEC)
def dcal_deit_base(pretrained: bool = False, **kwargs: Any) -> DCAL:
    return _create(pretrained, "deit_base_patch16_224", **{**dict(embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model(input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                source="zoo (timm ViT); backbone timm:vit_base_patch16_224.augreg_in21k (IN-21k)",
                weights=Weights(backbone="vit_base_patch16_224.augreg_in21k"),
                reference=_fgvc(91.4, 93.4, 91.5, 90.8, _REID_VIT_B), **_SPEC)
def dcal_vit_base(pretrained: bool = False, **kwargs: Any) -> DCAL:
    return _create(pretrained, "vit_base_patch16_224.augreg_in21k",
                   **{**dict(embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model(input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                source="zoo (timm hybrid ViT); backbone timm:vit_base_r50_s16_224.orig_in21k (R50 + ViT-B/16, IN-21k)",
                weights=Weights(backbone="vit_base_r50_s16_224.orig_in21k"), reference=_fgvc(92.0, 95.3, 93.3, 91.3),
                **{**_SPEC, "first_conv": "patch_embed.backbone.stem.conv"})
def dcal_vit_base_r50(pretrained: bool = False, **kwargs: Any) -> DCAL:
    """R50 + ViT-B/16 hybrid (timm's ``vit_base_r50_s16_224``): a ResNetV2-50 stem (3 + 4 + 9 units, stride 16)
    embeds 1 x 1 patches of its 1024-channel map; 12 DCAL blocks of 768-d on top."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import _resnetv2

    stem = _resnetv2((3, 4, 9), in_chans=kwargs.get("in_chans", 3))
    return _create(pretrained, "vit_base_r50_s16_224.orig_in21k",
                   **{**dict(embed_dim=768, depth=12, num_heads=12, patch_size=1,
                             embed_layer=partial(HybridEmbed, backbone=stem)), **kwargs})


@register_model(input_size=(3, 32, 32), size_divisor=4, min_size=4, task="classification", paper=PAPER,
                paper_ids=("arXiv:2205.02151",), first_conv="patch_embed.proj", classifier=("head", "glca_head"),
                checkpoint_filter=checkpoint_filter_fn, weights=Weights(note="CPU variant: train it"),
                source="zoo (timm ViT, 32 px, patch 4, 4 x 64-d, 4 heads, MLP ratio 2, sin-cos pos-embed start)")
def dcal_deit_nano(pretrained: bool = False, **kwargs: Any) -> DCAL:
    """CPU variant for the embedded digits: 64 patch tokens, R = 6 GLCA queries."""
    return _create(pretrained, None, **{**dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                               mlp_ratio=2.0, pos_embed_init="sincos"), **kwargs})
