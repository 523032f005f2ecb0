"""ULSAM: ultra-lightweight subspace attention, as a plug-in for any CNN and in timm's MobileNet-V1/V2.

Paper: Saini, Jha, Das, Mittal & Mohan, "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact
Convolutional Neural Networks", WACV 2020 (arXiv 2006.15102). Module origin: Nandan91/ULSAM ``ulsam.py``
(commit 9a07d68, after the fixes #7 "chunk along channels" and #9 "max-pool the depthwise output").
The official repo has no backbone code; the backbones here are timm's ``mobilenetv1_100`` and
``mobilenetv2_100`` (``EfficientNet`` builders), with ULSAM put in by :func:`insert_ulsam`.

The module, exactly as the official code: the ``m`` input channels are split into ``g = num_splits``
subspaces with ``torch.chunk(dim=1)``; each subspace of ``G = m/g`` channels computes
depthwise 1x1 conv (bias) -> BN -> ReLU -> 3x3 max pool (stride 1) -> 1x1 conv G->1 (bias) -> BN -> ReLU
-> softmax over the H*W positions = ``A [B, 1, H, W]``, and returns ``x * A + x``. The state-dict keys
(``subspaces.{i}.conv_dws/bn_dws/conv_point/bn_point``) are the official ones, so an official module's
weights load unchanged. Cost: ~5m + 3g parameters, 2*m*H*W MACs (the slides' "2m params, 2mhw FLOPs").

Documented choices and deviations:
- **BatchNorm momentum.** The official code has ``BatchNorm2d(momentum=0.9)``, which in PyTorch keeps only
  10% of the running statistics per step (running = 0.1*old + 0.9*batch): almost certainly a Keras-ism for
  Keras' momentum 0.9 (= PyTorch 0.1). The zoo defaults to ``bn_momentum=0.1`` (PyTorch's default, the
  Keras-equivalent and the same as timm's MobileNet BNs); ``bn_momentum=0.9`` reproduces the official code
  bit for bit (training-mode outputs do not depend on it, eval-mode outputs after training do).
- The official ``torch.set_default_tensor_type(torch.cuda.FloatTensor)`` at import is not reproduced;
  the unused ``nout, h, w`` arguments are dropped; ``m % g == 0`` is asserted with a clear message.
- The softmax makes ``A ~ 1/(HW)``, so the module starts close to identity; this is how it works, not fixed.

Placements (the paper's position column is not in the public material; these follow the param/MAC arithmetic
of the authors' WACV slides: e.g. MV1 "3.9M / 517M" is 4.2M / 569M minus exactly one 14x14x512 layer (0.26M,
52M MACs) plus ULSAM; which one of several equal-shaped layers is used is **our choice**, and counts do not
depend on it; pass ``positions=`` to change it):
- MobileNet-V1 "replace": ULSAM replaces the last of the five repeated 14x14x512 depthwise-separable layers
  (``blocks.3.5``); "add": ULSAM is added after that layer (paper: 4.2M / 569.2M).
  Widths 0.75 / 0.5 (paper: g=1) replace the same layer (384 / 256 channels). timm has no 0.75/0.5 MV1;
  they are built with timm's ``_gen_mobilenet_v1(channel_multiplier=...)`` and have no pretrained weights.
- MobileNet-V2 "replace": ULSAM replaces stride-1 residual inverted-bottleneck blocks, the last ones of
  their stage: 96-ch @14^2 ``blocks.4.2`` (and ``blocks.4.1``), 160-ch @7^2 ``blocks.5.2`` (``blocks.5.1``),
  64-ch @14^2 ``blocks.3.3``. "add" (paper: g=4, 71.64%, no counts given): after ``blocks.4.2`` and
  ``blocks.5.2``, our assumption.
- ``ulsam_mobilenetv2_tiny`` (zoo's own, for 32 px digits on CPU): a shallow MobileNet-V2 (x0.35 by default,
  ``width=`` to change) from timm's ``EfficientNet`` pieces, ULSAM (g=4) replacing ``blocks.4.2`` (96-ch
  stage at 8x8) and ``blocks.5.2`` (160-ch stage at 4x4), as in the paper's headline MV2 configuration.

Counts against the paper: the paper's baselines are rounded (MV2 3.4M where timm's ``mobilenetv2_100`` has
3.505M), so the zoo matches the paper's parameter *reduction* relative to its baseline, applied to timm's
(target = timm baseline - (paper baseline - paper variant)), and its MACs within 1%; the MV1 x0.75 / x0.5
rows, given to 0.1M and truncated, are checked by truncation. ``tests/test_ulsam.py`` checks every variant;
the numbers are in ``results/ulsam.md``.

The timm surface (``forward_intermediates``, ``feature_info``, ``set_grad_checkpointing``, ...) is
:class:`ULSAMMobileNet`'s, i.e. timm's ``EfficientNet``'s: ULSAM modules sit inside the stages.
"""
from __future__ import annotations

from typing import Callable, Sequence

import timm
import torch
from timm.models.efficientnet import EfficientNet, _gen_mobilenet_v1, decode_arch_def, round_channels
from torch import nn

from ..contract import Capabilities, ZooModel
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = ("Saini et al., ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural "
         "Networks, WACV 2020")


# ---------------------------------------------------------------------------------------- module
class SubSpace(nn.Module):
    """One subspace: ``x * A + x`` with ``A = softmax_HW(ReLU(BN(pw(maxpool(ReLU(BN(dw(x))))))))``."""

    def __init__(self, dim: int, *, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv_dws = nn.Conv2d(dim, dim, kernel_size=1, groups=dim)
        self.bn_dws = nn.BatchNorm2d(dim, momentum=bn_momentum)
        self.relu_dws = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(dim, 1, kernel_size=1)
        self.bn_point = nn.BatchNorm2d(1, momentum=bn_momentum)
        self.relu_point = nn.ReLU()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The subspace's attention map ``[B, 1, H, W]``, summing to one over the H*W positions."""
        a = self.maxpool(self.relu_dws(self.bn_dws(self.conv_dws(x))))  # pool the depthwise output (fix #9)
        a = self.relu_point(self.bn_point(self.conv_point(a)))
        return a.flatten(2).softmax(-1).view_as(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x) + x


class ULSAM(nn.Module):
    """Ultra-lightweight subspace attention over ``dim`` channels in ``num_splits`` subspaces; shape-preserving."""

    def __init__(self, dim: int, *, num_splits: int = 4, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if num_splits < 1 or dim % num_splits:
            raise ValueError(
                f"ULSAM needs channels divisible by num_splits; got {dim} channels, num_splits={num_splits}")
        self.dim, self.num_splits = dim, num_splits
        self.subspaces = nn.ModuleList(SubSpace(dim // num_splits, bn_momentum=bn_momentum) for _ in range(num_splits))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Each subspace's map, ``[B, g, H, W]``: channel i is subspace i's softmax over positions."""
        return torch.cat([s.attention(c) for s, c in zip(self.subspaces, x.chunk(self.num_splits, dim=1))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # chunk along channels (the official fix #7), one attention map per subspace
        return torch.cat([s(c) for s, c in zip(self.subspaces, x.chunk(self.num_splits, dim=1))], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_splits={self.num_splits}"


class AddULSAM(nn.Module):
    """``ulsam(block(x))``: the "added" configuration, keeping the block (its keys gain a ``block.`` prefix)."""

    def __init__(self, block: nn.Module, ulsam: ULSAM) -> None:
        super().__init__()
        self.block, self.ulsam = block, ulsam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ulsam(self.block(x))


# ---------------------------------------------------------------------------------------- plug-in
def _probe_shapes(model: nn.Module, positions: Sequence[str], probe_size: int, in_chans: int) -> dict:
    """Input and output shapes of the modules at ``positions`` on one ``probe_size`` image (eval, no grad)."""
    shapes: dict[str, tuple] = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: shapes.__setitem__(p, (tuple(i[0].shape), tuple(o.shape)))) for p in positions]
    ref = next(model.parameters())
    was_training = model.training
    try:
        model.eval()  # no BN statistics updates from the probe
        with torch.no_grad():
            model(torch.zeros(1, in_chans, probe_size, probe_size, device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def insert_ulsam(
    model: nn.Module,
    positions: Sequence[str],
    num_splits: int = 4,
    *,
    mode: str = "replace",
    bn_momentum: float = 0.1,
    probe_size: int = 64,
    in_chans: int = 3,
) -> nn.Module:
    """Put ULSAM into any CNN, in place, and return it.

    ``positions``: dotted module names (``model.get_submodule`` paths, e.g. ``"blocks.4.2"`` or
    ``"layer3.1"``). ``mode="replace"`` swaps each module for a ULSAM over its channels (its input and output
    shapes must be equal: a stride-1, same-width block); ``mode="add"`` keeps each module and applies ULSAM to
    its output. Shapes are found by one eval-mode forward of a ``probe_size`` image. The model records
    ``model.ulsam_positions`` (paths of the ULSAM modules) for :func:`ulsam_attention_maps`.
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
    positions = list(positions)
    shapes = _probe_shapes(model, positions, probe_size, in_chans)
    added = []
    for p in positions:
        if p not in shapes:
            raise ValueError(f"module {p!r} did not run in the forward pass; cannot place ULSAM there")
        (shape_in, shape_out) = shapes[p]
        if mode == "replace" and shape_in != shape_out:
            raise ValueError(f"cannot replace {p!r} by ULSAM: it maps {list(shape_in[1:])} to {list(shape_out[1:])} "
                             "(ULSAM keeps the shape); pick a stride-1 block with equal in/out channels, or mode='add'")
        ulsam = ULSAM(shape_out[1], num_splits=num_splits, bn_momentum=bn_momentum)
        old = model.get_submodule(p)
        ulsam.to(device=next(old.parameters(), next(model.parameters())).device)
        parent_name, _, child = p.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ulsam if mode == "replace" else AddULSAM(old, ulsam))
        added.append(p if mode == "replace" else f"{p}.ulsam")
    model.ulsam_positions = list(getattr(model, "ulsam_positions", [])) + added
    return model


@torch.no_grad()
def ulsam_attention_maps(model: nn.Module, x: torch.Tensor, forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """``{"ulsam_<path>": [B, g, h, w]}``: every ULSAM's subspace maps on ``x`` (one forward pass)."""
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for p in getattr(model, "ulsam_positions", []):
        m = model.get_submodule(p)
        hooks.append(m.register_forward_pre_hook(
            lambda mod, a, p=p: captured.__setitem__(p, mod.attention(a[0]))))
    try:
        (forward or model)(x)
    finally:
        for h in hooks:
            h.remove()
    return {"ulsam_" + p.replace(".", "_"): a for p, a in captured.items()}


# ---------------------------------------------------------------------------------------- backbones
class ULSAMMobileNet(ZooModel, EfficientNet):
    """timm's ``EfficientNet`` (MobileNet-V1/V2) with ULSAM modules; adds ``attention_maps`` and bench columns.

    The rest of the surface is timm's, unchanged by the inserted modules (they sit inside the ``blocks``
    stages, under the replaced block's name): ``forward_intermediates`` / ``feature_info`` give the stage
    maps, ``set_grad_checkpointing`` checkpoints the stages (``checkpoint_seq``), ``group_matcher`` groups
    a ULSAM with the block it replaced or follows.
    """

    zoo_capabilities = Capabilities(attention_maps=True, bench_extras=True)
    ulsam_positions: list[str]
    ulsam_mode: str

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: no position embeddings or tokens (timm's optimizer factory still skips norms and biases)."""
        return set()

    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return ulsam_attention_maps(self, x, forward=self.forward_features)

    def bench_extras(self, img_size: int) -> dict:
        ulsam = [m for m in self.modules() if isinstance(m, ULSAM)]
        return {"ulsam_modules": len(ulsam), "ulsam_mode": self.ulsam_mode,
                "ulsam_params": sum(p.numel() for m in ulsam for p in m.parameters())}


def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm MobileNet weights (or a zoo checkpoint) -> this model: keys of blocks wrapped by ``AddULSAM`` gain
    ``.block``, keys of replaced blocks are dropped, and the (new) ULSAM modules keep their fresh init."""
    own = model.state_dict()
    if set(state_dict) == set(own):
        return state_dict
    wrapped = [p[: -len(".ulsam")] for p in getattr(model, "ulsam_positions", []) if p.endswith(".ulsam")]
    out = {}
    for k, v in state_dict.items():
        for w in wrapped:
            if k.startswith(w + "."):
                k = f"{w}.block.{k[len(w) + 1:]}"
                break
        if k in own:
            out[k] = v
    ulsam_keys = [k for k in own if any(k.startswith(p + ".") for p in model.ulsam_positions)]
    return {**{k: own[k] for k in ulsam_keys}, **out}


def _mobilenet(
    gen: Callable[..., EfficientNet],
    positions: Sequence[str],
    *,
    mode: str,
    num_splits: int,
    bn_momentum: float = 0.1,
    **kwargs,
) -> ULSAMMobileNet:
    model = gen(**kwargs)
    model.__class__ = ULSAMMobileNet  # same timm modules and keys; adds attention_maps / bench_extras
    model.ulsam_mode = mode
    insert_ulsam(model, positions, num_splits, mode=mode, bn_momentum=bn_momentum,
                 in_chans=kwargs.get("in_chans", 3))
    return model


def _timm(name: str) -> Callable[..., EfficientNet]:
    return lambda **kw: timm.create_model(name, **kw)


def _mv1(width: float) -> Callable[..., EfficientNet]:
    def gen(pretrained: bool = False, **kw) -> EfficientNet:
        return _gen_mobilenet_v1("mobilenetv1_100", width, **kw)  # variant name only picks timm's (unused) cfg
    return gen


def _mv2_tiny(pretrained: bool = False, *, width: float = 0.35, **kw) -> EfficientNet:
    """A shallow MobileNet-V2 (x``width``) for 32 px: stem and the 24-ch stage at stride 2, then stride 1 up to the
    96-ch stage (8x8 on 32 px) and stride 2 into the 160-ch stage (4x4); one block in the 24/32/64 stages."""
    arch_def = [["ds_r1_k3_s1_c16"], ["ir_r1_k3_s2_e6_c24"], ["ir_r1_k3_s1_e6_c32"], ["ir_r1_k3_s1_e6_c64"],
                ["ir_r3_k3_s1_e6_c96"], ["ir_r3_k3_s2_e6_c160"], ["ir_r1_k3_s1_e6_c320"]]
    return EfficientNet(block_args=decode_arch_def(arch_def), num_features=round_channels(1280, width), stem_size=32,
                        round_chs_fn=lambda c: round_channels(c, multiplier=width), act_layer=nn.ReLU6, **kw)


MV1_REPLACE = ("blocks.3.5",)  # the last of the five repeated 14x14x512 layers
MV2 = dict(r96=("blocks.4.2",), r160=("blocks.5.2",), r64_96=("blocks.3.3", "blocks.4.2"),
           r160x2=("blocks.5.1", "blocks.5.2"), r96_160=("blocks.4.2", "blocks.5.2"),
           r96x2_160x2=("blocks.4.1", "blocks.4.2", "blocks.5.1", "blocks.5.2"))
_SPEC = dict(task="classification", paper=PAPER, paper_ids=("arXiv:2006.15102",), checkpoint_filter=checkpoint_filter,
             first_conv="conv_stem", classifier="classifier")
# preprocessing of the timm backbone weights (pretrained_cfg): MobileNet-V1 ra4 Inception mean/std, V2 ImageNet
_MV1_WEIGHTS = dict(weights=Weights(backbone="mobilenetv1_100.ra4_e3600_r224_in1k"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_MV2_WEIGHTS = dict(weights=Weights(backbone="mobilenetv2_100.ra_in1k"))


def _ref(params_m: float | None, gflops: float | None, top1: float | None, what: str, baseline: tuple[float, float]) -> Reference:
    return Reference(params_m=params_m, gflops=gflops, metrics=(Metric("top1", top1, "imagenet-1k", 224),) if top1 else (),
                     note=f"ULSAM {what}; the paper's baseline MobileNet: {baseline[0]}M, {baseline[1]} GFLOPs")


_MV1 = (4.2, 0.569)
_MV2 = (3.4, 0.300)


# ---------------------------------------------------------------------------------------- variants
@register_model(source="zoo (timm mobilenetv1_100, ULSAM replaces blocks.3.5)",
                reference=_ref(3.9, 0.517, 70.43, "replaces 1x 14^2x512 layer, g=4", _MV1), **_MV1_WEIGHTS, **_SPEC)
def ulsam_mobilenetv1_100(pretrained: bool = False, *, num_splits: int = 4, positions: Sequence[str] = MV1_REPLACE,
                          bn_momentum: float = 0.1, **kwargs) -> ULSAMMobileNet:
    return _mobilenet(_timm("mobilenetv1_100"), positions, mode="replace", num_splits=num_splits,
                      bn_momentum=bn_momentum, pretrained=pretrained, **kwargs)


@register_model(source="zoo (timm mobilenetv1_100, ULSAM added after blocks.3.5)",
                reference=_ref(4.2, 0.5692, 70.92, "added after 1x 14^2x512 layer, g=1..16", _MV1), **_MV1_WEIGHTS, **_SPEC)
def ulsam_mobilenetv1_100_add(pretrained: bool = False, *, num_splits: int = 4, positions: Sequence[str] = MV1_REPLACE,
                              bn_momentum: float = 0.1, **kwargs) -> ULSAMMobileNet:
    return _mobilenet(_timm("mobilenetv1_100"), positions, mode="add", num_splits=num_splits,
                      bn_momentum=bn_momentum, pretrained=pretrained, **kwargs)


@register_model(source="zoo (timm MobileNet-V1 x0.75, ULSAM replaces blocks.3.5)",
                reference=_ref(2.4, 0.296, 67.98, "replaces 1x 14^2x384 layer, g=1", (2.6, 0.325)),
                weights=Weights(note="timm has no MobileNet-V1 x0.75 weights"), **_SPEC)
def ulsam_mobilenetv1_075(pretrained: bool = False, *, num_splits: int = 1, positions: Sequence[str] = MV1_REPLACE,
                          bn_momentum: float = 0.1, **kwargs) -> ULSAMMobileNet:
    return _mobilenet(_mv1(0.75), positions, mode="replace", num_splits=num_splits,
                      bn_momentum=bn_momentum, pretrained=pretrained, **kwargs)


@register_model(source="zoo (timm MobileNet-V1 x0.5, ULSAM replaces blocks.3.5)",
                reference=_ref(1.2, 0.136, 63.42, "replaces 1x 14^2x256 layer, g=1", (1.3, 0.149)),
                weights=Weights(note="timm has no MobileNet-V1 x0.5 weights"), **_SPEC)
def ulsam_mobilenetv1_050(pretrained: bool = False, *, num_splits: int = 1, positions: Sequence[str] = MV1_REPLACE,
                          bn_momentum: float = 0.1, **kwargs) -> ULSAMMobileNet:
    return _mobilenet(_mv1(0.5), positions, mode="replace", num_splits=num_splits,
                      bn_momentum=bn_momentum, pretrained=pretrained, **kwargs)


def _mv2_variant(key: str, params_m: float, gflops: float, what: str, top1: float | None = None):
    """Register ``ulsam_mobilenetv2_100[_key]``: timm mobilenetv2_100 with ULSAM replacing ``MV2[key]``."""
    name = "ulsam_mobilenetv2_100" + ("" if key == "r96_160" else f"_{key}")

    def builder(pretrained: bool = False, *, num_splits: int = 4, positions: Sequence[str] = MV2[key],
                bn_momentum: float = 0.1, **kwargs) -> ULSAMMobileNet:
        return _mobilenet(_timm("mobilenetv2_100"), positions, mode="replace", num_splits=num_splits,
                          bn_momentum=bn_momentum, pretrained=pretrained, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"MobileNet-V2 1.0, ULSAM (g=num_splits) replaces {what}: {', '.join(MV2[key])}."
    register_model(builder, name=name, source=f"zoo (timm mobilenetv2_100, ULSAM replaces {', '.join(MV2[key])})",
                   reference=_ref(params_m, gflops, top1, f"replaces {what}, g=4", _MV2), **_MV2_WEIGHTS, **_SPEC)
    return builder


ulsam_mobilenetv2_100 = _mv2_variant("r96_160", 2.96, 0.262, "one 96-ch @14^2 and one 160-ch @7^2 block", 71.52)
ulsam_mobilenetv2_100_r96 = _mv2_variant("r96", 3.28, 0.277, "one 96-ch @14^2 block")
ulsam_mobilenetv2_100_r160 = _mv2_variant("r160", 3.08, 0.285, "one 160-ch @7^2 block")
ulsam_mobilenetv2_100_r64_96 = _mv2_variant("r64_96", 3.23, 0.267, "one 64-ch and one 96-ch @14^2 block")
ulsam_mobilenetv2_100_r160x2 = _mv2_variant("r160x2", 2.77, 0.269, "two 160-ch @7^2 blocks")
ulsam_mobilenetv2_100_r96x2_160x2 = _mv2_variant("r96x2_160x2", 2.54, 0.224, "two 96-ch and two 160-ch blocks", 69.72)


@register_model(source="zoo (timm mobilenetv2_100, ULSAM added after blocks.4.2 and blocks.5.2: assumed positions)",
                reference=_ref(None, None, 71.64, "added (positions not public; ours: after blocks.4.2, 5.2), g=4", _MV2),
                **_MV2_WEIGHTS, **_SPEC)
def ulsam_mobilenetv2_100_add(pretrained: bool = False, *, num_splits: int = 4,
                              positions: Sequence[str] = MV2["r96_160"], bn_momentum: float = 0.1,
                              **kwargs) -> ULSAMMobileNet:
    return _mobilenet(_timm("mobilenetv2_100"), positions, mode="add", num_splits=num_splits,
                      bn_momentum=bn_momentum, pretrained=pretrained, **kwargs)


@register_model(input_size=(3, 32, 32),
                source="zoo (shallow MobileNet-V2 x0.35 for 32 px, ULSAM replaces blocks.4.2, 5.2)",
                weights=Weights(note="CPU variant: train it (python train.py)"), **_SPEC)
def ulsam_mobilenetv2_tiny(pretrained: bool = False, *, num_splits: int = 4, positions: Sequence[str] = MV2["r96_160"],
                           bn_momentum: float = 0.1, **kwargs) -> ULSAMMobileNet:
    return _mobilenet(_mv2_tiny, positions, mode="replace", num_splits=num_splits, bn_momentum=bn_momentum,
                      pretrained=pretrained, **kwargs)
