"""DCAL: batch independence at inference, attention rollout, GLCA query count, PWCA weight sharing, loss, weights."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import zoo
from zoo.models.dcal import _bar, rollout_cls_row


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
    torch.testing.assert_close(_bar(s), 0.5 * s + 0.5 * torch.eye(5))
    torch.testing.assert_close(rollout_cls_row([s, s]), (_bar(s) @ _bar(s))[:, 0])


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
    ce = [F.cross_entropy(m.forward_head(o["sa"]), y), F.cross_entropy(m._glca_logits(o["glca"]), y),
          F.cross_entropy(m.forward_head(o["pwca"]), y)]
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
