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
