"""BiFormer: optimised bi-level routing attention vs a plain reference, variants, official checkpoint keys,
the timm model surface."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import group_parameters

import zoo
from zoo.contract import contract_violations
from zoo.models.biformer import BiLevelRoutingAttention, checkpoint_filter
from conftest import count_saved_tensors


# ---------------------------------------------------------------------------------------- reference
def reference_bra(attn: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Bi-level routing written plainly: loops over images, regions, tokens and heads, dense masks.

    Semantics: the map is split into n_win x n_win regions after zero-padding to a multiple of n_win;
    region descriptors are the means of q and k over the region's real (unpadded) tokens; a region with no
    real token cannot be routed to; each query region attends to the real tokens of its top-k regions
    with scale dim ** -0.5; LCE is a depthwise conv of v on the unpadded map; then the output linear.
    """
    n, h, w, c = x.shape
    s, topk, heads = attn.n_win, attn.topk, attn.num_heads
    hd = c // heads
    hp, wp = math.ceil(h / s) * s, math.ceil(w / s) * s
    rh, rw = hp // s, wp // s
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    lepe = F.conv2d(v.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias,
                    padding=attn.lepe.padding, groups=c).permute(0, 2, 3, 1)
    region = [[(i // rh) * s + j // rw for j in range(w)] for i in range(h)]  # region of each real token
    out = torch.zeros_like(v)
    for b in range(n):
        q_r = torch.zeros(s * s, c, dtype=x.dtype)
        k_r = torch.zeros(s * s, c, dtype=x.dtype)
        count = [0] * (s * s)
        for i in range(h):
            for j in range(w):
                r = region[i][j]
                q_r[r] += q[b, i, j]
                k_r[r] += k[b, i, j]
                count[r] += 1
        affinity = torch.full((s * s, s * s), float("-inf"), dtype=x.dtype)
        for r in range(s * s):
            for r2 in range(s * s):
                if count[r2] > 0:
                    qm = q_r[r] / max(count[r], 1)
                    affinity[r, r2] = (qm * attn.scale) @ (k_r[r2] / count[r2])
        routed = [set(torch.topk(affinity[r], topk).indices.tolist()) for r in range(s * s)]
        keys = k[b].reshape(h * w, c)
        vals = v[b].reshape(h * w, c)
        for i in range(h):
            for j in range(w):
                allowed = torch.tensor([region[a][bb] in routed[region[i][j]] for a in range(h) for bb in range(w)])
                for m in range(heads):
                    sl = slice(m * hd, (m + 1) * hd)
                    logits = (q[b, i, j, sl] * attn.scale) @ keys[:, sl].T
                    logits = logits.masked_fill(~allowed, float("-inf"))
                    out[b, i, j, sl] = logits.softmax(-1) @ vals[:, sl]
    return (out + lepe) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("size", [(9, 9), (8, 7), (5, 10), (4, 4)])
def test_bra_matches_plain_reference(size):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=3, topk=2).double()
    with torch.no_grad():
        attn.qkv.bias.normal_(0, 0.5)
        attn.qkv.weight.mul_(5)
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    got = attn(x)
    want = reference_bra(attn, x)
    assert got.shape == (2, *size, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_is_masked_out_of_routing():
    """Regions made only of padding are never routed to; padded keys get no attention (finite outputs)."""
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=4, topk=3)
    x = torch.randn(2, 3, 5, 16)  # padded to 4x8 (1x2 regions): row 3 and columns 6-7 hold only padding
    assert torch.isfinite(attn(x)).all()
    *_, idx, valid, _ = attn._project(x)
    assert (~valid.any(1)).sum() == 7 and valid[idx].any(-1).all()


def test_routing_has_no_gradient_path():
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=1)
    x = torch.randn(1, 4, 4, 16, requires_grad=True)
    attn(x).sum().backward()
    assert all(p.grad is not None for p in attn.parameters())


# ---------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("name,params_m", [("biformer_tiny", 13.14), ("biformer_small", 25.54), ("biformer_base", 56.80)])
def test_paper_param_counts(name, params_m):
    got = zoo.model_info(name)["params_m"]
    assert abs(got - params_m) / params_m < 1e-3, (name, got, params_m)


def test_nano_any_size_and_intermediates():
    torch.manual_seed(0)
    net = zoo.create_model("biformer_nano", num_classes=10).eval()
    for hw in [(64, 64), (50, 37), (32, 32)]:
        assert net(torch.randn(1, 3, *hw)).shape == (1, 10)
    feats = net.forward_intermediates(torch.randn(2, 3, 64, 64), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    seg = zoo.create_model("biformer_fpn_nano", num_classes=4).eval()
    assert seg(torch.randn(1, 3, 48, 40)).shape == (1, 4, 48, 40)


def test_attention_maps():
    torch.manual_seed(0)
    net = zoo.create_model("biformer_nano", num_classes=10).eval()
    maps = net.attention_maps(torch.randn(2, 3, 64, 64))
    routed, tok = maps["s2_routed_regions"], maps["s2_token_attention"]
    assert routed.shape == (2, 3, 4, 4) and tok.shape == (2, 3, 8, 8)
    assert ((routed == 1).flatten(2).sum(-1) == 4).all()  # stage 2 of nano: top-4 routing
    torch.testing.assert_close(tok.flatten(2).sum(-1), torch.ones(2, 3))  # a distribution over routed tokens
    assert (tok.flatten(2)[(routed != 1).repeat_interleave(2, -1).repeat_interleave(2, -2).flatten(2)] == 0).all()


# ---------------------------------------------------------------------------------------- official keys
def to_official(key: str) -> str:
    """Zoo key -> official rayleizhu/BiFormer key (the inverse of checkpoint_filter, written independently)."""
    p = key.split(".")
    if p[0] == "stem":
        p = ["downsample_layers", "0", *p[1:]]
    elif p[0] == "stages" and p[2] == "downsample":
        p = ["downsample_layers", p[1], *p[3:]]
    elif p[0] == "stages" and p[2] == "blocks":
        p = ["stages", p[1], *p[3:]]
        if p[3] == "mlp":
            p[4] = {"fc1": "0", "fc2": "3"}[p[4]]
        elif p[3] == "attn" and len(p) == 6 and int(p[1]) < 3:  # BRA stages: qkv.qkv and wo
            p = p[:4] + {"qkv": ["qkv", "qkv"], "proj": ["wo"], "lepe": ["lepe"]}[p[4]] + p[5:]
    return ".".join(p)


# facts read off the official model's state_dict() (biformer_tiny: 264 entries)
OFFICIAL_TINY = {
    "downsample_layers.0.0.weight": (32, 3, 3, 3), "downsample_layers.1.1.running_var": (128,),
    "stages.0.0.pos_embed.weight": (64, 1, 3, 3), "stages.0.0.attn.qkv.qkv.weight": (192, 64),
    "stages.0.0.attn.wo.bias": (64,), "stages.0.0.attn.lepe.weight": (64, 1, 5, 5),
    "stages.2.7.mlp.3.weight": (256, 768), "stages.3.1.attn.qkv.weight": (1536, 512),
    "stages.3.1.attn.proj.weight": (512, 512), "stages.3.1.attn.lepe.bias": (512,),
    "norm.num_batches_tracked": (), "head.weight": (1000, 512),
}


def test_official_key_layout_of_tiny():
    with torch.device("meta"):
        net = zoo.get_spec("biformer_tiny").builder()
    sd = {to_official(k): v for k, v in net.state_dict().items()}
    assert len(sd) == 264
    for k, shape in OFFICIAL_TINY.items():
        assert tuple(sd[k].shape) == shape, k
    assert set(checkpoint_filter(sd, net)) == set(net.state_dict())


@pytest.mark.parametrize("wrap", [False, True])
def test_official_checkpoint_loads(tmp_path, wrap):
    torch.manual_seed(0)
    src = zoo.create_model("biformer_nano", num_classes=10).eval()
    for m in src.modules():  # make BN statistics matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
    official = {to_official(k): v for k, v in src.state_dict().items()}
    assert "stages.0.0.attn.qkv.qkv.weight" in official and "stages.3.0.attn.qkv.weight" in official
    path = tmp_path / "biformer_official.pth"
    torch.save({"model": official, "epoch": 300} if wrap else official, path)
    net = zoo.create_model("biformer_nano", num_classes=10, pretrained_file=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x), src(x), atol=0, rtol=0)
    # the segmenter takes an official classification checkpoint as its encoder
    seg = zoo.create_model("biformer_fpn_nano", num_classes=3, pretrained_file=str(path))
    torch.testing.assert_close(seg.encoder.stages[0].blocks[0].attn.qkv.weight, src.stages[0].blocks[0].attn.qkv.weight)


def test_semantic_fpn_head_matches_mmseg_structure():
    """biformer_small_fpn: mmseg's FPN neck (256) + FPNHead (128): 1, 1, 2, 3 conv rounds for strides 4..32."""
    from zoo.models.fpn import SemanticFPN

    head = SemanticFPN([64, 128, 256, 512], 150)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads]
    assert convs == [1, 1, 2, 3]
    feats = [torch.randn(1, c, 128 // s, 128 // s) for c, s in zip([64, 128, 256, 512], [4, 8, 16, 32])]
    assert head(feats).shape == (1, 150, 32, 32)
    neck = sum(p.numel() for n, p in head.named_parameters() if n.startswith(("lateral", "fpn_convs")))
    assert neck == sum(c * 256 + 256 for c in [64, 128, 256, 512]) + 4 * (256 * 256 * 9 + 256)


def test_classification_weights_initialise_the_fpn_encoder(tmp_path):
    torch.manual_seed(0)
    cls = zoo.create_model("biformer_nano", num_classes=10)
    torch.save(cls.state_dict(), tmp_path / "nano.pth")
    seg = zoo.create_model("biformer_fpn_nano", num_classes=3, pretrained_file=str(tmp_path / "nano.pth"))
    for k, v in seg.encoder.state_dict().items():
        if not k.startswith(("head.", "norm.")):
            assert torch.equal(v, cls.state_dict()[k]), k


# ---------------------------------------------------------------------------------------- timm surface
NANO_SMALL = dict(num_classes=10)  # biformer_nano: depths (1, 2, 2, 1), widths 32..256, 64 px inputs
NANO_CHS, NANO_RED = [32, 64, 128, 256], [4, 8, 16, 32]


def nano(**kw):
    torch.manual_seed(0)
    return zoo.create_model("biformer_nano", **{**NANO_SMALL, **kw})


def test_contract_is_kept():
    """Capabilities declared; timm surface present (pretrained_cfg/default_cfg come from create_model)."""
    pending = {"lacks timm's pretrained_cfg", "lacks timm's default_cfg"}
    assert set(contract_violations(nano(), "classification")) <= pending
    assert nano().zoo_capabilities.declared() == ["attention_maps", "bench_extras"]
    extras = nano().bench_extras(64)  # the routed algorithm's count; stage 3 executes dense masked scores
    assert 0 < extras["total_gmacs_analytic"] < extras["total_gmacs_executed"]
    seg = zoo.create_model("biformer_fpn_nano", num_classes=3)
    assert contract_violations(seg, "segmentation") == []
    assert set(seg.zoo_capabilities.declared()) == {"attention_maps", "trainable_groups"}


def test_forward_is_head_of_features_and_pre_logits():
    net = nano().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net.forward_features(x)
        assert feats.shape == (2, 256, 2, 2)
        torch.testing.assert_close(net(x), net.forward_head(feats), atol=0, rtol=0)
        pre = net.forward_head(feats, pre_logits=True)
    assert isinstance(net.num_features, int) and isinstance(net.head_hidden_size, int)
    assert pre.shape == (2, net.head_hidden_size) and net.head_hidden_size == net.num_features == 256
    torch.testing.assert_close(pre, feats.mean((2, 3)))
    assert net.get_classifier() is net.head and net.head.in_features == net.head_hidden_size


def test_reset_classifier():
    net = nano().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        net.reset_classifier(0)
        assert isinstance(net.get_classifier(), torch.nn.Identity)
        torch.testing.assert_close(net(x), pooled, atol=0, rtol=0)  # [B, num_features]
        net.reset_classifier(5)
        assert net(x).shape == (2, 5) and net.num_classes == 5 and net.get_classifier().out_features == 5
        net.reset_classifier(0, global_pool="")
        torch.testing.assert_close(net(x), net.forward_features(x), atol=0, rtol=0)  # unpooled [B, C, h, w]
        net.reset_classifier(5, global_pool="")  # the classifier at every position
        per_pos = net(x)
        assert per_pos.shape == (2, 5, 2, 2)
        net.global_pool = "avg"
        torch.testing.assert_close(net.head(net.forward_features(x)[:, :, 1, 0]), per_pos[:, :, 1, 0])
    with pytest.raises(ValueError, match="global_pool"):
        net.reset_classifier(5, global_pool="max")


def test_no_weight_decay_and_group_matcher():
    net = nano()
    names = [n for n, _ in net.named_parameters()]
    nwd = net.no_weight_decay()
    assert isinstance(nwd, set) and nwd <= set(names)  # the official names match no parameter: empty
    for coarse in (False, True):
        groups = group_parameters(net, net.group_matcher(coarse=coarse))
        grouped = [n for g in groups.values() for n in g]
        assert sorted(grouped) == sorted(names), coarse  # every parameter in exactly one group
        assert all(n.startswith("stem.") for n in groups[0])
        last = ("head.",) if not coarse else ("head.", "norm.")  # coarse: the final norm goes with the head
        assert {n.split(".")[0] + "." for n in groups[max(groups)]} == set(last)
    fine = group_parameters(net, net.group_matcher())
    # stem, one group per block (a downsample with its stage's block 0, the final norm with the last block), head
    assert len(fine) == 1 + sum((1, 2, 2, 1)) + 1
    assert {"norm.weight", "stages.3.blocks.0.mlp.fc2.weight"} <= set(fine[6])
    assert {n for n in fine[2] if "downsample" not in n} and any(n.startswith("stages.1.downsample") for n in fine[2])
    assert len(group_parameters(net, net.group_matcher(coarse=True))) == 1 + 4 + 1  # stem, stages, norm+head


def _run(net, x, seed):
    torch.manual_seed(seed)  # drop path draws the same masks
    saved, out = count_saved_tensors(lambda: net(x))
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, saved


def test_grad_checkpointing_same_outputs_and_grads_fewer_saved_tensors():
    net = nano(drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 64, 64)
    out, grads, n_saved = _run(net, x, 1)
    net.zero_grad(set_to_none=True)
    net.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in net.stages)
    out_ck, grads_ck, n_saved_ck = _run(net, x, 1)
    torch.testing.assert_close(out_ck, out, atol=1e-5, rtol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads_ck[n], grads[n], atol=1e-5, rtol=1e-5, msg=n)
    assert n_saved_ck < n_saved / 2, (n_saved_ck, n_saved)
    net.set_grad_checkpointing(False)
    net.zero_grad(set_to_none=True)
    assert _run(net, x, 1)[2] == n_saved
    # the segmenter passes it to its encoder
    seg = zoo.create_model("biformer_fpn_nano", num_classes=3)
    seg.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in seg.encoder.stages)


def test_forward_intermediates_timm_semantics():
    net = nano().eval()
    x = torch.randn(2, 3, 64, 40)
    with torch.no_grad():
        ref = net.forward_features(x)
        final, maps = net.forward_intermediates(x)
        torch.testing.assert_close(final, ref, atol=0, rtol=0)
        # stride-2 convs with padding 1 round up: 64x40 -> 16x10, 8x5, 4x3, 2x2
        assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 10), (2, 64, 8, 5), (2, 128, 4, 3), (2, 256, 2, 2)]
        only = net.forward_intermediates(x, intermediates_only=True)
        assert isinstance(only, list) and len(only) == 4
        for a, b in zip(only, maps):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        last2 = net.forward_intermediates(x, indices=2, intermediates_only=True)  # int: the last n
        picked = net.forward_intermediates(x, indices=[0, -1], intermediates_only=True)  # negative allowed
        torch.testing.assert_close(last2[0], maps[2])
        torch.testing.assert_close(last2[1], maps[3])
        torch.testing.assert_close(picked[0], maps[0])
        torch.testing.assert_close(picked[1], maps[3])
        normed = net.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], ref)  # the final BatchNorm on the last stage
        early_final, early = net.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early[0], maps[1])
        torch.testing.assert_close(early_final, maps[1])  # stopped after stage 1: no final norm
    with pytest.raises(ValueError, match="NCHW"):
        net.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(AssertionError):
        net.forward_intermediates(x, indices=[4])
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in net.feature_info] == [
        (c, r, f"stages.{i}") for i, (c, r) in enumerate(zip(NANO_CHS, NANO_RED))]
    modules = dict(net.named_modules())
    assert all(f["module"] in modules for f in net.feature_info)


def test_prune_intermediate_layers():
    net = nano().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = net.forward_intermediates(x, intermediates_only=True)
        kept = net.prune_intermediate_layers(indices=[0, -3])
        assert kept == [0, 1] and len(net.stages) == 2
        assert isinstance(net.norm, torch.nn.Identity) and isinstance(net.head, torch.nn.Identity)
        assert net.num_features == net.head_hidden_size == 64
        after = net.forward_intermediates(x, indices=kept, intermediates_only=True)
        torch.testing.assert_close(after[0], maps[0])
        torch.testing.assert_close(after[1], maps[1])
        assert net(x).shape == (2, 64, 8, 8)  # what is left, unpooled
    full = nano()
    assert full.prune_intermediate_layers(indices=1, prune_head=False) == [3]
    assert isinstance(full.norm, torch.nn.BatchNorm2d) and full.get_classifier().out_features == 10
    assert full.prune_intermediate_layers(indices=1, prune_norm=True) == [3]
    assert isinstance(full.norm, torch.nn.Identity) and isinstance(full.head, torch.nn.Identity)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (0, 2), 2])
def test_feature_getter_net(out_indices):
    ref = nano().eval()
    getter = FeatureGetterNet(nano(), out_indices=out_indices).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = getter(x)
        want = ref.forward_intermediates(x, indices=out_indices if isinstance(out_indices, int) else list(out_indices),
                                         intermediates_only=True)
    idx = list(out_indices) if not isinstance(out_indices, int) else list(range(4 - out_indices, 4))
    assert getter.feature_info.channels() == [NANO_CHS[i] for i in idx]
    assert getter.feature_info.reduction() == [NANO_RED[i] for i in idx]
    for f, w, c, r in zip(feats, want, getter.feature_info.channels(), getter.feature_info.reduction()):
        assert f.shape == (2, c, 64 // r, 64 // r)
        torch.testing.assert_close(f, w, atol=0, rtol=0)


def test_eval_output_does_not_depend_on_batch_mates():
    net = nano().eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(x)[3:], net(x[3:]), atol=1e-5, rtol=1e-5)


def test_create_model_features_only():
    torch.manual_seed(0)
    feats = zoo.create_model("biformer_nano", features_only=True, out_indices=(1, -1)).eval()
    assert feats.feature_info.channels() == [64, 256] and feats.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        maps = feats(torch.randn(2, 3, 64, 48))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 8, 6), (2, 256, 2, 2)]
