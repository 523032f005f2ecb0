"""ACMIL: attention-challenging multiple-instance learning (and ABMIL, its one-branch case).

Paper: Zhang et al., "Attention-Challenging Multiple Instance Learning for Whole Slide Image
Classification", ECCV 2024 (arXiv 2311.07125); official code dazhangyu123/ACMIL
(``architecture/transformer.py`` ``ACMIL_GA``/``ABMIL``, losses inline in
``Step3_WSI_classification_ACMIL.py``). ABMIL: Ilse, Tomczak & Welling, ICML 2018.

The model, as the official code has it:
- ``DimReduction``: ``ReLU(Linear(D_feat, D_inner, bias=False))``;
- multiple-branch gated attention: ``V``/``U`` (``Linear(D_inner, 128)``) shared by the M branches,
  one ``Linear(128, M)`` giving each branch its logits;
- stochastic top-K instance masking (training only): per branch, ``int(K * mask_drop)`` of the top
  ``K = min(n_masked_patch, N)`` instances, drawn at random, are masked before the softmax;
- a classifier per branch on its attention-pooled feature, and the slide classifier on the feature
  pooled with the mean of the branch softmaxes (masked ones in training);
- losses (all weight 1): slide CE + branch CE (M > 1) + mean pairwise cosine similarity of the branch
  attention distributions, computed on the masked attention (``forward_train``).

Choices and deviations (documented):
- bags are batched with a padding mask (the official code takes one bag at a time): padded instances
  get the dtype's minimum logit before the top-K and the softmax, so they are never attended or picked,
  and ``K`` is taken per bag over its real instances; a batch equals its bags one at a time (eval);
- the masking constant is ``finfo(dtype).min`` rather than -1e9 (which overflows in fp16/bf16);
- ``abmil`` is the M=1 case with no masking: then the slide classifier is the only classifier, exactly
  ACMIL's ``ABMIL`` baseline (the branch classifier of ``ACMIL_GA`` with one branch never gets a gradient,
  so it is not built);
- image bags ``[B, N, C, H, W]`` go through Ilse et al.'s LeNet instance encoder (500-d, no reduction);
- ``inner_dim`` defaults to ``in_dim // 2`` (ACMIL's 512->256, 1024->512; set 128 for 384-d ViT-S features);
- K=10, p=0.6 are the paper's, sized for slides of thousands of tiles; on bags so small that STKIM hides more
  than a tenth of a training bag the net warns once, naming a K for that bag size (the official code is silent);
- the shared bag input (:class:`BagNet`: feature or image bags, padding mask, the instance encoder, the map
  layout) is used by every zoo MIL net (CLAM-SB, TransMIL, DSMIL, DTFD-MIL).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Capabilities, ZooModel
from ..errors import InputSizeError
from ..layers import GatedAttention, masked_softmax, tile_grid
from ..registry import register_model
from ..spec import Metric, Reference, TrainDefaults, Weights

PAPER = "Zhang et al., Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification, ECCV 2024"
PAPER_ABMIL = "Ilse et al., Attention-based Deep Multiple Instance Learning, ICML 2018"


class LeNetInstanceEncoder(nn.Module):
    """Ilse et al.'s MNIST-bags encoder: conv 20@5x5 - pool - conv 50@5x5 - pool - FC 500 + ReLU."""

    def __init__(self, in_chans: int = 1, out_dim: int = 500):
        super().__init__()
        self.in_chans = in_chans
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # identity at 28 px, as in the paper; other sizes still work
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BagNet(ZooModel, nn.Module):
    """The bag input every zoo MIL net shares: feature bags ``[B, N, in_dim]``, or (``in_dim=None``) image bags
    ``[B, N, C, H, W]`` through Ilse et al.'s LeNet encoder (learnt end to end, 500-d); ``mask [B, N]``
    (True = real instance) marks padding. Subclasses call :meth:`_init_bag_input` and :meth:`bag_features`."""

    def _init_bag_input(self, in_dim: int | None, in_chans: int) -> int:
        """Build the instance encoder for image bags (none for feature bags); returns the instance feature size."""
        self.in_dim = in_dim
        self.encoder = LeNetInstanceEncoder(in_chans) if in_dim is None else None
        return self.encoder.out_dim if self.encoder is not None else in_dim

    def expected_input(self) -> str:
        if self.encoder is None:
            return f"[B, N, {self.in_dim}] feature bags"
        return f"[B, N, {self.encoder.in_chans}, H, W] image bags"

    def _check_input(self, x: torch.Tensor) -> None:
        """A bag batch of the shape this net was built for, or an error naming that shape."""
        if torch.jit.is_tracing():  # export traces one checked example; sizes are symbolic there
            return
        if self.encoder is None:
            fits, one_bag = x.ndim == 3 and x.shape[-1] == self.in_dim, x.ndim == 2 and x.shape[-1] == self.in_dim
        else:
            c = self.encoder.in_chans
            fits, one_bag = x.ndim == 5 and x.shape[2] == c, x.ndim == 4 and x.shape[1] == c
        if not fits:
            fix = " (one bag: x.unsqueeze(0))" if one_bag else (
                "; feature bags need a net built with in_dim=D" if self.encoder is not None and x.ndim == 3 else "")
            raise InputSizeError(f"{type(self).__name__} was built for {self.expected_input()}; got {list(x.shape)}{fix}")

    def bag_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Instance features ``[B, N, D]``: the bag itself, or the encoder's features of an image bag
        (padded instances are not encoded; their rows are zero)."""
        self._check_input(x)
        if x.ndim == 3:
            return x
        B, N = x.shape[:2]
        flat = x.flatten(0, 1)
        if mask is None:
            return self.encoder(flat).view(B, N, -1)
        keep = mask.flatten()
        feats = self.encoder(flat[keep])  # padded instances cost nothing
        return feats.new_zeros(B * N, feats.shape[-1]).index_copy(0, keep.nonzero()[:, 0], feats).view(B, N, -1)

    @staticmethod
    def bag_maps(attn: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Per-instance scores ``[B, K, N]`` laid out as images ``[B, K, h, w]``: on the tile grid of ``coords
        [B, N, 2]`` (a heatmap over the slide), else a square grid in bag order (``zoo.explain.bag_mosaic``)."""
        rows, cols, (h, w) = tile_grid(coords) if coords is not None else square_grid(attn.shape[-1], attn.device)
        out = attn.new_zeros(*attn.shape[:2], h, w)
        out[..., rows, cols] = attn
        return out

    def _freeze(self, *reduction: nn.Module) -> None:
        """``freeze_backbone`` of a net with ``trainable_groups``: the instance encoder of image bags and the
        net's feature reduction; the attention and the classifiers keep training."""
        for m in (self.encoder, *reduction):
            if m is not None:
                m.requires_grad_(False)


def stochastic_topk_mask(logits: torch.Tensor, valid: torch.Tensor | None, k: int, drop: float) -> torch.Tensor:
    """STKIM: per bag and branch, mask ``int(K * drop)`` random instances among the top ``K`` real ones.

    ``logits [B, M, N]``, ``valid [B, N]`` (True = real instance). Returns a bool mask ``[B, M, N]``
    of the instances to hide (never a padded one). ``K = min(k, number of real instances)`` per bag.
    """
    B, M, N = logits.shape
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=logits.device)
    kk = min(k, N)
    if kk == 0 or drop <= 0:
        return torch.zeros_like(logits, dtype=torch.bool)
    top = logits.masked_fill(~valid[:, None], torch.finfo(logits.dtype).min).topk(kk, dim=-1).indices
    k_bag = valid.sum(-1).clamp(max=k)  # [B]
    in_topk = torch.arange(kk, device=logits.device) < k_bag[:, None, None]  # [B, 1->M, kk]
    rank = torch.rand(B, M, kk, device=logits.device).masked_fill(~in_topk, 2.0).argsort(-1).argsort(-1)
    n_drop = torch.floor(k_bag.double() * drop).long()  # int(K * p), as the official code floors
    chosen = (rank < n_drop[:, None, None]) & in_topk
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, chosen)


def diversity_loss(attn: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the branch attention distributions ``attn [B, M, N]``."""
    M = attn.shape[1]
    if M < 2:
        return attn.new_zeros(())
    a = F.normalize(attn, dim=-1)
    sim = a @ a.transpose(1, 2)  # [B, M, M]
    i, j = torch.triu_indices(M, M, offset=1, device=attn.device)
    return sim[:, i, j].mean()


class ACMIL(BagNet):
    """Multiple-branch gated-attention MIL with stochastic top-K instance masking.

    ``forward(x [B, N, D] or [B, N, C, H, W], mask [B, N]) -> slide logits [B, num_classes]``.
    ``forward_train`` takes class indices ``y [B]`` (no soft targets: the branch CE repeats them per branch).
    """

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, attention_weights=True,
                                    trainable_groups=True)

    def __init__(
        self,
        *,
        num_classes: int = 2,
        in_dim: int | None = None,
        in_chans: int = 1,
        inner_dim: int | None = None,
        attn_dim: int = 128,
        branches: int = 5,
        n_masked_patch: int = 10,
        mask_drop: float = 0.6,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not 0 <= mask_drop < 1:
            raise ValueError(f"mask_drop must be in [0, 1), got {mask_drop}")
        self.num_classes, self.branches = num_classes, branches
        self.n_masked_patch, self.mask_drop = n_masked_patch, mask_drop
        self._small_bags_told = False
        feat = self._init_bag_input(in_dim, in_chans)
        if in_dim is None:  # image bags: the instance encoder's 500-d features, no reduction
            self.dimreduction = nn.Identity()
            dim = feat
        else:
            dim = inner_dim or max(in_dim // 2, 1)
            self.dimreduction = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.ReLU())
        self.dim = dim
        self.attention = GatedAttention(dim, attn_dim, branches=branches)
        self.branch_classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes)) for _ in range(branches if branches > 1 else 0)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))  # the slide classifier

    # ------------------------------------------------------------------ pieces
    def instance_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dimreduction(self.bag_features(x, mask))

    def _tell_small_bags(self, mask: torch.Tensor | None, n: int) -> None:
        """Warn once when STKIM hides more than a tenth of a training bag: K and p are sized for slides of
        thousands of tiles, and on small bags they hide most of the evidence (often every positive)."""
        if self._small_bags_told or torch.jit.is_tracing():
            return
        smallest = int(mask.sum(-1).min()) if mask is not None else n
        hidden = int(min(self.n_masked_patch, smallest) * self.mask_drop)
        if smallest and hidden > smallest / 10:
            self._small_bags_told = True
            k = max(1, round(smallest / (10 * self.mask_drop)))  # hides about a tenth of the bag
            fix = (f"model.kwargs.n_masked_patch={k} (hides {int(k * self.mask_drop)} per branch)"
                   if int(k * self.mask_drop) else "model.kwargs.mask_drop=0 (no masking)")
            warnings.warn(
                f"ACMIL's stochastic top-K masking (n_masked_patch={self.n_masked_patch}, mask_drop={self.mask_drop}) "
                f"hides {hidden} of the {smallest} instances of a training bag in each branch: K is sized for slides "
                f"of thousands of tiles. For bags this small set {fix}.", stacklevel=3)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None):
        """-> (branch logits [B, M, C] or None, slide logits [B, C], attention [B, M, N] after masking)."""
        h = self.instance_features(x, mask)
        logits = self.attention(h)  # [B, M, N]
        valid = None if mask is None else mask[:, None, :]
        if self.training and self.n_masked_patch > 0 and self.mask_drop > 0:
            self._tell_small_bags(mask, h.shape[1])
            hide = stochastic_topk_mask(logits, mask, self.n_masked_patch, self.mask_drop)
            valid = ~hide if valid is None else valid & ~hide
        attn = masked_softmax(logits, valid)
        feats = attn @ h  # [B, M, D]
        branch = torch.stack([c(feats[:, m]) for m, c in enumerate(self.branch_classifiers)], 1) if self.branch_classifiers else None
        slide = self.classifier(attn.mean(1, keepdim=True) @ h)[:, 0]
        return branch, slide, attn

    # ------------------------------------------------------------------ contract
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(x, mask)[1]

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        branch, slide, attn = self._forward(x, mask)
        losses = {"slide_ce": F.cross_entropy(slide, y)}
        if branch is not None:
            losses["branch_ce"] = F.cross_entropy(branch.flatten(0, 1), y.repeat_interleave(self.branches))
            losses["diversity"] = diversity_loss(attn)
        return slide, losses

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-branch instance attention ``[B, M, N]`` (softmaxed, zero on padding; no masking in eval)."""
        return self._forward(x, mask)[2]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Branch and slide attention laid out as images: ``{"branch_attention": [B, M, h, w], "slide_attention": [B, 1, h, w]}``.

        With ``coords [B, N, 2]`` (tile x, y) the layout is the tile grid (a heatmap over the slide);
        without, instances fill a square grid in bag order (``zoo.explain.bag_mosaic`` draws the tiles).
        """
        attn = self.attention_weights(x, mask)
        out = self.bag_maps(torch.cat([attn, attn.mean(1, keepdim=True)], 1), coords)  # [B, M+1, h, w]
        return {"branch_attention": out[:, :-1], "slide_attention": out[:, -1:]}

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def freeze_backbone(self) -> None:
        """Freeze the instance encoder / dimension reduction; attention and classifiers keep training."""
        self._freeze(self.dimreduction)


def square_grid(n: int, device=None):
    side = math.ceil(math.sqrt(n))
    idx = torch.arange(n, device=device)
    return idx // side, idx % side, (side, side)


def checkpoint_filter(state_dict: dict, model: ACMIL) -> dict:
    """Official ACMIL_GA / ABMIL keys -> zoo keys."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("dimreduction.fc1.", "dimreduction.0.")
        if k.startswith("Slide_classifier.fc."):
            k = "classifier.1." + k[len("Slide_classifier.fc."):]
        elif k.startswith("classifier.fc."):  # ABMIL's single classifier is the slide classifier
            k = "classifier.1." + k[len("classifier.fc."):]
        elif k.startswith("classifier."):  # ACMIL_GA's per-branch classifiers
            i, rest = k[len("classifier."):].split(".fc.")
            k = f"branch_classifiers.{i}.1.{rest}"
        out[k] = v
    return out


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER, mean=(0.1307,), std=(0.3081,),
                source="dazhangyu123/ACMIL ACMIL_GA (5 branches, K=10, p=0.6)", checkpoint_filter=checkpoint_filter,
                paper_ids=("arXiv:2311.07125",), weights=Weights(note="train it; official checkpoints load (`pretrained_file=`)"),
                train_defaults=TrainDefaults(name="adamw", lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.999), scheduler="cosine",
                                             warmup_epochs=0, min_lr_ratio=0.0, label_smoothing=0.0, epochs=50,
                                             source="dazhangyu123/ACMIL config/camelyon_config.yml, --lr default"))
def acmil(pretrained: bool = False, **kwargs) -> ACMIL:
    return ACMIL(**kwargs)


@register_model(task="mil", input_size=(1, 28, 28), paper=PAPER_ABMIL, mean=(0.1307,), std=(0.3081,),
                source="dazhangyu123/ACMIL ABMIL baseline (ACMIL with one branch, no masking)",
                checkpoint_filter=checkpoint_filter, paper_ids=("arXiv:1802.04712",), weights=Weights(note="train it"),
                train_defaults=TrainDefaults(name="adam", lr=5e-4, weight_decay=1e-4, betas=(0.9, 0.999), scheduler="none",
                                             warmup_epochs=0, min_lr_ratio=0.0, label_smoothing=0.0, epochs=20,
                                             source="AMLab-Amsterdam/AttentionDeepMIL main.py"))
def abmil(pretrained: bool = False, **kwargs) -> ACMIL:
    kwargs = {"branches": 1, "n_masked_patch": 0, "mask_drop": 0.0, **kwargs}
    return ACMIL(**kwargs)
