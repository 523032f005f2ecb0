"""Sparsifiner: connectivity mask, sparse execution, dense equivalence, training phases, FLOP accounting."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay

import zoo
from zoo.bench import _count_gmacs
from zoo.layers.sparse_attention import (csr_attention, gather_attention, masked_dense_attention, spmm,
                                         topk_indices_nonneg, topk_nonneg)
from zoo.models.sparsifiner import mhsa_macs
from conftest import count_saved_tensors

NANO = dict(num_classes=10)


def nano(**kw):
    torch.manual_seed(0)
    return zoo.create_model("sparsifiner_deit_nano", **{**NANO, **kw})


def test_mask_density_equals_keep_rate():
    m = nano(attn_keep_rate=0.25).eval()
    masks = m.connectivity(torch.randn(2, 3, 32, 32))
    n = m.num_tokens
    k = math.ceil(0.25 * n)
    for mask in masks:
        assert mask.shape == (2, m.blocks[0].attn.num_heads, n, n)
        assert torch.all(mask[:, :, 0] == 1)  # class-token row dense
        assert torch.all(mask[:, :, 1:].sum(-1) == k)  # exactly K keys per other query
        assert abs(mask[:, :, 1:].mean().item() - 0.25) <= 1 / n


def test_keep_rate_one_equals_dense_deit():
    m = nano(attn_keep_rate=1.0).eval()
    ref = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                            num_classes=10).eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if ".mask_predictor." not in k})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


def test_gather_execution_equals_masked_dense():
    torch.manual_seed(0)
    B, H, n, d, K = 2, 3, 33, 16, 9
    q, k, v = (torch.randn(B, H, n, d) for _ in range(3))
    idx = torch.rand(B, H, n, n).topk(K, -1).indices
    out = gather_attention(q, k, v, idx, d ** -0.5, chunk=50)  # several chunks
    ref = masked_dense_attention(q, k, v, idx, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full = torch.arange(n).expand(B, H, n, n)  # all keys kept == plain softmax attention
    dense = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, -1) @ v
    torch.testing.assert_close(gather_attention(q, k, v, full, d ** -0.5), dense, atol=1e-5, rtol=1e-5)


def test_csr_attention_with_dense_class_row_equals_masked_dense():
    torch.manual_seed(0)
    B, H, n, d, K = 2, 3, 33, 16, 9
    q, k, v = (torch.randn(B, H, n, d) for _ in range(3))
    idx = torch.rand(B, H, n - 1, n).topk(K, -1).indices
    mask = torch.zeros(B, H, n, n, dtype=torch.bool)
    mask[:, :, 0] = True  # class row dense
    mask[:, :, 1:] = mask[:, :, 1:].scatter(-1, idx, True)
    attn = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    out, cls_row = csr_attention(q, k, v, idx, d ** -0.5)
    torch.testing.assert_close(out, attn @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_row, attn[:, :, 0], atol=1e-6, rtol=1e-5)  # the pruning score
    assert (mask[:, :, 1:].sum(-1) == K).all()


def test_spmm_and_nonnegative_topk_match_torch():
    torch.manual_seed(0)
    cols, vals, table = torch.randint(0, 20, (50, 4)), torch.rand(50, 4), torch.randn(20, 7)
    dense = torch.zeros(50, 20).scatter_add_(1, cols, vals)
    torch.testing.assert_close(spmm(cols, vals, table), dense @ table, atol=1e-5, rtol=1e-5)
    offsets = torch.tensor([0, 3, 3, 10])  # rows of any length, one empty
    flat_c, flat_v = cols.view(-1)[:12], vals.view(-1)[:12]
    want = torch.stack([(flat_v[a:b, None] * table[flat_c[a:b]]).sum(0) for a, b in zip([0, 3, 3, 10], [3, 3, 10, 12])])
    torch.testing.assert_close(spmm(flat_c, flat_v, table, offsets), want, atol=1e-5, rtol=1e-5)
    x = torch.rand(6, 5, 197)
    x[0, 0, :10] = 0.0
    got, ref = topk_nonneg(x, 50), x.topk(50, -1, sorted=False)
    assert torch.equal(got[1].sort(-1).values, ref.indices.sort(-1).values)
    assert torch.equal(got[0].sort(-1).values, ref.values.sort(-1).values)
    big = torch.randperm(400 * 197).float().view(400, 197) / 1e3  # distinct scores: one right answer
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):  # numpy's argpartition over row blocks, one block per torch thread
            torch.set_num_threads(nt)
            got = topk_indices_nonneg(big.view(2, 200, 197), 50)
            assert got.shape == (2, 200, 50)
            assert torch.equal(got.view(400, 50).sort(-1).values, big.topk(50, -1).indices.sort(-1).values)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("prune", [(), (1, 2)])
def test_bench_counts_the_executed_sparse_work(prune):
    """The bench's FLOP counter sees the sparse kernels (SDDMM, embedding_bag SpMM): its count equals the
    analytic kept-entries + predictor formula, and is below the dense model's."""
    m = nano(token_pruning_loc=prune, token_keep_rate=0.7).eval()
    counted = _count_gmacs(m, torch.randn(1, 3, 32, 32))
    assert counted == pytest.approx(m.bench_extras(32)["total_gmacs_analytic"], rel=2e-3)
    assert counted < _count_gmacs(nano(attn_keep_rate=1.0).eval(), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("prune", [(), (1, 2)])
def test_model_sparse_executions_equal_masked(prune):
    x = torch.randn(2, 3, 32, 32)
    ref = nano(token_pruning_loc=prune, token_keep_rate=0.7, execution="masked").eval()
    with torch.no_grad():
        want = ref(x)
        for ex in ("gather", "csr"):
            m = nano(token_pruning_loc=prune, token_keep_rate=0.7, execution=ex).eval()
            m.load_state_dict(ref.state_dict())
            torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def _step(m, x, y):
    opt = torch.optim.AdamW(param_groups_weight_decay(m, 0.05, m.no_weight_decay()), lr=1e-2)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    _, losses = m.forward_train(x, y)
    sum(losses.values()).backward()
    opt.step()
    changed = {k for k, p in m.named_parameters() if not torch.equal(p, before[k])}
    return changed, losses


def test_phases_train_only_their_parameters(tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.save(nano(attn_keep_rate=1.0).state_dict(), teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    pred_names = {k for k, _ in nano().named_parameters() if ".mask_predictor." in k}

    m = nano(phase="predictor", teacher_ckpt=str(teacher))
    m.train()
    changed, losses = _step(m, x, y)
    assert set(losses) == {"attn_recon"}
    assert changed == pred_names
    assert "teacher" not in " ".join(m.state_dict())  # the teacher is not part of the student

    m = nano(phase="backbone", teacher_ckpt=str(teacher), freeze_pos_embed=True)
    m.load_state_dict(torch.load(teacher))
    m.train()
    changed, losses = _step(m, x, y)
    assert set(losses) == {"ce", "cls_distill", "token_distill"}
    assert changed and not (changed & pred_names)
    assert "pos_embed" not in changed and "cls_token" not in changed
    assert len(changed) == len([k for k, _ in m.named_parameters()]) - len(pred_names) - 2


def test_token_pruning_and_maps():
    m = nano(token_pruning_loc=(1, 2), token_keep_rate=0.7).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = m.connectivity(x)
    kept_last = math.ceil(0.7 ** 2 * (m.num_tokens - 1))
    assert int((masks[-1][0, 0, 0, 1:] > 0).sum()) == kept_last  # class row: the kept patches only
    maps = m.attention_maps(x)
    (name, a), = maps.items()
    g = m.patch_embed.grid_size
    assert a.shape == (2, 4, *g) and name == "connectivity_l3"
    m.train()
    _, losses = m.forward_train(x, torch.tensor([1, 2]))
    assert torch.isfinite(losses["ce"])


def test_small_mhsa_reduction_at_224():
    with torch.device("meta"):
        m = zoo.get_spec("sparsifiner_deit_small").builder(attn_keep_rate=0.25)
    extras = m.bench_extras(224)
    assert extras["mhsa_flops_reduction"] >= 0.48
    dense, sparse, pred = mhsa_macs(m)
    assert dense == pytest.approx(12 * 2 * 197 * 197 * 384)


LV_SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=3.0, qkv_bias=False,
                p_emb="4_2", skip_lam=2.0, aux_head=True, norm_eps=1e-5, num_classes=10)


def test_lvvit_small_matches_official_parameter_counts():
    with torch.device("meta"):
        m = zoo.get_spec("sparsifiner_lvvit_small").builder()
    total = sum(p.numel() for p in m.parameters())
    backbone = sum(p.numel() for k, p in m.named_parameters() if ".mask_predictor." not in k)
    assert backbone == 26_151_824  # TokenLabeling's lvvit_s, counted side by side
    assert total == 26_420_112  # the official SparsifinerLVViT (reduce_n_factor 6), counted side by side
    assert {"patch_embed.conv1.weight", "patch_embed.bn3.running_var", "aux_head.weight"} <= set(m.state_dict())


def test_lvvit_token_labeling_head_and_skip_lam():
    from zoo.models.sparsifiner import Sparsifiner

    torch.manual_seed(0)
    m = Sparsifiner(**LV_SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        cls = m.head(feats[:, 0])
        torch.testing.assert_close(m(x), cls + 0.5 * m.aux_head(feats[:, 1:]).max(1)[0])  # eval: as the code
        m.train()
        torch.testing.assert_close(m.forward_head(feats), m.eval()(x))  # no teacher: CE trains both heads
        m.teacher_ckpt = "teacher.pt"  # with a teacher: class-token logits only, as the code
        torch.testing.assert_close(m.train().forward_head(feats), cls)
        m.teacher_ckpt = None
        blk, t = m.blocks[0], torch.randn(2, m.num_tokens, 64)
        blk.eval()
        want = t + blk.attn(blk.norm1(t)) / 2
        torch.testing.assert_close(blk(t), want + blk.mlp(blk.norm2(want)) / 2)
    counted = _count_gmacs(m.eval(), x[:1])  # the conv stem and the token head are in the analytic count
    assert counted == pytest.approx(m.bench_extras(32)["total_gmacs_analytic"], rel=2e-3)


def test_lvvit_phase_two_distills_token_head_outputs(tmp_path):
    from zoo.models.sparsifiner import Sparsifiner

    torch.manual_seed(0)
    teacher = tmp_path / "lvvit_teacher.pt"
    torch.save(Sparsifiner(**LV_SMALL, attn_keep_rate=1.0).state_dict(), teacher)
    m = Sparsifiner(**LV_SMALL, teacher_ckpt=str(teacher))
    m.load_state_dict(torch.load(teacher), strict=False)
    m.train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    logits, losses = m.forward_train(x, y)
    assert set(losses) == {"ce", "cls_distill", "token_distill"} and logits.shape == (3, 10)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.aux_head.weight.grad is not None  # the token head learns from the token distillation


def test_published_weights_download_once_and_fail_offline_with_advice(tmp_path, monkeypatch):
    import urllib.error

    import torch.hub

    from zoo.errors import WeightsError
    from zoo.models.sparsifiner import Sparsifiner, _create

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    src = Sparsifiner(**LV_SMALL, attn_keep_rate=1.0)
    calls = []

    def fake_fetch(url, dst, progress=True):  # stands in for the network: writes the release file
        calls.append(url)
        torch.save({k: v for k, v in src.state_dict().items() if ".mask_predictor." not in k}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_fetch)
    url = "https://example.invalid/releases/lvvit_tiny_test.pth.tar"
    m = _create(True, None, url=url, **LV_SMALL)
    m2 = _create(True, None, url=url, **LV_SMALL)  # cached: no second download
    assert calls == [url]
    for model in (m, m2):
        assert torch.equal(model.patch_embed.conv2.weight, src.patch_embed.conv2.weight)
        assert torch.equal(model.aux_head.weight, src.aux_head.weight)

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="pretrained_file="):
        _create(True, None, url="https://example.invalid/other.pth", **LV_SMALL)
    assert not list((tmp_path / "torch").rglob("*.part"))


# ---------------------------------------------------------------------------------------- timm surface
def _lvvit(**kw):
    torch.manual_seed(0)
    return zoo.create_model("sparsifiner_lvvit_small", **{**LV_SMALL, **kw})  # the registered LV-ViT, made small


SURFACE_NETS = {"deit": lambda **kw: nano(**kw), "lvvit": lambda **kw: _lvvit(**{"depth": 4, **kw})}  # 4 blocks each


@pytest.mark.parametrize("arch", SURFACE_NETS)
@pytest.mark.parametrize("prune", [(), (1,)])
def test_contract_and_capabilities(arch, prune):
    from zoo.contract import ZooModel, capabilities, contract_violations

    m = SURFACE_NETS[arch](token_pruning_loc=prune, token_keep_rate=0.7)
    assert isinstance(m, ZooModel)
    assert contract_violations(m, "classification") == []
    assert capabilities(m).declared() == ["own_objective", "attention_maps", "bench_extras"]
    assert isinstance(m.num_features, int) and isinstance(m.head_hidden_size, int)
    assert m.num_features == m.head_hidden_size == m.embed_dim


@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_forward_is_head_of_features_and_pre_logits(arch):
    m = SURFACE_NETS[arch]().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert torch.equal(m(x), m.forward_head(feats))
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, m.head_hidden_size)
        torch.testing.assert_close(pre, feats[:, 0])  # the class token, LV-ViT's too (the aux term is logits only)
        want = m.head(pre) if m.aux_head is None else m.head(pre) + 0.5 * m.aux_head(feats[:, 1:]).amax(1)
        torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_reset_classifier(arch):
    m = SURFACE_NETS[arch]().eval()
    x = torch.randn(2, 3, 32, 32)
    assert m.get_classifier() is m.head
    with torch.no_grad():
        m.reset_classifier(5)
        assert m.get_classifier() is m.head and m.head.out_features == 5
        assert m(x).shape == (2, 5)
        if arch == "lvvit":  # the token-labeling head follows the class count, eval logits keep their form
            assert m.aux_head.out_features == 5 and not m.aux_head.training
            f = m.forward_features(x)
            torch.testing.assert_close(m(x), m.head(f[:, 0]) + 0.5 * m.aux_head(f[:, 1:]).amax(1))
        m.reset_classifier(0)
        assert m.aux_head is None
        feats = m.forward_features(x)
        torch.testing.assert_close(m(x), feats[:, 0])  # pooled pre-logits
        assert m(x).shape == (2, m.num_features)
        m.reset_classifier(0, global_pool="avg")
        torch.testing.assert_close(m(x), feats[:, 1:].mean(1))
        m.reset_classifier(0, global_pool="")
        torch.testing.assert_close(m(x), feats)  # unpooled tokens
        m.reset_classifier(3, global_pool="token")
        assert m(x).shape == (2, 3)
        if arch == "lvvit":
            assert m.aux_head.out_features == 3
    if arch == "lvvit":  # built without classes: reset_classifier still adds the token-labeling head
        m = _lvvit(num_classes=0)
        assert m.aux_head is None and m(x).shape == (2, m.num_features)
        m.reset_classifier(4)
        assert m.aux_head.out_features == 4 and m.eval()(x).shape == (2, 4)


@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_no_weight_decay_and_group_matcher_cover_every_parameter(arch):
    import re

    from timm.models._manipulate import group_parameters

    m = SURFACE_NETS[arch]()
    names = [k for k, _ in m.named_parameters()]
    assert m.no_weight_decay() == {"pos_embed", "cls_token"} and m.no_weight_decay() <= set(names)  # the code's set
    for coarse in (False, True):
        matcher = m.group_matcher(coarse=coarse)
        patterns = [p for spec in matcher.values() for p in ([s[0] for s in spec] if isinstance(spec, list) else [spec])]
        unmatched = [k for k in names if not any(re.match(p, k) for p in patterns)]
        assert unmatched == []
        groups = group_parameters(m, matcher)
        assert sorted(k for g in groups.values() for k in g) == sorted(names)
    groups = group_parameters(m, m.group_matcher())
    assert len(groups) == 1 + len(m.blocks) + 1  # stem, one per block (with its predictor), heads
    assert any(k.startswith("blocks.0.attn.mask_predictor.") for k in groups[1])
    assert "norm.weight" in groups[len(m.blocks)]  # timm's MATCH_PREV_GROUP: the final norm joins the last block
    assert "head.weight" in groups[len(m.blocks) + 1]


def _saved_count(fn):
    n, out = count_saved_tensors(fn)
    return out, n


@pytest.mark.parametrize("phase,prune,arch", [("backbone", (), "deit"), ("backbone", (1, 2), "deit"),
                                              ("predictor", (), "deit"), ("predictor", (1,), "deit"),
                                              ("backbone", (), "lvvit")])
def test_grad_checkpointing_is_real_and_exact(tmp_path, phase, prune, arch):
    """Same losses and gradients with and without checkpointing (drop-path on, seeded), fewer saved tensors,
    and the recorded pass state (approximate attention for the phase-one loss, token subsets) not doubled
    by the recomputation in backward."""
    make = SURFACE_NETS[arch]
    teacher = tmp_path / "t.pt"
    torch.save(make(attn_keep_rate=1.0).state_dict(), teacher)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    runs = []
    for ckpt in (False, True):
        m = make(phase=phase, token_pruning_loc=prune, token_keep_rate=0.7, drop_path_rate=0.1,
                 teacher_ckpt=str(teacher) if phase == "backbone" else None).train()
        m.set_grad_checkpointing(ckpt)
        assert m.grad_checkpointing is ckpt
        torch.manual_seed(1)
        (logits, losses), saved = _saved_count(lambda: m.forward_train(x, y))
        sum(losses.values()).backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        runs.append((logits.detach(), {k: v.detach() for k, v in losses.items()}, grads, saved))
    (l0, loss0, g0, s0), (l1, loss1, g1, s1) = runs
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for k in loss0:
        torch.testing.assert_close(loss1[k], loss0[k], atol=1e-5, rtol=1e-5)
    assert g0 and set(g1) == set(g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-5)
    assert s1 < s0 / 2, (s1, s0)

    from zoo.layers.sparsifiner_attention import SparseContext

    m.train().zero_grad()
    ctx = SparseContext(mode="recon" if phase == "predictor" else "sparse", record_attn=phase == "predictor", record_idx=True)
    out = m.forward_features(x, ctx)
    lengths = [len(ctx.approx), len(ctx.attn), len(ctx.idx), len(ctx.keeps)]
    (out.sum() + sum(a.sum() for a in ctx.approx)).backward()
    assert [len(ctx.approx), len(ctx.attn), len(ctx.idx), len(ctx.keeps)] == lengths
    assert len(ctx.idx) == len(m.blocks) and len(ctx.approx) == (len(m.blocks) if phase == "predictor" else 0)
    if prune and phase == "backbone":  # phase one's dense fit does not prune
        assert ctx.keep.shape[1] == 1 + min(m.token_budgets.values())


@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_forward_intermediates_timm_semantics(arch):
    m = SURFACE_NETS[arch]().eval()
    x = torch.randn(2, 3, 32, 32)
    g = m.patch_embed.grid_size
    depth, D = len(m.blocks), m.embed_dim
    assert m.features_unsupported is None
    assert m.feature_info == [dict(module=f"blocks.{i}", num_chs=D, reduction=4) for i in range(depth)]
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.equal(final, m.forward_features(x))
        assert len(inter) == depth and all(t.shape == (2, D, *g) for t in inter)
        last = m.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(last, final[:, 1:].transpose(1, 2).reshape(2, D, *g))  # prefix token dropped
        two = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(two, inter[-2:])] == [True, True]
        picked = m.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert [t.shape for t in picked] == [(2, g[0] * g[1], D)] * 2
        torch.testing.assert_close(picked[0].transpose(1, 2).reshape(2, D, *g), inter[0])
        early = m.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
        with_prefix = m.forward_intermediates(x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
        assert with_prefix[0][1].shape == (2, 1, D)
        with pytest.raises(ValueError, match="output_fmt"):
            m.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_prune_intermediate_layers_and_feature_getter(arch):
    from timm.models._features import FeatureGetterNet

    x = torch.randn(2, 3, 32, 32)
    ref = SURFACE_NETS[arch]().eval()
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    m = SURFACE_NETS[arch]().eval()
    assert m.prune_intermediate_layers(indices=[0, 2]) == [0, 2]
    assert len(m.blocks) == 3 and m.aux_head is None and isinstance(m.head, torch.nn.Identity)
    with torch.no_grad():
        got = m.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert m(x).shape == (2, m.num_tokens, m.embed_dim)  # head pruned: unpooled features

    net = FeatureGetterNet(SURFACE_NETS[arch]().eval(), out_indices=(1, -1))
    with torch.no_grad():
        maps = net(x)
    info = net.feature_info
    assert [t.shape[1] for t in maps] == info.channels() == [64, 64]
    assert [32 // t.shape[-1] for t in maps] == info.reduction() == [4, 4]
    assert info.module_name() == ["blocks.1", f"blocks.{len(ref.blocks) - 1}"]


@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_features_only_through_create_model(arch):
    name = {"deit": "sparsifiner_deit_nano", "lvvit": "sparsifiner_lvvit_small"}[arch]
    kw = {} if arch == "deit" else {k: v for k, v in LV_SMALL.items() if k != "num_classes"}
    net = zoo.create_model(name, features_only=True, out_indices=(0, 2), **{**kw, "depth": 4})
    with torch.no_grad():
        maps = net.eval()(torch.randn(2, 3, 32, 32))
    assert [m.shape for m in maps] == [(2, 64, 8, 8)] * 2
    assert net.feature_info.channels() == [64, 64] and net.feature_info.reduction() == [4, 4]
    with pytest.raises(Exception, match=r"token_pruning_loc=\(\)"):
        zoo.create_model(name, features_only=True, token_pruning_loc=(1,), **kw)


def test_token_pruning_refuses_intermediates_with_the_reason():
    from zoo.models.sparsifiner import Sparsifiner

    m = nano(token_pruning_loc=(1, 2), token_keep_rate=0.7).eval()
    assert Sparsifiner.features_unsupported is None  # per instance: only pruned models lack the grid
    assert "token_pruning_loc=()" in m.features_unsupported and "attention_maps" in m.features_unsupported
    assert m.feature_info == []
    for call in (lambda: m.forward_intermediates(torch.randn(1, 3, 32, 32)),
                 lambda: m.prune_intermediate_layers(1)):
        with pytest.raises(NotImplementedError, match=r"token_pruning_loc=\(\)"):
            call()
    assert len(m.blocks) == 4  # nothing was pruned before refusing
    assert nano().features_unsupported is None


@pytest.mark.parametrize("prune", [(), (1, 2)])
@pytest.mark.parametrize("arch", SURFACE_NETS)
def test_eval_output_independent_of_batch_mates(arch, prune):
    m = SURFACE_NETS[arch](token_pruning_loc=prune, token_keep_rate=0.7).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:1], m(x[:1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x)[2:], m(x[2:]), atol=1e-5, rtol=1e-5)


def test_sincos_position_start_is_the_shared_one():
    from zoo.layers.pos_embed import init_sincos_pos_embed_
    from zoo.models.sparsifiner import Sparsifiner

    m = nano()  # the nano builder starts from sin-cos
    want = torch.empty_like(m.pos_embed)
    init_sincos_pos_embed_(want, m.patch_embed.grid_size, m.embed_dim)
    assert torch.equal(m.pos_embed.detach(), want) and m.pos_embed.requires_grad
    assert not torch.equal(nano(pos_embed_init="trunc_normal").pos_embed.detach(), want)
    with pytest.raises(ValueError, match="pos_embed_init"):
        Sparsifiner(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, pos_embed_init="zeros")
