"""Multi-scale self-guided attention segmenter (MS-Dual-Guided).

Paper: Sinha & Dolz, "Multi-scale self-guided attention for medical image segmentation", IEEE JBHI 2020
(arXiv 1906.02849). Origin: sinAshish/Multi-Scale-Attention (commit 96d76f2), ``src/models/my_stacked_danet.py``
(``DAF_stack``), ``src/models/attention.py`` (PAM, CAM, semantic module), ``src/main.py`` (the loss).
Re-written here on a features-only backbone (timm's or the zoo's); no official code is copied.

The network, for scales s = 1..4 (backbone stages of stride 4, 8, 16, 32):

- ``down[s]``: 1x1 conv -> ``channels`` + BN + PReLU, bilinearly upsampled to the stride-4 map: ``F_s``.
- ``fuse``: MultiConv (3x3-BN-PReLU, 3x3-BN-PReLU, 1x1-BN-PReLU) of ``cat(F_4, F_3, F_2, F_1)`` (the
  official concat order): ``F_MS``.
- step 1, per scale: ``X1 = cat(F_s, F_MS)``; ``A_s = proj((PAM(X1) + CAM(X1)) * sem_conv(R1))`` where
  ``(z1, R1) = semantic[0](X1)``; PAM/CAM branches are 3x3 conv (2C->C)-BN-PReLU -> DANet PAM or CAM
  (gamma = 0 at init) -> 3x3 conv-BN-PReLU.
- step 2, per scale: ``X2 = cat(F_s, A_s * F_MS)``, the same with ``semantic[1]``: refined ``A'_s``.
- heads: ``head[s](F_s)`` (4 initial outputs, training only) and ``head_refined[s](A'_s)``; inference is
  the mean of the 4 refined logits, bilinearly upsampled to the input size.
- only **two** semantic encoder-decoders exist, one per step, shared by the 4 scales (as the official code).

Loss (``forward_train``, as ``src/main.py``): ``sum_8 CE + 0.25 * sum_4 MSE(z1_s, z2_s) + 0.1 * sum_8 MSE(X, R)``,
returned as ``ce_initial``, ``ce_refined``, ``guidance`` and ``recon`` (weights included, so their sum is the
official ``lossG``). MSE of the official batch-flattened latent ``enc2.view(-1)`` is the element-wise mean,
so the latent is kept as ``[B, 4C', h/4, w/4]``: the value is the same.

Documented choices and deviations:
- **Backbone.** Any timm model with ``features_only`` or zoo classification model (``backbone=``, e.g.
  ``"biformer_nano"`` or ``"halonet_tiny"``; ``out_indices=``; see :func:`zoo.backbones.create_backbone`);
  ``msguided_resnet101`` is the paper's ResNet-101, ``msguided_resnext101_32x8d`` the official code's
  (timm's ``resnext101_32x8d`` has torchvision's layout, so official backbone weights map key for key, see
  :func:`checkpoint_filter_fn`). ``in_chans`` 1 (CHAOS, as the official code) or 3. ``pretrained=True``
  loads the backbone's published weights (timm's ImageNet ones; the official model is trained from scratch).
  The registered variants' ``out_indices`` (1, 2, 3, 4) are chosen for their ResNets: with another
  backbone name its levels (``None`` = all). Another number of scales than 4 (at least 2) builds one
  guided attention and two heads per scale; the loss keeps the official per-term weights.
- **Init.** Everything outside the backbone: official ``weights_init`` (xavier-normal conv / transposed conv
  weights, BN weight ~ N(1, 0.02), bias 0). The backbone keeps timm's init (official: xavier on it too).
- **Class count** is ``num_classes`` (official: hard-coded 5). ``channels`` (official 64) is an argument;
  the official ``MultiConv`` hard-codes ``BatchNorm2d(64)``, here it follows ``channels``.
- **PAM memory.** ``pam_impl="sdpa"`` (default) computes position attention with
  ``F.scaled_dot_product_attention(scale=1)`` (DANet has no 1/sqrt(d)); q/k (C/8 channels) are zero-padded
  to v's C channels, which leaves every dot product unchanged and lets the CPU flash kernel run (it needs
  equal head sizes). The N x N matrix (N = 4096 at 256 px) is then not stored for backward.
  ``pam_impl="plain"`` is the official bmm/softmax/bmm formula.
- Unused official modules (``attention1..4``, ``refine1..4``, ``conv6_*``, ``conv7_*``, ``softmax_1``)
  are left out; ``F.upsample`` -> ``F.interpolate(bilinear, align_corners=False)``.
- ``forward`` averages the 4 refined logits *before* the (linear) bilinear upsampling: the same value as
  the official upsample-then-average up to float rounding, one full-size interpolation instead of four.
- CE uses ``ignore_index=255`` (the zoo's ignore label); the official code has no ignore label.
- ``attention_maps``: per scale ``s`` the PAM map (attention each position *receives*, mean over queries,
  computed in query chunks) and the CAM map (L2 norm over channels of the channel-attended features
  ``softmax(max - XX^T) X``), for step 1 and step 2: ``scale{s}_pam`` / ``scale{s}_cam`` ``[B, 2, h, w]``.
- ``msguided_tiny`` (zoo's own, 64 px CPU runs): timm ``resnet10t``, ``channels=16`` (semantic modules
  32 -> 64 -> 128), stride-4 maps as the paper.

The side-by-side check against the official ``DAF_stack`` and the memory of the two PAM paths are in
``results/ms_guided.md``.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone, variant_backbone
from ..contract import Capabilities, ZooModel
from ..registry import register_model
from ..spec import Metric, Reference, Weights

PAPER = "Sinha & Dolz, Multi-scale self-guided attention for medical image segmentation, IEEE JBHI 2020"
SOURCE = "sinAshish/Multi-Scale-Attention@96d76f2 (re-written on timm features_only)"

__all__ = ["MSGuidedSegmenter", "PAM", "CAM", "SemanticModule", "checkpoint_filter_fn"]


# --------------------------------------------------------------------------------------------- blocks
class PAM(nn.Module):
    """DANet position attention: ``gamma * (V softmax(Q^T K)^T) + x``; q, k have ``dim // 8`` channels."""

    def __init__(self, dim: int, *, impl: str = "sdpa"):
        super().__init__()
        if impl not in ("sdpa", "plain"):
            raise ValueError(f"pam_impl must be 'sdpa' or 'plain', got {impl!r}")
        self.impl = impl
        self.query_conv = nn.Conv2d(dim, dim // 8, 1)
        self.key_conv = nn.Conv2d(dim, dim // 8, 1)
        self.value_conv = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.keep_map = False  # attention_maps() switches this on
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)  # [B, N, C/8]
        k = self.key_conv(x).flatten(2).transpose(1, 2)
        v = self.value_conv(x).flatten(2).transpose(1, 2)  # [B, N, C]
        if self.keep_map:
            self.last_map = self.received_attention(q, k).view(b, 1, h, w)
        if self.impl == "plain":
            out = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        else:
            # zeros add nothing to q.k; equal head sizes and contiguous rows are what the flash kernels take
            # (otherwise SDPA falls back to the math path, which keeps the N x N matrix)
            pad = max(0, v.shape[-1] - q.shape[-1])
            q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
            out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None].contiguous(), scale=1.0)[:, 0]
        return self.gamma * out.transpose(1, 2).reshape(b, c, h, w) + x

    @staticmethod
    def received_attention(q: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Mean over queries of the attention each key position gets, ``[B, N]``, in query chunks."""
        acc = q.new_zeros(q.shape[0], k.shape[1])
        for i in range(0, q.shape[1], chunk):
            acc += torch.softmax(q[:, i:i + chunk] @ k.transpose(1, 2), dim=-1).sum(1)
        return acc / q.shape[1]


class CAM(nn.Module):
    """DANet channel attention: ``gamma * softmax(rowmax(XX^T) - XX^T) X + x``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.keep_map = False
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xf = x.flatten(2)  # [B, C, N]
        energy = xf @ xf.transpose(1, 2)
        attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
        out = attn @ xf
        if self.keep_map:
            self.last_map = out.norm(dim=1).view(b, 1, h, w)
        return self.gamma * out.view(b, c, h, w) + x


class AttentionBranch(nn.Module):
    """Official ``PAM_CAM_Layer``: 3x3 conv (2C->C)-BN-PReLU, PAM or CAM, 3x3 conv-BN-PReLU."""

    def __init__(self, dim: int, *, kind: str, pam_impl: str = "sdpa"):
        super().__init__()
        self.attn = nn.Sequential(  # the official Sequential indices, so state dicts map 1:1
            nn.Conv2d(2 * dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.PReLU(),
            PAM(dim, impl=pam_impl) if kind == "pam" else CAM(dim),
            nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.PReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


class MultiConv(nn.Module):
    """Official ``MultiConv(attn=False)``: 3x3-BN-PReLU, 3x3-BN-PReLU, 1x1-BN-PReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.fuse_attn = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.PReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.PReLU(),
            nn.Conv2d(out_ch, out_ch, 1), nn.BatchNorm2d(out_ch), nn.PReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse_attn(x)


def _conv_bn_relu_x2(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.encode = nn.Sequential(*_conv_bn_relu_x2(cin, cout), nn.MaxPool2d(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, cmid: int, cout: int):
        super().__init__()
        self.decode = nn.Sequential(*_conv_bn_relu_x2(cin, cmid), nn.ConvTranspose2d(cmid, cout, 2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x)


class SemanticModule(nn.Module):
    """Encoder-decoder guidance: ``x [B, D, h, w] -> (latent [B, 4D, h/4, w/4], reconstruction [B, D, h, w])``."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.enc1 = _EncoderBlock(in_dim, in_dim * 2)
        self.enc2 = _EncoderBlock(in_dim * 2, in_dim * 4)
        self.dec2 = _DecoderBlock(in_dim * 4, in_dim * 2, in_dim * 2)
        self.dec1 = _DecoderBlock(in_dim * 2, in_dim, in_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc1 = self.enc1(x)
        enc2 = self.enc2(enc1)
        dec2 = self.dec2(enc2)
        if dec2.shape[-2:] != enc1.shape[-2:]:  # official: always resized (an identity for even sizes)
            dec2 = F.interpolate(dec2, size=enc1.shape[-2:], mode="bilinear", align_corners=False)
        return enc2, self.dec1(dec2)


class GuidedAttention(nn.Module):
    """One scale of one guidance step: ``proj((PAM(x) + CAM(x)) * sem_conv(reconstruction))``."""

    def __init__(self, dim: int, *, pam_impl: str = "sdpa"):
        super().__init__()
        self.pam = AttentionBranch(dim, kind="pam", pam_impl=pam_impl)
        self.cam = AttentionBranch(dim, kind="cam")
        self.sem_conv = nn.Conv2d(2 * dim, dim, 3, padding=1)  # official conv_sem_{step}_{5-s}
        self.proj = nn.Conv2d(dim, dim, 1)  # official conv8_{5-s} / conv8_1{5-s}

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return self.proj((self.cam(x) + self.pam(x)) * self.sem_conv(recon))


# --------------------------------------------------------------------------------------------- model
class MSGuidedSegmenter(ZooModel, nn.Module):
    """``forward(x [B, C, H, W]) -> logits [B, num_classes, H, W]`` (mean of the refined outputs).

    ``backbone``: a timm or zoo model name (``encoder`` is its older name), built features-only by
    :func:`zoo.backbones.create_backbone`; ``backbone_kwargs`` go to its constructor. ``out_indices``
    (timm's meaning, ``None`` = the backbone's default levels) picks the scales: 4 in the paper, any
    number from 2 works (one guided attention and two heads per scale).
    """

    zoo_capabilities = Capabilities(own_objective=True, attention_maps=True, trainable_groups=True,
                                    bench_extras=True)

    def __init__(
        self,
        *,
        backbone: str = "resnet101",
        num_classes: int = 5,
        in_chans: int = 3,
        pretrained_encoder: bool = False,
        channels: int = 64,
        out_indices: int | Sequence[int] | None = (1, 2, 3, 4),
        pam_impl: str = "sdpa",
        backbone_kwargs: dict[str, Any] | None = None,
        encoder: str | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        backbone = encoder or backbone
        self.encoder = create_backbone(backbone, out_indices=out_indices, pretrained=pretrained_encoder,
                                       in_chans=in_chans, **(backbone_kwargs or {}))
        chs = self.encoder.feature_info.channels()
        if len(chs) < 2:
            raise ValueError(f"the model fuses at least 2 scales; {backbone} with out_indices={out_indices} gives {len(chs)}")
        n, c = len(chs), channels
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, c, 1), nn.BatchNorm2d(c), nn.PReLU()) for ch in chs)
        self.fuse = MultiConv(n * c, c)
        self.semantic = nn.ModuleList(SemanticModule(2 * c) for _ in range(2))  # one per step, shared by scales
        self.guide = nn.ModuleList(
            nn.ModuleList(GuidedAttention(c, pam_impl=pam_impl) for _ in range(n)) for _ in range(2)
        )
        self.head = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for _ in range(n))
        self.head_refined = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for _ in range(n))
        for m in (self.down, self.fuse, self.semantic, self.guide, self.head, self.head_refined):
            m.apply(_official_init)

    # ------------------------------------------------------------------ the shared pass
    def _run(self, x: torch.Tensor, *, initial: bool) -> dict[str, list[torch.Tensor]]:
        feats = self.encoder(x)
        size = feats[0].shape[-2:]
        f = [self.down[0](feats[0])] + [
            F.interpolate(d(t), size=size, mode="bilinear", align_corners=False) for d, t in zip(self.down[1:], feats[1:])
        ]
        fms = self.fuse(torch.cat(f[::-1], 1))  # official order: (down4, down3, down2, down1)
        out: dict[str, list[torch.Tensor]] = {"inputs": [], "latents": [], "recons": [], "refined": []}
        if initial:
            out["initial"] = [h(t) for h, t in zip(self.head, f)]
        gate = [None] * len(f)
        for step in range(2):
            for s in range(len(f)):
                xs = torch.cat((f[s], fms if step == 0 else gate[s] * fms), 1)
                z, r = self.semantic[step](xs)
                a = self.guide[step][s](xs, r)
                out["inputs"].append(xs)
                out["latents"].append(z)
                out["recons"].append(r)
                if step == 0:
                    gate[s] = a
                else:
                    out["refined"].append(self.head_refined[s](a))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack(self._run(x, initial=False)["refined"]).mean(0)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (mean of refined) and the official loss terms, weights included."""
        o = self._run(x, initial=True)
        up = [F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False) for t in o["initial"] + o["refined"]]
        ce = [F.cross_entropy(t, y, ignore_index=255) for t in up]
        z, n = o["latents"], len(o["initial"])
        losses = {
            "ce_initial": sum(ce[:n]),
            "ce_refined": sum(ce[n:]),
            "guidance": 0.25 * sum(F.mse_loss(z[s], z[s + n]) for s in range(n)),
            "recon": 0.1 * sum(F.mse_loss(i, r) for i, r in zip(o["inputs"], o["recons"])),
        }
        return torch.stack(up[n:]).mean(0), losses

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per scale ``s`` (1 = stride-4 stage): ``scale{s}_pam`` / ``scale{s}_cam`` ``[B, 2, h, w]`` (step 1, step 2)."""
        mods = [(g.pam.attn[3], g.cam.attn[3]) for step in self.guide for g in step]
        for pam, cam in mods:
            pam.keep_map = cam.keep_map = True
        try:
            self._run(x, initial=False)
            maps, n = {}, len(self.down)
            for s in range(n):
                for i, kind in enumerate(("pam", "cam")):
                    maps[f"scale{s + 1}_{kind}"] = torch.cat([mods[step * n + s][i].last_map for step in range(2)], 1)
        finally:
            for pam, cam in mods:
                pam.keep_map = cam.keep_map = False
                pam.last_map = cam.last_map = None
        return maps

    def bench_extras(self, img_size: int | None) -> dict:
        """PAM size at this input: tokens per map and the N x N matrices a plain PAM keeps (2 per scale and sample)."""
        if not img_size:
            return {}
        n = (img_size // self.encoder.feature_info.reduction()[0]) ** 2
        impl = self.guide[0][0].pam.attn[3].impl
        return {"pam_impl": impl, "pam_tokens": n,
                "pam_matrices_mb_per_sample": round(2 * len(self.down) * n * n * 4 / 2**20, 1)}

    def get_classifier(self) -> nn.Module:
        return self.head_refined

    def freeze_backbone(self) -> None:
        self.encoder.requires_grad_(False)


def _official_init(m: nn.Module) -> None:
    """Official ``weights_init``: xavier-normal conv weights, BN weight ~ N(1, 0.02), bias 0."""
    if type(m) in (nn.Conv2d, nn.ConvTranspose2d):
        nn.init.xavier_normal_(m.weight)
    elif type(m) is nn.BatchNorm2d:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------- weights
_OFFICIAL_RULES = [  # (official key regex, zoo key template); scale s = 1..4 is the layer{s} stage
    (r"resnext\.layer0\.0\.(.*)", "encoder.conv1.{0}"),
    (r"resnext\.layer0\.1\.(.*)", "encoder.bn1.{0}"),
    (r"resnext\.layer1\.1\.(.*)", "encoder.layer1.{0}"),
    (r"resnext\.layer([234])\.(.*)", "encoder.layer{0}.{1}"),
    (r"down([1-4])\.(.*)", "down.{s0}.{1}"),
    (r"fuse1\.(.*)", "fuse.{0}"),
    (r"semanticModule_([12])_1\.(.*)", "semantic.{t0}.{1}"),
    (r"pam_attention_([12])_([1-4])\.(.*)", "guide.{t0}.{s1}.pam.{2}"),
    (r"cam_attention_([12])_([1-4])\.(.*)", "guide.{t0}.{s1}.cam.{2}"),
    (r"conv_sem_([12])_([1-4])\.(.*)", "guide.{t0}.{r1}.sem_conv.{2}"),  # conv_sem_t_1 serves layer4
    (r"conv8_([1-4])\.(.*)", "guide.0.{r0}.proj.{1}"),
    (r"conv8_1([1-4])\.(.*)", "guide.1.{r0}.proj.{1}"),
    (r"predict([1-4])\.(.*)", "head.{s0}.{1}"),
    (r"predict([1-4])_2\.(.*)", "head_refined.{s0}.{1}"),
]
_OFFICIAL_UNUSED = re.compile(r"(conv6_|conv7_|attention[1-4]\.|refine[1-4]\.|resnext\.fc\.)")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official ``DAF_stack`` keys -> zoo keys (unused official modules dropped); zoo/timm keys pass through."""
    if not any(k.startswith(("resnext.", "pam_attention_", "semanticModule_")) for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if _OFFICIAL_UNUSED.match(k):
            continue
        for pattern, template in _OFFICIAL_RULES:
            m = re.fullmatch(pattern, k)
            if m:
                g = m.groups()
                idx = {f"s{i}": int(x) - 1 for i, x in enumerate(g) if x.isdigit()}
                idx |= {f"t{i}": int(x) - 1 for i, x in enumerate(g) if x.isdigit()}
                idx |= {f"r{i}": 4 - int(x) for i, x in enumerate(g) if x.isdigit()}
                out[template.format(*g, **idx)] = v
                break
        else:
            out[k] = v  # unknown: load_into names it as unexpected
    return out


# --------------------------------------------------------------------------------------------- variants
def _create(backbone: str, pretrained: bool, /, **kwargs) -> MSGuidedSegmenter:
    return MSGuidedSegmenter(pretrained_encoder=pretrained, **variant_backbone(backbone, kwargs))


_SPEC = dict(task="segmentation", paper=PAPER, paper_ids=("arXiv:1906.02849",), size_divisor=32,
             checkpoint_filter=checkpoint_filter_fn)
# the official code feeds ToTensor() images, no normalisation (its DAF_stack weights were trained so)
_OFFICIAL_INPUT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@register_model(input_size=(3, 256, 256), source=SOURCE + "; paper backbone timm resnet101",
                weights=Weights(backbone="resnet101.a1h_in1k"), **_OFFICIAL_INPUT, **_SPEC)
def msguided_resnet101(pretrained: bool = False, **kwargs) -> MSGuidedSegmenter:
    return _create("resnet101", pretrained, **kwargs)


@register_model(input_size=(3, 256, 256), source=SOURCE + "; official backbone timm resnext101_32x8d",
                # params_m: the official DAF_stack as counted here (0.955M of it in modules it never uses)
                weights=Weights(backbone="resnext101_32x8d.tv_in1k", official_file="DAF_stack"),
                reference=Reference(params_m=104.511), **_OFFICIAL_INPUT, **_SPEC)
def msguided_resnext101_32x8d(pretrained: bool = False, **kwargs) -> MSGuidedSegmenter:
    return _create("resnext101_32x8d", pretrained, **kwargs)


@register_model(input_size=(3, 64, 64), source="zoo (timm resnet10t features_only, 16-ch attention)",
                weights=Weights(backbone="resnet10t.c3_in1k"), **_SPEC)
def msguided_tiny(pretrained: bool = False, **kwargs) -> MSGuidedSegmenter:
    kwargs.setdefault("channels", 16)  # semantic modules 32 -> 64 -> 128 channels: ~4x cheaper than 32
    return _create("resnet10t", pretrained, **kwargs)
