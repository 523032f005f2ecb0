"""Prompt-CAM: class-specific prompts on a frozen ViT; the class prompts' attention over the patches are trait maps.

Paper: Chowdhury et al., "Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained Analysis",
CVPR 2025 (arXiv 2501.09333). Origin: the official code Imageomics/Prompt_CAM (commit 7722fc2, MIT):
``model/vpt.py`` (prompts), ``model/vision_transformer.py`` (``VisionTransformerPETL.forward_features`` /
``forward_head`` with ``train_type='prompt_cam'``), ``model/attention.py`` (head blurring),
``experiment/build_model.py`` (``TUNE_MODULES=['vpt', 'head']``), ``experiment/visualize_run.py``
(``prune_attn_heads``) and ``utils/visual_utils.py`` (overlays). Built on any timm ``VisionTransformer``
(``self.backbone``, its own classifier removed), so timm / DINO / DINOv2 weights load unchanged.

The model, as in the code:
- The backbone is frozen (``requires_grad=False``); only ``prompts`` ``[L, C, D]`` and the shared
  ``head = Linear(D, 1)`` train. ``C = num_classes``: prompt row ``c`` is class ``c`` (label order = row order).
- Prompt init: uniform in ``+-sqrt(6 / (3 p^2 + D))`` (p the patch size); ``vpt_dropout`` on every use.
- Deep (default, the code's ``train_type=prompt_cam``): before block ``l`` the ``C`` prompts ``P_l`` are
  prepended, ``[P_l; cls; patches]``; after the block their outputs are dropped, except after the last
  block, whose ``C`` prompt outputs go through the backbone's final norm and the shared head:
  ``logits[:, c] = w^T norm(z_c) + b``. Only the last layer's prompts are class-specific.
- No attention mask: patches and the class token attend to the prompts too (the code's choice).
- ``attention_maps(x)``: per-head attention of the class prompt (the prediction, or ``target=``) over the
  patches in the last block, ``attn[:, :, c, C + prefix:]`` -> ``[B, H, h, w]``.
- Head blurring (trait ranking) as in the code: the PRE-softmax logits of the target prompt's row are set
  to 0 for the blurred heads, i.e. uniform attention over all N tokens (the paper's text says 1/M over the
  patches; the code is followed). ``rank_heads`` is ``prune_attn_heads``: each round blur the remaining
  head whose blurring leaves the target probability highest, until ``top_traits`` remain; the survivors
  are returned in ascending order of their last-round score (most important first). O(H^2) passes of the
  last block only: the tokens entering it do not depend on the blurring, so they are computed once.
  Same survivors as the code; their ORDER differs where the code's ``zip(remaining_head_scores,
  remaining_head_list)`` pairs heads with the wrong scores (the score list still holds the head pruned in
  that round): here each survivor is sorted by its own score. Side-by-side numbers: ``results/prompt_cam.md``.

timm's model surface, as this model defines it (``C`` class prompts, ``D`` width):
- ``forward_features(x)``: every token after the last block and the final norm, prompts first,
  ``[B, C + prefix + M, D]``; ``forward_head`` scores the first ``C`` rows with the shared head -> ``[B, C]``.
- ``forward_head(x, pre_logits=True)`` and a model without classifier (``num_classes=0``,
  ``reset_classifier(0)``, or a pruned head) return the BACKBONE's pooled feature ``[B, D]``
  (``num_features == head_hidden_size == D``): its own ``global_pool`` (the class token for the
  registered ViTs) over the non-prompt tokens, as timm's ``VisionTransformer.forward_head`` pools them.
  Prompt-CAM's scores do not read a pooled vector, they read the ``C`` prompt outputs ``x[:, :C]``
  (``[B, C, D]``), which is not timm's ``[B, head_hidden_size]``; the pooled feature is the one answer that
  means the same for every ``C`` including 0, where the model is the plain frozen backbone.
- ``reset_classifier(n, global_pool=None)`` rebuilds the prompts for ``n`` classes (``[L, n, D]``, fresh
  init, every layer: the prompt row is the class) and a fresh shared head; ``n=0`` leaves no prompts and no
  head. ``global_pool`` is the backbone's (``''``: ``forward`` of a head-less model returns all tokens).
- ``set_grad_checkpointing()``: each backbone block (with the prompts prepended to its input) runs under
  ``torch.utils.checkpoint`` (non-reentrant), in ``forward`` / ``forward_features`` /
  ``forward_intermediates``; the attention-returning path of the last block (trait maps, head ranking)
  is not checkpointed.
- ``forward_intermediates``: the output of each backbone block, prompt and prefix tokens dropped, as an
  ``NCHW`` patch grid (``NLC``: the patch tokens); ``norm=True`` applies the final norm.
  ``feature_info`` names ``backbone.blocks.<i>``. ``prune_intermediate_layers`` truncates the blocks
  and the deep prompts with them; ``prune_head`` drops the shared head but keeps the class prompts, since
  every patch token attends to them and the intermediates depend on them.
- ``group_matcher``: backbone stem, one group per block, then final norm + prompts + head;
  ``no_weight_decay()`` is empty (the code decays prompts and head alike).

Documented choices and deviations:
- VPT-Shallow (``vpt_mode='shallow'``): one set of ``C`` prompts prepended before block 0 and carried
  through all blocks (the paper's definition; the code's 'shallow' path drops the prompts after block 0 and
  then fails for ``train_type=prompt_cam``, so there is nothing to match).
- Dropout / drop path of the frozen backbone follow the module's train/eval mode as in the code (the DINO
  recipes train with ``drop_path_rate=0.1`` in the frozen backbone); only its parameters are frozen.
- Checkpoint selection: the official trainer keeps the best checkpoint on the TEST split (``EarlyStop`` on
  test top-1 every 10 epochs); the zoo selects on validation and also reports the last epoch.
- Normalisation: Inception mean / std (0.5) for every variant, as the code does for DINO and DINOv2 too.
- Sequence length grows with the classes: ``1 + C + M`` tokens in every block (Birds-525 on ViT-B/16:
  722); ``bench_extras`` reports it with the analytic attention memory and multiply-adds.
- Weights: ``pretrained=True`` (timm hub), ``pretrained_file=`` (timm / DINO / DINOv2 backbone file, an
  official Prompt-CAM checkpoint: ``vpt.prompt_embeddings`` -> ``prompts``, or a zoo file; see
  :func:`checkpoint_filter_fn`), ``backbone_ckpt=`` (a ViT checkpoint trained by the zoo, e.g. ``vit_nano``).
- Side by side with the official ``VisionTransformerPETL``: random weights saved as its
  ``{'model_state_dict': ...}`` and loaded here through ``pretrained_file=`` / :func:`checkpoint_filter_fn`
  give the same logits, trait maps and blurred logits (numbers: ``results/prompt_cam.md``); trainable
  parameters for 200 classes on ViT-B: 12 x 200 x 768 prompts + 769 head in both.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter
from torch import nn

from ..layers.pos_embed import check_patch_grid
from ..contract import Capabilities, ZooModel
from ..registry import register_model
from ..spec import Metric, Reference, Weights
from .vit import INCEPTION_MEAN, INCEPTION_STD, NANO_ARCH, vit_nano_backbone

PAPER = "Chowdhury et al., Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained Analysis, CVPR 2025"
MODES = ("deep", "shallow")


class PromptCAM(ZooModel, nn.Module):
    """Frozen timm ViT + class-specific prompts + shared ``Linear(D, 1)`` head (see module docstring)."""

    zoo_capabilities = Capabilities(attention_maps=True, rank_heads=True, trainable_groups=True, bench_extras=True)

    def __init__(self, *, backbone: VisionTransformer, num_classes: int = 200, vpt_mode: str = "deep",
                 vpt_dropout: float = 0.0, backbone_ckpt: str | None = None, top_traits: int = 4):
        super().__init__()
        if vpt_mode not in MODES:
            raise ValueError(f"vpt_mode must be one of {MODES}, got {vpt_mode!r}")
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"backbone must be a timm VisionTransformer, got {type(backbone).__name__}")
        if backbone.attn_pool is not None or backbone.global_pool == "map":
            raise ValueError("attention-pool ViTs are not supported (Prompt-CAM reads prompt outputs, not a pool)")
        backbone.reset_classifier(0)  # the backbone's own head is unused: prompt outputs are scored by self.head
        self.backbone = backbone
        self.vpt_mode = vpt_mode
        self.embed_dim = self.num_features = self.head_hidden_size = backbone.embed_dim
        self.num_heads = backbone.blocks[-1].attn.num_heads
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.top_traits = top_traits
        self.vpt_dropout = vpt_dropout
        self.grad_checkpointing = False
        self.feature_info = [{**f, "module": f"backbone.{f['module']}"} for f in backbone.feature_info]
        self._build_prompts(num_classes)
        self.backbone_ckpt = backbone_ckpt
        # read now if the file is there, else on the first forward (configs name the file before the recipe's
        # first step has written it); a full state dict loaded in between (evaluate, resume) supersedes it
        self._backbone_pending = backbone_ckpt
        if backbone_ckpt and Path(backbone_ckpt).is_file():
            self.load_backbone()
        self.freeze_backbone()

    # ------------------------------------------------------------------ backbone weights
    def load_backbone(self, path: str | None = None) -> None:
        """Read the backbone weights from ``path`` (default ``backbone_ckpt``); see :func:`load_backbone`."""
        path = path or self._backbone_pending
        if path:
            load_backbone(self, path)
        self._backbone_pending = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if any(k.startswith(prefix + "backbone.") for k in state_dict):
            self._backbone_pending = None  # the loaded weights include the backbone: do not overwrite them
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ training surface
    def freeze_backbone(self) -> None:
        """Only prompts and head train (the code's ``TUNE_MODULES=['vpt', 'head']``)."""
        self.backbone.requires_grad_(False)
        self.prompts.requires_grad_(True)
        self.head.requires_grad_(True)

    def _build_prompts(self, num_classes: int) -> None:
        """Fresh ``prompts [L, num_classes, D]`` (L = blocks for deep, 1 for shallow) and shared head."""
        ref = self.backbone.pos_embed if self.backbone.pos_embed is not None else self.backbone.patch_embed.proj.weight
        D, p = self.embed_dim, self.backbone.patch_embed.patch_size
        layers = len(self.backbone.blocks) if self.vpt_mode == "deep" else 1
        val = math.sqrt(6.0 / float(3 * p[0] * p[1] + D))  # the code's "xavier" bound
        self.num_classes = num_classes
        prompts = torch.empty(layers, num_classes, D, device=ref.device, dtype=ref.dtype).uniform_(-val, val)
        self.prompts = nn.Parameter(prompts)
        # shared over classes; default nn.Linear init as the code's reset_classifier
        self.head = nn.Linear(D, 1, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh prompts and head for ``num_classes`` (0: none, ``forward`` gives the pooled backbone feature);
        ``global_pool`` sets the backbone's pooling (``''``: none)."""
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
        self._build_prompts(num_classes)

    def no_weight_decay(self) -> set[str]:
        return set()  # the code decays prompts and head alike (SGD weight_decay on all tuned parameters)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^backbone\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                    blocks=[(r"^backbone\.blocks\.(\d+)", None),
                            (r"^backbone\.(?:norm|fc_norm|head)|^prompts|^head", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)  # its patch embedding's, where it has one

    # ------------------------------------------------------------------ forward
    def _prompt(self, layer: int, batch: int) -> torch.Tensor:
        # functional dropout: a no-grad view of the parameter passed to a module trips torch's module tracker
        return F.dropout(self.prompts[layer], self.vpt_dropout, self.training).expand(batch, -1, -1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._backbone_pending:
            self.load_backbone()
        vit = self.backbone
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def _block_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s input: deep prepends layer ``i``'s prompts before every block, shallow once before 0."""
        if self.vpt_mode == "deep" or i == 0:
            x = torch.cat([self._prompt(i if self.vpt_mode == "deep" else 0, x.shape[0]), x], dim=1)
        return x

    def _run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.backbone.blocks[i]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _carry(self, x: torch.Tensor) -> torch.Tensor:
        """A non-last block's output -> the next block's tokens (deep: this layer's prompt outputs dropped)."""
        return x[:, self.num_classes:] if self.vpt_mode == "deep" else x

    def tokens_before_last(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering the last block, prompts first: ``[B, C + prefix + M, D]``."""
        x = self._embed(x)
        last = len(self.backbone.blocks) - 1
        for i in range(last):
            x = self._carry(self._run_block(i, self._block_input(i, x)))
        return self._block_input(last, x)

    def last_block(self, x: torch.Tensor, blur: torch.Tensor | None = None, target: torch.Tensor | None = None,
                   need_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last block with optional head blurring; returns (tokens, attention probabilities or None).

        ``blur: bool [B, H]`` heads whose target-prompt row is blurred; ``target: long [B]`` prompt rows.
        """
        blk = self.backbone.blocks[-1]
        if blur is None and not need_attn:
            return self._run_block(len(self.backbone.blocks) - 1, x), None
        a = blk.attn
        h = blk.norm1(x)
        B, N, _ = h.shape
        gate = a.gate(h).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q * a.scale) @ k.transpose(-2, -1)
        if blur is not None:  # the code: attn[:, heads, target, :] = 0 before the softmax
            rows = F.one_hot(target, N).bool()  # [B, N]
            mask = blur[:, :, None, None] & rows[:, None, :, None]
            logits = logits.masked_fill(mask, 0.0)
        attn = logits.softmax(-1)
        o = (a.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, -1)
        o = a.norm(o)
        if gate is not None:
            o = o * gate
        o = a.proj_drop(a.proj(o))
        x = x + blk.drop_path1(blk.ls1(o))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, attn

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, prompts first: ``[B, C + prefix + M, D]``."""
        return self.backbone.norm(self.last_block(self.tokens_before_last(x))[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, C]`` scores of the class prompts' outputs; ``pre_logits`` (or no classifier): the backbone's
        pooled feature over the other tokens, ``[B, D]`` (see the module docstring)."""
        C = self.num_classes
        if pre_logits or isinstance(self.head, nn.Identity):
            return self.backbone.forward_head(x[:, C:], pre_logits=True)
        return self.head(x[:, :C]).squeeze(-1)  # the class prompts' outputs (the class token is ignored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` over the backbone blocks: each taken block's patch tokens (prompt and
        prefix tokens dropped), ``NCHW`` grid or ``NLC``; the final features are ``forward_features(x)``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        vit = self.backbone
        take, max_index = feature_take_indices(len(vit.blocks), indices)
        B, _, height, width = x.shape
        start = self.num_classes + vit.num_prefix_tokens
        t = self._embed(x)
        out = []
        stop = max_index + 1 if stop_early else len(vit.blocks)
        for i in range(stop):
            y = self._run_block(i, self._block_input(i, t))
            if i in take:
                out.append(vit.norm(y[:, start:]) if norm else y[:, start:])
            t = self._carry(y)
        if output_fmt == "NCHW":
            h, w = vit.patch_embed.dynamic_feat_size((height, width))
            out = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if intermediates_only:
            return out
        return vit.norm(y), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks (and deep prompts) after the last of ``indices``; returns the kept indices. The head
        goes with ``prune_head``; the class prompts stay (the intermediates depend on them)."""
        take, max_index = feature_take_indices(len(self.backbone.blocks), indices)
        self.backbone.blocks = self.backbone.blocks[:max_index + 1]
        if self.vpt_mode == "deep":
            self.prompts = nn.Parameter(self.prompts.detach()[:max_index + 1].clone(),
                                        requires_grad=self.prompts.requires_grad)
        if prune_norm:
            self.backbone.norm = nn.Identity()
        if prune_head:
            self.backbone.reset_classifier(0, "")
            self.backbone.fc_norm = nn.Identity()
            self.head = nn.Identity()
        return take

    # ------------------------------------------------------------------ trait maps
    def _grid(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)

    def _need_class_prompts(self) -> None:
        if self.num_classes == 0 or isinstance(self.head, nn.Identity):
            raise ValueError("trait maps and head ranking need the class prompts and the head; this model has "
                             "none (num_classes=0 or a pruned head): reset_classifier(num_classes) first")

    def prompt_attention(self, x: torch.Tensor, target: torch.Tensor | None = None,
                         blur: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [B, C], attention of the target prompt over the patches [B, H, h, w], target [B])``;
        ``target`` defaults to the prediction (of the unblurred model)."""
        self._need_class_prompts()
        tok = self.tokens_before_last(x)
        if target is None:
            target = self.forward_head(self.backbone.norm(self.last_block(tok)[0])).argmax(-1)
        out, attn = self.last_block(tok, blur, target, need_attn=True)
        logits = self.forward_head(self.backbone.norm(out))
        start = self.num_classes + self.backbone.num_prefix_tokens
        rows = attn[torch.arange(len(target), device=attn.device), :, target, start:]  # [B, H, M]
        return logits, rows.reshape(len(target), self.num_heads, *self._grid()), target

    @torch.no_grad()
    def rank_heads(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   top_traits: int | None = None) -> torch.Tensor:
        """Greedy head blurring (the code's ``prune_attn_heads``): ``long [B, top_traits]``, most important
        first. ``target`` defaults to the prediction."""
        self._need_class_prompts()
        k = self.top_traits if top_traits is None else int(top_traits)
        H = self.num_heads
        if not 1 <= k <= H:
            raise ValueError(f"top_traits must be in 1..{H} (the heads of the last block), got {k}")
        tok = self.tokens_before_last(x)
        B = tok.shape[0]
        if target is None:
            target = self.forward_head(self.backbone.norm(self.last_block(tok)[0])).argmax(-1)
        blurred = torch.zeros(B, H, dtype=torch.bool, device=tok.device)
        ar = torch.arange(B, device=tok.device)
        scores = torch.zeros(B, H, device=tok.device)
        while H - int(blurred[0].sum()) > k:
            scores.fill_(-float("inf"))
            for h in range(H):  # try blurring head h on top of those already blurred (skip blurred ones)
                if bool(blurred[:, h].all()):
                    continue
                trial = blurred.clone()
                trial[:, h] = True
                logits = self.forward_head(self.backbone.norm(self.last_block(tok, trial, target)[0]))
                p = logits.softmax(-1)[ar, target]
                scores[:, h] = torch.where(blurred[:, h], torch.full_like(p, -float("inf")), p)
            blurred[ar, scores.argmax(-1)] = True  # the least important head (highest score when blurred)
        last = scores.masked_fill(blurred, float("inf"))  # survivors' last-round scores
        if k == H:  # nothing was blurred: rank all heads by a single round of scores
            for h in range(H):
                trial = torch.zeros_like(blurred)
                trial[:, h] = True
                p = self.forward_head(self.backbone.norm(self.last_block(tok, trial, target)[0])).softmax(-1)
                last[:, h] = p[ar, target]
        return last.argsort(-1)[:, :k]  # ascending score: blurring it hurts most -> most important

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, target: torch.Tensor | None = None,
                       top_traits: int | None = None) -> dict[str, torch.Tensor]:
        """Trait maps of the predicted (or ``target``) class prompt in the last block, ``[B, H, h, w]``
        (``prompt_attn``); with ``top_traits`` only the greedy-ranked heads, most important first
        (``traits``; the maps of the model with the other heads blurred, as the code draws them)."""
        if not top_traits:
            _, maps, _ = self.prompt_attention(x, target)
            return {"prompt_attn": maps}
        tok_target = target if target is not None else self(x).argmax(-1)
        order = self.rank_heads(x, tok_target, top_traits)
        blur = torch.ones(x.shape[0], self.num_heads, dtype=torch.bool, device=x.device)
        blur.scatter_(1, order, False)
        _, maps, _ = self.prompt_attention(x, tok_target, blur)
        return {"traits": maps.gather(1, order[..., None, None].expand(-1, -1, *maps.shape[-2:]))}

    # paper's drawing: cubic resize, min-max per head, 9x9 Gaussian blur, JET at alpha 0.5
    overlay_style = dict(interpolation="bicubic", blur=9)

    # ------------------------------------------------------------------ bench
    def bench_extras(self, img_size: int | None = None) -> dict[str, Any]:
        """Tokens per block with and without the ``C`` prompts, and the fp32 attention matrix of one image in
        one block (``H N^2`` floats), which grows with the square of the sequence."""
        gh, gw = self._grid() if img_size is None else (img_size // self.patch_size,) * 2
        plain = self.backbone.num_prefix_tokens + gh * gw
        n = plain + self.num_classes
        return {"seq_len": n, "seq_len_plain": plain, "attn_mb": round(self.num_heads * n * n * 4 / 2**20, 2),
                "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad)}


# ---------------------------------------------------------------------------------------- weights
def _backbone_sd(sd: dict, vit: VisionTransformer) -> dict:
    """timm / DINO / DINOv2 / zoo ViT weights -> ``vit`` (its classifier dropped, pos_embed resampled)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist.", "fc_norm.")) or
          (k.startswith("fc_norm.") and not isinstance(vit.fc_norm, nn.Identity))}
    return timm_filter(sd, vit)


def checkpoint_filter_fn(state_dict: dict, model: PromptCAM) -> dict:
    """Weights files -> this model.

    - official Prompt-CAM checkpoints (``model_state_dict`` of ``VisionTransformerPETL``): ``vpt.prompt_embeddings``
      -> ``prompts``, ``head.*`` -> ``head.*`` (the shared ``Linear(D, 1)``), every other key -> ``backbone.*``;
    - a zoo PromptCAM state dict (``backbone.*`` keys) passes through;
    - a plain timm / DINO / DINOv2 backbone file: the backbone keys; prompts and head keep their fresh init.
    """
    sd = state_dict.get("model_state_dict", state_dict)
    if any(k.startswith("backbone.") for k in sd):
        return dict(sd)
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    rest = {}
    for k, v in sd.items():
        if k == "vpt.prompt_embeddings":
            out["prompts"] = v
        elif k in ("head.weight", "head.bias") and v.shape == own[k].shape:
            out[k] = v
        else:
            rest[k] = v
    out.update({f"backbone.{k}": v for k, v in _backbone_sd(rest, model.backbone).items()})
    for k in ("prompts", "head.weight", "head.bias"):
        out.setdefault(k, own[k])
    return out


def load_backbone(model: PromptCAM, path: str) -> None:
    """Backbone weights from a ViT checkpoint trained by the zoo (Lightning ``.ckpt``, ``net.``-prefixed keys,
    read with ``weights_only=True``) or any timm ViT weights file; its classifier is dropped."""
    from ..weights import extract_state_dict, load_into, safe_load

    sd = extract_state_dict(safe_load(path))
    load_into(model.backbone, _backbone_sd(sd, model.backbone), source=str(path))


# ---------------------------------------------------------------------------------------- variants
_PROMPT_KW = ("num_classes", "vpt_mode", "vpt_dropout", "backbone_ckpt", "top_traits")


def _create(pretrained: bool, timm_name: str | None, vit_kwargs: dict, **kwargs: Any) -> PromptCAM:
    own = {k: kwargs.pop(k) for k in _PROMPT_KW if k in kwargs}
    vit_kwargs = {**vit_kwargs, **kwargs}  # the rest go to the backbone (drop_path_rate, in_chans, img_size ...)
    if timm_name is None:  # (pretrained=True is refused by create_model: the spec names no weights)
        backbone = vit_nano_backbone(**vit_kwargs)
    else:
        import timm

        backbone = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **vit_kwargs)
        check_patch_grid(backbone.patch_embed.img_size, backbone.patch_embed.patch_size)  # timm's own module
    return PromptCAM(backbone=backbone, **own)


# the official transforms: Inception mean/std for every backbone, test images resized to 224x224 (no crop)
_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2501.09333",), license="mit", fixed_input_size=True,
             mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bilinear", crop_pct=1.0, first_conv="backbone.patch_embed.proj",
             checkpoint_filter=checkpoint_filter_fn)
_SRC = "zoo (timm ViT) + Imageomics/Prompt_CAM"


@register_model(source=f"{_SRC}; backbone timm:vit_base_patch16_224.dino",
                weights=Weights(backbone="vit_base_patch16_224.dino", official_file="model.pt"),
                reference=Reference(params_m=87.643, metrics=(Metric("top1", 73.2, "cub200", 224), Metric("top1", 91.3, "oxford_pets", 224),
                                    Metric("top1", 81.1, "stanford_dogs", 224), Metric("top1", 98.8, "birds525", 224)),
                                    note="1.844M trainable for 200 classes"), **_SPEC)
def promptcam_vit_base_dino(pretrained: bool = False, **kwargs: Any) -> PromptCAM:
    """DINO ViT-B/16 (the paper's main backbone); ``num_classes`` defaults to 200 (CUB)."""
    return _create(pretrained, "vit_base_patch16_224.dino", {}, **kwargs)


@register_model(source=f"{_SRC}; backbone timm:vit_base_patch14_dinov2.lvd142m at 224 px (16x16 grid)",
                weights=Weights(backbone="vit_base_patch14_dinov2.lvd142m", official_file="model.pt"),
                reference=Reference(params_m=87.569, metrics=(Metric("top1", 74.1, "cub200", 224), Metric("top1", 92.7, "oxford_pets", 224),
                                    Metric("top1", 81.3, "stanford_dogs", 224)), note="1.844M trainable for 200 classes"),
                **_SPEC)
def promptcam_vit_base_dinov2(pretrained: bool = False, **kwargs: Any) -> PromptCAM:
    """DINOv2 ViT-B/14 at 224 px as the code (``init_values=1e-5``; pos_embed resampled from 518 by timm)."""
    return _create(pretrained, "vit_base_patch14_dinov2.lvd142m", {"img_size": 224}, **kwargs)


@register_model(source=f"{_SRC}; backbone timm:vit_small_patch16_224.dino", weights=Weights(backbone="vit_small_patch16_224.dino"),
                **_SPEC)
def promptcam_vit_small(pretrained: bool = False, **kwargs: Any) -> PromptCAM:
    """DINO ViT-S/16 (the paper also reports a ViT-S; the code has no ViT-S path)."""
    return _create(pretrained, "vit_small_patch16_224.dino", {}, **kwargs)


@register_model(input_size=(3, 32, 32), source=f"{_SRC}; backbone zoo vit_nano (train it first, then backbone_ckpt=)",
                weights=Weights(note="CPU variant: its backbone comes from backbone_ckpt="), **_SPEC)
def promptcam_vit_nano(pretrained: bool = False, **kwargs: Any) -> PromptCAM:
    """CPU variant on the zoo's ``vit_nano`` (32 px, 4x4 patches, 6 x 96-d, 6 heads); ``num_classes`` 10 by
    default (digits). Give it a trained backbone with ``backbone_ckpt=`` (``experiment=vit_nano_digits``)."""
    kwargs.setdefault("num_classes", 10)
    return _create(pretrained, None, dict(NANO_ARCH), **kwargs)
