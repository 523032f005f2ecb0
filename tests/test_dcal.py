"""DCAL: batch independence at inference, attention rollout, GLCA query count, PWCA weight sharing, loss, weights."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import zoo
from zoo.layers.cross_attention import residual_attention, rollout_cls_row
from conftest import count_saved_tensors


def nano(**kw):
    torch.manual_seed(0)
    return zoo.create_model("dcal_deit_nano", num_classes=10, **kw)


def test_eval_output_independent_of_batch_mates():
    m = nano().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = m(x)
        for i in range(4):
            torch.testing.assert_close(m(x[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)
        other = torch.cat([x[:1], torch.randn(3, 3, 32, 32)])
        torch.testing.assert_close(m(other)[:1], full[:1], atol=1e-5, rtol=1e-5)


def test_rollout_rows_sum_to_one_and_fast_class_row_matches():
    m = nano().eval()
    x = torch.randn(2, 3, 32, 32)
    r = m.rollout(x)
    assert r.shape == (2, 65, 65)
    assert (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 65))
    o = m._run(x)
    torch.testing.assert_close(o["rollout"], r[:, 0], atol=1e-6, rtol=1e-5)  # row-vector propagation
    s = torch.softmax(torch.randn(3, 5, 5), -1)
    torch.testing.assert_close(residual_attention(s), 0.5 * s + 0.5 * torch.eye(5))
    torch.testing.assert_close(rollout_cls_row([s, s]), (residual_attention(s) @ residual_attention(s))[:, 0])


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
def test_number_of_selected_queries_follows_ratio(ratio):
    m = nano(glca_ratio=ratio).eval()
    x = torch.randn(2, 3, 32, 32)
    n = 64
    R = max(1, round(ratio * n))
    idx = m.selected_tokens(x)
    assert idx.shape == (2, R)
    o = m._run(x)
    assert o["glca"].shape == (2, 1 + R, 64)  # class token + R queries
    top = o["rollout"][:, 1:].topk(R, dim=1).indices.sort(1).values  # the R largest of the class row
    assert torch.equal(idx, top)
    maps = m.attention_maps(x)
    assert maps["glca_queries"].shape == (2, 1, 32, 32)
    assert set(maps["glca_queries"].unique().tolist()) <= {0.0, 1.0}
    assert torch.all(maps["glca_queries"].sum((1, 2, 3)) == R * 16)  # R patches of 4 x 4 pixels
    assert maps["rollout"].shape == (2, 1, 8, 8) and maps["glca_cls_attention"].shape == (2, 4, 8, 8)
    # 448 px, patch 16: 784 patches -> 78 queries (the paper's "about 78")
    assert m.num_selected(784) == max(1, round(ratio * 784))


def test_pwca_shares_self_attention_parameters():
    both, sa_only = nano(glca=False, pwca=True), nano(glca=False, pwca=False)
    names = {n for n, _ in both.named_parameters()}
    assert names - {n for n, _ in sa_only.named_parameters()} == {"loss_log_vars"}  # PWCA owns no weights
    # the PWCA branch backpropagates into the very Parameter objects of the SA blocks, norm and head
    m = nano().train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = m.forward_train(x, y)
    sa_params = {id(p) for n, p in m.named_parameters() if n.startswith(("blocks.", "norm.", "head."))}
    grads = torch.autograd.grad(losses["pwca"], [p for p in m.parameters()], allow_unused=True)
    got = {id(p) for p, g in zip(m.parameters(), grads) if g is not None and g.abs().sum() > 0}
    assert sa_params <= got
    assert not any(id(p) in got for n, p in m.named_parameters() if n.startswith("glca_"))
    # identical partner -> [K; K] keys: the joint softmax gives SA's output exactly (same weights, same math)
    m.eval()
    x1 = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        o = m._run(x1, pwca=True)
    torch.testing.assert_close(o["pwca"], o["sa"], atol=1e-5, rtol=1e-5)


def test_uncertainty_weighted_loss_and_inference_fusion():
    m = nano(loss_weight_init=[0.5, -0.2, 0.1]).eval()
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    torch.manual_seed(2)
    scores, losses = m.forward_train(x, y)
    assert set(losses) == {"sa", "glca", "pwca"}
    torch.manual_seed(2)
    o = m._run(x, pwca=True)
    ce = [F.cross_entropy(m._sa_logits(o["sa"]), y), F.cross_entropy(m._glca_logits(o["glca"]), y),
          F.cross_entropy(m._sa_logits(o["pwca"]), y)]
    w = [0.5, -0.2, 0.1]
    want = 0.5 * sum(math.exp(-wi) * c + wi for wi, c in zip(w, ce))
    torch.testing.assert_close(sum(losses.values()), want)
    sum(losses.values()).backward()
    assert m.loss_log_vars.grad is not None and torch.all(m.loss_log_vars.grad != 0)
    with torch.no_grad():
        out, b = m(x), m.branch_logits(x)
    p = (b["sa"].softmax(-1) + b["glca"].softmax(-1)) / 2
    torch.testing.assert_close(out.exp(), p)  # log of the mean probability: argmax = argmax of the sum
    torch.testing.assert_close(scores.exp(), p)


def test_sa_only_is_plain_deit_and_params_plus_nine_percent():
    m = nano(glca=False, pwca=False).eval()
    ref = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                            num_classes=10, dynamic_img_size=True).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
        # inference="sa" of the full model is its SA branch alone
        full = nano(inference="sa").eval()
        torch.testing.assert_close(full(x), full.branch_logits(x)["sa"], atol=1e-5, rtol=1e-5)
    with torch.device("meta"):  # GLCA adds about 9% parameters to DeiT-T (CUB: 200 classes)
        d = zoo.get_spec("dcal_deit_tiny").builder(num_classes=200)
        t = timm.create_model("deit_tiny_patch16_224", num_classes=200)
    extra = sum(p.numel() for p in d.parameters()) / sum(p.numel() for p in t.parameters()) - 1
    assert 0.08 < extra < 0.10


def test_timm_weights_at_448_with_glca_from_last_block(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "deit_tiny.pt"
    torch.save(src.state_dict(), path)
    m = zoo.create_model("dcal_deit_tiny", num_classes=200, img_size=448, pretrained_file=str(path))
    assert m.pos_embed.shape == (1, 1 + 28 * 28, 192)
    sd = m.state_dict()
    for k, v in src.state_dict().items():
        if k.startswith("blocks.11."):
            assert torch.equal(sd["glca_block." + k[len("blocks.11."):]], v)
        elif k != "pos_embed" and not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    assert torch.equal(sd["glca_norm.weight"], src.state_dict()["norm.weight"])
    assert m.glca_head.weight.shape == (200, 192)
    # a distilled DeiT file (dist token, second head) loads too
    dist = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=1000).state_dict()
    torch.save(dist, path)
    zoo.create_model("dcal_deit_tiny", num_classes=1000, pretrained_file=str(path))


def test_glca_input_parallel_reading_and_bench_extras():
    m = nano(glca_input=3).eval()
    x = torch.randn(2, 3, 32, 32)
    r = m.rollout(x)  # over blocks 1..3 only
    torch.testing.assert_close(m._run(x)["rollout"], r[:, 0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="glca_input"):
        nano(glca_input=5)
    e = zoo.create_model("dcal_deit_tiny", num_classes=1000).bench_extras(224)
    assert e["glca_queries"] == 21 and 0.015 < e["glca_macs_overhead"] < 0.025  # paper: about +2% FLOPs


# ------------------------------------------------------------------ timm model surface
from timm.models._features import FeatureGetterNet  # noqa: E402
from timm.models._manipulate import group_parameters  # noqa: E402

from zoo.contract import Capabilities, ZooModel, capabilities, contract_violations  # noqa: E402
from zoo.layers.pos_embed import init_sincos_pos_embed_  # noqa: E402


def _x(b=2):
    torch.manual_seed(3)
    return torch.randn(b, 3, 32, 32)


def test_contract_capabilities_and_shared_sincos_start():
    m = nano()
    assert isinstance(m, ZooModel)
    assert contract_violations(m, "classification") == []
    assert capabilities(m) == Capabilities(own_objective=True, attention_maps=True, bench_extras=True,
                                           feature_objective=True)
    want = torch.zeros_like(m.pos_embed)
    init_sincos_pos_embed_(want, m.patch_embed.grid_size, 64)
    assert torch.equal(m.pos_embed.detach(), want)  # the shared sin-cos start, class row zero
    with pytest.raises(ValueError, match="pos_embed_init"):
        nano(pos_embed_init="nope")


@pytest.mark.parametrize("kw, tokens, hidden", [
    ({}, 66, 128), (dict(inference="glca"), 66, 64), (dict(inference="sa"), 65, 64), (dict(glca=False), 65, 64)])
def test_forward_is_head_of_features(kw, tokens, hidden):
    m = nano(**kw).eval()
    x = _x()
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (2, tokens, 64) and m.num_features == 64 and m.head_hidden_size == hidden
        assert torch.equal(m.forward_head(f), m(x))
        pre = m.forward_head(f, pre_logits=True)
        assert pre.shape == (2, hidden)
        o = m._run(x)
        b = m.branch_logits(x)
    torch.testing.assert_close(f[:, 0], o["sa"][:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f[:, -64:], o["sa"][:, 1:], atol=1e-6, rtol=1e-5)  # the SA patch tokens
    if tokens == 66:  # the GLCA class token second
        torch.testing.assert_close(f[:, 1], o["glca"][:, 0], atol=1e-6, rtol=1e-5)
    want = {"sum": torch.cat([o["sa"][:, 0], o.get("glca", o["sa"])[:, 0]], -1) if hidden == 128 else None,
            "glca": o.get("glca", o["sa"])[:, 0], "sa": o["sa"][:, 0]}[m.inference]
    torch.testing.assert_close(pre, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        out = m(x)
    if m.inference == "sum":
        torch.testing.assert_close(out.exp(), (b["sa"].softmax(-1) + b["glca"].softmax(-1)) / 2)
    else:
        torch.testing.assert_close(out, b[m.inference], atol=1e-5, rtol=1e-5)


def test_glca_class_token_does_not_depend_on_selected_queries():
    """Why forward_features can leave the R local query outputs out: with M = 1 they never reach the class token."""
    m = nano().eval()
    with torch.no_grad():
        o = m._run(_x())
        other = torch.randperm(64)[:6].sort().values.expand(2, -1)
        g = m.glca_block(o["glca_in"], other)
    assert not torch.equal(other, o["glca_idx"])
    torch.testing.assert_close(m.glca_norm(g)[:, 0], o["glca"][:, 0], atol=1e-6, rtol=1e-5)


def test_reset_classifier_both_heads_and_pooling():
    m = nano().eval()
    x = _x()
    with torch.no_grad():
        f = m.forward_features(x)
        pre = m.forward_head(f, pre_logits=True)
    assert m.get_classifier() is m.head
    m.reset_classifier(0)
    assert isinstance(m.head, torch.nn.Identity) and isinstance(m.glca_head, torch.nn.Identity)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, m.head_hidden_size) == (2, 128)
    torch.testing.assert_close(out, pre)  # pre-logits features, not fused log-probabilities
    m.reset_classifier(5)
    assert m.glca_head.out_features == 5 and m.head.out_features == 5 and m.num_classes == 5
    with torch.no_grad():
        out = m(x)
        b = m.branch_logits(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.exp(), (b["sa"].softmax(-1) + b["glca"].softmax(-1)) / 2)
    m.reset_classifier(0, global_pool="")
    with torch.no_grad():
        tok = m(x)
    torch.testing.assert_close(tok, f)  # unpooled tokens
    m.reset_classifier(7, global_pool="")
    with torch.no_grad():
        per_token = m(x)
    assert per_token.shape == (2, 66, 7)
    torch.testing.assert_close(per_token[:, 1], m.glca_head(f[:, 1]))  # the GLCA class token: GLCA's classifier
    torch.testing.assert_close(per_token[:, 2:], m.head(f[:, 2:]))
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="avg")
    m.reset_classifier(4, global_pool="token")
    y = torch.tensor([0, 3])
    m.train()
    scores, losses = m.forward_train(x, y)  # training still works after a reset
    assert scores.shape == (2, 4) and set(losses) == {"sa", "glca", "pwca"}


def test_no_weight_decay_and_group_matcher_cover_every_parameter():
    import re

    m = nano()
    names = [n for n, _ in m.named_parameters()]
    assert m.no_weight_decay() <= set(names) and {"pos_embed", "cls_token", "loss_log_vars"} <= m.no_weight_decay()
    for coarse in (False, True):
        gm = m.group_matcher(coarse=coarse)
        pats = [v for v in gm.values() if isinstance(v, str)]
        pats += [p for v in gm.values() if isinstance(v, list) for p, _ in v]
        assert all(any(re.match(p, n) for p in pats) for n in names)
        groups = group_parameters(m, gm)
        assert sorted(n for g in groups.values() for n in g) == sorted(names)
        where = {n: i for i, g in groups.items() for n in g}
        assert where["glca_block.attn.qkv.weight"] == where["blocks.3.attn.qkv.weight"]  # the last block's group
        assert where["glca_head.weight"] == where["head.weight"] == max(groups)
        assert where["patch_embed.proj.weight"] == where["pos_embed"] == 0


def _saved_tensors(fn):
    n, out = count_saved_tensors(fn)
    return out, n


@pytest.mark.parametrize("kw", [{}, dict(glca=False, pwca=False)])
def test_grad_checkpointing_is_real(kw):
    m = nano(**kw).train()
    x, y = _x(4), torch.tensor([1, 2, 3, 4])

    def step():
        torch.manual_seed(5)  # the same PWCA partners
        _, losses = m.forward_train(x, y)
        return sum(losses.values())

    results = []
    for enable in (False, True):
        m.set_grad_checkpointing(enable)
        m.zero_grad()
        loss, saved = _saved_tensors(step)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), saved, grads))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == len(list(m.parameters()))
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5, msg=n)
    assert s1 < s0 / 2, (s1, s0)
    # forward / forward_features honour it too
    m.set_grad_checkpointing(False)
    f0, n0 = _saved_tensors(lambda: m.forward_features(x))
    m.set_grad_checkpointing(True)
    f1, n1 = _saved_tensors(lambda: m.forward_features(x))
    torch.testing.assert_close(f1, f0, atol=1e-6, rtol=1e-5)
    assert n1 < n0


def test_forward_intermediates_match_timm_vit_over_the_sa_blocks():
    m = nano().eval()
    ref = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                            num_classes=10, dynamic_img_size=True).eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(("glca_", "loss_"))})
    x = _x()
    with torch.no_grad():
        final, maps = m.forward_intermediates(x)
        assert torch.equal(final, m.forward_features(x))
        _, want = ref.forward_intermediates(x)
        assert [t.shape for t in maps] == [(2, 64, 8, 8)] * 4
        for a, b in zip(maps, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for kw in (dict(indices=2), dict(indices=[0, -1]), dict(indices=[1], norm=True, output_fmt="NLC"),
                   dict(indices=[-3], stop_early=True)):
            got = m.forward_intermediates(x, intermediates_only=True, **kw)
            exp = ref.forward_intermediates(x, intermediates_only=True, **kw)
            assert len(got) == len(exp)
            for a, b in zip(got, exp):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        (t, cls), = m.forward_intermediates(x, indices=[-1], intermediates_only=True, return_prefix_tokens=True)
        assert t.shape == (2, 64, 8, 8) and cls.shape == (2, 1, 64)
    assert m.feature_info == [dict(module=f"blocks.{i}", num_chs=64, reduction=4) for i in range(4)]
    assert all(m.get_submodule(i["module"]) is m.blocks[k] for k, i in enumerate(m.feature_info))
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_prune_and_feature_getter_net():
    m = nano().eval()
    x = _x()
    with torch.no_grad():
        want = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    net = FeatureGetterNet(nano().eval(), out_indices=(1, 3))
    with torch.no_grad():
        maps = net(x)
    assert [tuple(t.shape) for t in maps] == [(2, 64, 8, 8)] * 2
    assert [(i["num_chs"], i["reduction"]) for i in net.feature_info.get_dicts()] == [(64, 4)] * 2
    for a, b in zip(maps, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    zoo_net = zoo.create_model("dcal_deit_nano", num_classes=10, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        for a, b in zip(zoo_net(x), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert zoo_net.feature_info.channels() == [64, 64] and zoo_net.feature_info.reduction() == [4, 4]
    m = nano().eval()
    assert m.prune_intermediate_layers(indices=[0, -3]) == [0, 1]
    assert len(m.blocks) == 2 and not hasattr(m, "glca_block") and m.head_hidden_size == 64
    assert not any(n.startswith(("glca_", "loss_")) for n, _ in m.named_parameters())
    with torch.no_grad():
        assert m(x).shape == (2, 65, 64)  # a plain ViT feature extractor: the normed tokens
    assert nano().prune_intermediate_layers(indices=2, prune_head=False) == [2, 3]  # keeps the 4 blocks GLCA reads
    with pytest.raises(ValueError, match="GLCA"):
        nano().prune_intermediate_layers(indices=[1], prune_head=False)
    m = nano().eval()
    with torch.no_grad():
        before = m(x)
    assert m.prune_intermediate_layers(indices=[3], prune_head=False) == [3]
    with torch.no_grad():
        assert torch.equal(m(x), before)  # nothing cut: GLCA and both heads stay


def test_eval_features_and_pre_logits_independent_of_batch_mates():
    m = nano().eval()
    m.reset_classifier(0)
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:1], m(x[:1]), atol=1e-5, rtol=1e-5)
        _, full = m.forward_intermediates(x)
        _, one = m.forward_intermediates(x[:1])
    for a, b in zip(full, one):
        torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-5)
