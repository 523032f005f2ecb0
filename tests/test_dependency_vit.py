"""DependencyViT / DependencyViT-Lite: reversed attention mass, pruning, dependency trees, parameter counts."""
import pytest
import timm
import torch

import zoo
from zoo.models.dependency_vit import DependencyViT, ReversedAttention, parents_from_mask, prune_tokens
from conftest import count_saved_tensors


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return zoo.create_model("dependencyvit_nano", num_classes=10).eval()


@pytest.fixture(scope="module")
def lite_nano():
    torch.manual_seed(0)
    return zoo.create_model("dependencyvit_lite_nano", num_classes=10).eval()


def test_each_child_sends_unit_mass_per_head():
    torch.manual_seed(0)
    attn = ReversedAttention(48, num_heads=4).eval()
    x = torch.randn(2, 10, 48)
    out, m, ex = attn(x, return_attn=True)
    a_r = ex["a_f"].transpose(-2, -1)  # [B, H, parent, child]
    torch.testing.assert_close(a_r.sum(-2), torch.ones(2, 4, 10))  # every child's column sums to one per head
    torch.testing.assert_close(ex["p"].sum(-1), torch.ones(2, 10))  # the head selector is a distribution
    # with P and M applied, a child sends exactly m_j in total (the pruning score of DependencyViT-Lite)
    torch.testing.assert_close(ex["a_m"].sum(-2), m.squeeze(-1))
    assert a_r.sum(-1).std() > 0  # what a parent receives is not normalised


def test_reversed_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = ReversedAttention(48, num_heads=4).eval()
    x = torch.randn(2, 10, 48)
    out, m, ex = attn(x)
    B, N, C, H = 2, 10, 48, 4
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    a_f = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(-1)
    p = (attn.head_selector(x) / attn.head_temperature).softmax(-1)  # [B, N, H]
    m_ref = torch.sigmoid(attn.message_controller(x))  # [B, N, 1]
    a_r = a_f.transpose(-2, -1) * p.permute(0, 2, 1)[:, :, None, :] * m_ref.permute(0, 2, 1)[:, None]
    ref = attn.proj((a_r @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(m, m_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prune_tokens_keeps_top_k_in_order_and_pool_ignores_pruned():
    x = torch.randn(2, 8, 4, requires_grad=True)
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.0, 0.7, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.8]])
    kept, idx, s = prune_tokens(x, score, 3, score.unsqueeze(-1))
    assert kept.shape == (2, 3, 4)
    assert idx.tolist() == [[1, 4, 6], [0, 6, 7]]
    torch.testing.assert_close(kept, torch.stack([x[0, [1, 4, 6]], x[1, [0, 6, 7]]]))
    kept.mean(1).sum().backward()  # average pooling over what is left
    pruned = torch.ones(2, 8, dtype=torch.bool)
    pruned[0, [1, 4, 6]] = pruned[1, [0, 6, 7]] = False
    assert (x.grad[pruned] == 0).all() and (x.grad[~pruned] != 0).all()


def test_lite_keeps_requested_token_counts(lite_nano):
    x = torch.randn(2, 3, 32, 32)
    assert lite_nano.keep_counts(64) == [64, 48, 48, 32]  # 25% of 64 dropped at blocks 2 and 4
    feats = lite_nano.forward_features(x)
    assert feats.shape == (2, 32, 64)
    torch.testing.assert_close(lite_nano.forward_head(feats, pre_logits=True), feats.mean(1))
    full = zoo.create_model("dependencyvit_lite_tiny", num_classes=10)
    assert full.keep_counts(196) == [196, 164, 164, 164, 133, 133, 133, 101, 101, 101, 70, 70]
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: seen.append(o.shape[1])) for b in full.blocks]
    with torch.no_grad():
        full(torch.randn(1, 3, 112, 112))
    for h in hooks:
        h.remove()
    assert seen == full.keep_counts(49) == [49, 41, 41, 41, 33, 33, 33, 25, 25, 25, 17, 17]


def test_pruned_tokens_send_fewest_messages(lite_nano):
    x = torch.randn(2, 3, 32, 32)
    blk = lite_nano.blocks[1]  # the first pruning layer
    cap = {}
    h1 = blk.attn.register_forward_hook(lambda m, a, o: cap.__setitem__("m", o[1].squeeze(-1)))
    h2 = blk.mlp.register_forward_pre_hook(lambda m, a: cap.__setitem__("n", a[0].shape[1]))
    with torch.no_grad():
        _, _, pos, _ = lite_nano._run(x)
    h1.remove(), h2.remove()
    assert cap["n"] == 48
    kept = cap["m"].topk(48, dim=1).indices.sort(1).values
    assert set(pos[0].tolist()) <= set(kept[0].tolist())  # survivors at the end were kept at block 2


def _check_forest(parent: torch.Tensor) -> None:
    B, n = parent.shape
    for b in range(B):
        p = parent[b].tolist()
        present = [i for i in range(n) if p[i] != -2]
        assert any(p[i] == -1 for i in present)
        for i in present:
            if p[i] == -1:
                continue
            assert 0 <= p[i] < n and p[i] != i and p[i] != -2  # exactly one parent, and it is present
            j, steps = i, 0
            while p[j] != -1:  # no cycles: every chain ends at a root
                j, steps = p[j], steps + 1
                assert steps <= n


def test_dependency_tree_every_non_root_has_one_parent(nano, lite_nano):
    x = torch.randn(2, 3, 32, 32)
    trees = nano.dependency_tree(x)
    assert sorted(trees) == list(range(4))
    for t in trees.values():
        assert t.shape == (2, 64) and t.dtype == torch.long and (t >= -1).all()
        _check_forest(t)
    trees = lite_nano.dependency_tree(x, layers=[0, -1])
    assert sorted(trees) == [0, 3]
    assert ((trees[3] == -2).sum(1) == 64 - 48).all()  # tokens pruned at block 2 are absent in block 4
    for t in trees.values():
        _check_forest(t)


def test_cycles_are_broken_at_the_most_receiving_member():
    a = torch.zeros(1, 4, 4)  # [parent, child]
    a[0, 1, 0] = a[0, 0, 1] = 1.0  # 0 <-> 1 point at each other
    a[0, 1, 2] = 1.0  # 2 -> 1
    a[0, 3, 3] = 1.0  # 3 -> itself: a root
    a[0, 1, 3] = 0.5
    parent = parents_from_mask(a)
    assert parent.tolist() == [[1, -1, 1, -1]]  # 1 receives most of the cycle {0, 1}: it becomes the root


def test_attention_maps_and_pngs(nano, tmp_path):
    from zoo.explain import save_attention_maps

    x = torch.randn(2, 3, 32, 32)
    maps = nano.attention_maps(x)
    assert maps["dependency_parts"].shape == (2, 1, 32, 32)
    assert maps["saliency"].shape == (2, 1, 8, 8) and (maps["saliency"] >= 0).all()
    assert maps["dependency_mask"].shape == (2, 8, 8, 8)
    total = maps["saliency"].sum((1, 2, 3))  # mass received = mass sent = sum of m over tokens, m in (0, 1)
    assert (total > 0).all() and (total < 64).all()
    paths = save_attention_maps((x * 0.5 + 0.5).clamp(0, 1), maps, tmp_path, max_images=1)
    assert len(paths) == 3 and all(p.stat().st_size > 0 for p in paths)


def test_parameter_counts():
    def count(name):
        with torch.device("meta"):
            return sum(p.numel() for p in zoo.get_spec(name).builder().parameters())

    def expected(dim, heads, ref):  # timm ViT without class token + head selector + message controller
        with torch.device("meta"):
            vit = timm.create_model(ref, class_token=False, global_pool="avg")
        return sum(p.numel() for p in vit.parameters()) + 12 * (dim * heads + dim * (dim // 2) + dim // 2)

    assert count("dependencyvit_tiny") == count("dependencyvit_lite_tiny") == expected(192, 3, "vit_tiny_patch16_224")
    small = expected(384, 6, "vit_small_patch16_224")
    assert count("dependencyvit_small") == count("dependencyvit_lite_small") == small
    assert count("dependencyvit_tiny") == 5_946_280 and count("dependencyvit_small") == 22_964_584


def test_bad_prune_config():
    with pytest.raises(ValueError, match="prune_layers"):
        DependencyViT(embed_dim=32, depth=2, num_heads=2, prune_layers=(3,), prune_ratio=0.1)
    with pytest.raises(ValueError, match="prune_ratio"):
        DependencyViT(embed_dim=32, depth=2, num_heads=2, prune_layers=(1, 2), prune_ratio=0.5)


# ---------------------------------------------------------------------------------------- timm surface
NAMES = ("dependencyvit_nano", "dependencyvit_lite_nano")


def _fresh(name: str, **kw) -> DependencyViT:
    torch.manual_seed(0)
    return zoo.create_model(name, num_classes=10, **kw).eval()


def test_contract_and_capabilities():
    from zoo.contract import ZooModel, capabilities, contract_violations

    for name in NAMES:
        net = _fresh(name)
        assert isinstance(net, ZooModel)
        assert capabilities(net).declared() == ["attention_maps", "bench_extras"]
        missing = {"lacks timm's pretrained_cfg", "lacks timm's default_cfg"}  # set by create_model (lead)
        assert [p for p in contract_violations(net, "classification") if p not in missing] == []


@pytest.mark.parametrize("name", NAMES)
def test_forward_head_pre_logits_and_reset_classifier(name):
    net = _fresh(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.forward_features(x)
        assert torch.equal(net(x), net.forward_head(feats))
        pooled = net.forward_head(feats, pre_logits=True)
        assert isinstance(net.num_features, int) and isinstance(net.head_hidden_size, int)
        assert pooled.shape == (2, net.head_hidden_size) and net.head_hidden_size == net.num_features == 64
        assert net.get_classifier() is net.head
        net.reset_classifier(5)
        assert net(x).shape == (2, 5) and net.get_classifier().out_features == 5
        net.reset_classifier(0)
        assert isinstance(net.get_classifier(), torch.nn.Identity)
        torch.testing.assert_close(net(x), pooled)  # pooled pre-logits [B, num_features]
        net.reset_classifier(0, global_pool="")
        out = net(x)
    assert out.shape == feats.shape == (2, 64 if name == "dependencyvit_nano" else 32, 64)  # unpooled tokens
    torch.testing.assert_close(out, feats)
    net.reset_classifier(0, global_pool="max")
    with torch.no_grad():
        torch.testing.assert_close(net(x), feats.amax(1))


def test_no_weight_decay_and_group_matcher():
    from timm.models._manipulate import group_parameters

    for name in NAMES:
        net = _fresh(name)
        params = dict(net.named_parameters())
        assert net.no_weight_decay() == {"pos_embed"} and set(net.no_weight_decay()) <= set(params)
        for coarse in (False, True):
            groups = group_parameters(net, net.group_matcher(coarse=coarse))
            grouped = [n for names in groups.values() for n in names]
            assert sorted(grouped) == sorted(params)  # every parameter in exactly one group
            assert len(groups) >= len(net.blocks)


def _saved_tensors(net, x) -> tuple[int, torch.Tensor]:
    return count_saved_tensors(lambda: net(x))


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_is_real(name):
    x = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        net = _fresh(name).train()  # no dropout / drop-path in the nano variants
        net.set_grad_checkpointing(enable)
        assert net.grad_checkpointing is enable
        saved, out = _saved_tensors(net, x)
        out.square().sum().backward()
        results.append((saved, out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (n_plain, out_plain, g_plain), (n_ckpt, out_ckpt, g_ckpt) = results
    assert n_ckpt < n_plain / 2, (n_ckpt, n_plain)
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=1e-5)
    assert g_ckpt.keys() == g_plain.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-5, rtol=1e-5, msg=n)


def _block_outputs(net, x) -> list[torch.Tensor]:
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0])) for b in net.blocks]
    with torch.no_grad():
        net.forward_features(x)
    for h in hooks:
        h.remove()
    return outs


def test_forward_intermediates_full_grid(nano):
    x = torch.randn(2, 3, 32, 48)  # dynamic image size: 8 x 12 patch grid
    blocks = _block_outputs(nano, x)
    with torch.no_grad():
        final, maps = nano.forward_intermediates(x)
        assert torch.equal(final, nano.forward_features(x))
        assert len(maps) == len(nano.feature_info) == 4
        for y, ref, info in zip(maps, blocks, nano.feature_info):
            assert y.shape == (2, info["num_chs"], 32 // info["reduction"], 48 // info["reduction"]) == (2, 64, 8, 12)
            torch.testing.assert_close(y.flatten(2).transpose(1, 2), ref)  # patch tokens on the grid, row-major
        assert [i["module"] for i in nano.feature_info] == [f"blocks.{i}" for i in range(4)]
        nlc = nano.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert len(nlc) == 2
        torch.testing.assert_close(nlc[0], blocks[0])
        torch.testing.assert_close(nlc[1], blocks[3])
        last2 = nano.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        torch.testing.assert_close(last2[0], nano.norm(blocks[2]).transpose(1, 2).reshape(2, 64, 8, 12))
        early_final, early = nano.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early[0], maps[1])
        torch.testing.assert_close(early_final, nano.norm(blocks[1]))
    with pytest.raises(ValueError, match="output_fmt"):
        nano.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_and_feature_getter():
    from timm.models._features import FeatureGetterNet

    net = _fresh("dependencyvit_nano")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert net.prune_intermediate_layers(indices=[1, -2]) == [1, 2]
    assert len(net.blocks) == 3 and isinstance(net.head, torch.nn.Identity) and net.global_pool == ""
    with torch.no_grad():
        torch.testing.assert_close(net.forward_intermediates(x, indices=[1, 2], intermediates_only=True), ref)

    net = FeatureGetterNet(_fresh("dependencyvit_nano"), out_indices=(0, 3))
    with torch.no_grad():
        maps = net(x)
    assert [m.shape[1] for m in maps] == net.feature_info.channels() == [64, 64]
    assert [32 // m.shape[-1] for m in maps] == net.feature_info.reduction() == [4, 4]


def test_lite_intermediates_only_before_the_first_pruning(lite_nano):
    from timm.models._features import FeatureGetterNet

    x = torch.randn(2, 3, 32, 32)
    assert lite_nano.features_unsupported is None  # block 0 keeps the grid
    assert lite_nano.feature_info == [dict(module="blocks.0", num_chs=64, reduction=4)]
    blocks = _block_outputs(lite_nano, x)
    with torch.no_grad():
        final, maps = lite_nano.forward_intermediates(x)  # None: every block in feature_info
        assert torch.equal(final, lite_nano.forward_features(x))
        assert len(maps) == 1 and maps[0].shape == (2, 64, 8, 8)
        torch.testing.assert_close(maps[0].flatten(2).transpose(1, 2), blocks[0])
        assert torch.equal(lite_nano.forward_intermediates(x, indices=[0], intermediates_only=True)[0], maps[0])
    for bad in ([1], [-1], 2, [0, 3]):
        with pytest.raises(ValueError, match=r"dynamic pooling.*dependency_masks\(\)/dependency_tree\(\)"):
            lite_nano.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="dynamic pooling"):
        FeatureGetterNet(_fresh("dependencyvit_lite_nano"), out_indices=(0, 1))
    net = FeatureGetterNet(_fresh("dependencyvit_lite_nano"), out_indices=(0,))
    assert len(net.model.blocks) == 1
    with torch.no_grad():
        out = net(x)
    assert [m.shape for m in out] == [(2, 64, 8, 8)] and net.feature_info.channels() == [64]


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_does_not_depend_on_batch_mates(name):
    net = _fresh(name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-5)


def test_sincos_pos_embed_start_is_the_shared_table():
    from timm.layers import build_sincos2d_pos_embed

    net = _fresh("dependencyvit_nano")
    torch.testing.assert_close(net.pos_embed.data, build_sincos2d_pos_embed([8, 8], 64).reshape(1, 64, 64))
    with pytest.raises(ValueError, match="pos_embed_init"):
        DependencyViT(embed_dim=32, depth=1, num_heads=2, pos_embed_init="zeros")
