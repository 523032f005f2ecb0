"""Prompt-CAM: frozen backbone, prompt row c = class c, attention rows, greedy head ranking, weights paths."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.test_vit_nano import (check_batch_independent, check_contract, check_feature_getter,
                                 check_grad_checkpointing, check_group_matcher)
from zoo.contract import capabilities
from zoo.models.prompt_cam import PromptCAM, checkpoint_filter_fn


def _net(**kw) -> PromptCAM:
    torch.manual_seed(0)
    return zoo.create_model("promptcam_vit_nano", **{"num_classes": 5, **kw})


def _x(b: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, 32, 32)


def test_backbone_gets_no_grad_and_stays_unchanged_after_a_step():
    net = _net().train()
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    prompts0 = net.prompts.detach().clone()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["prompts", "head.weight", "head.bias"]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    loss = torch.nn.functional.cross_entropy(net(_x()), torch.tensor([0, 1, 2]))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert net.prompts.grad is not None and net.prompts.grad[:-1].abs().sum() > 0  # deep prompts of every layer learn
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(prompts0, net.prompts.detach())


def test_trainable_count_is_prompts_plus_shared_head():
    with torch.device("meta"):
        net = zoo.get_spec("promptcam_vit_base_dino").builder(num_classes=200)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == 12 * 200 * 768 + 768 + 1  # the code's count for CUB (vpt + head)


def test_prompt_row_c_scores_class_c():
    net = _net().eval()
    x = _x()
    logits = net(x)
    feats = net.forward_features(x)
    torch.testing.assert_close(logits[:, 3], net.head(feats[:, 3]).squeeze(-1))
    with torch.no_grad():  # swapping the class-specific (last-layer) prompts of classes 1 and 3 swaps their scores
        net.prompts[-1, [1, 3]] = net.prompts[-1, [3, 1]].clone()
    swapped = net(x)
    torch.testing.assert_close(swapped[:, [3, 1, 0, 2, 4]], logits[:, [1, 3, 0, 2, 4]], atol=1e-5, rtol=1e-5)


def test_attention_rows_sum_to_one_and_maps_follow_the_target():
    net = _net().eval()
    x = _x()
    tok = net.tokens_before_last(x)
    out, attn = net.last_block(tok, need_attn=True)
    assert attn.shape == (3, net.num_heads, tok.shape[1], tok.shape[1])
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    torch.testing.assert_close(out, net.backbone.blocks[-1](tok), atol=1e-5, rtol=1e-5)  # same as the fused path
    target = torch.tensor([4, 0, 2])
    maps = net.attention_maps(x, target=target)["prompt_attn"]
    assert maps.shape == (3, net.num_heads, 8, 8) and (maps >= 0).all()
    torch.testing.assert_close(maps[1].flatten(1), attn[1, :, 0, 5 + 1:])  # row of prompt 0, patches only


def test_blurring_a_head_gives_uniform_attention_on_the_target_row():
    net = _net().eval()
    tok = net.tokens_before_last(_x(2))
    blur = torch.zeros(2, net.num_heads, dtype=torch.bool)
    blur[:, 2] = True
    _, attn = net.last_block(tok, blur, torch.tensor([1, 3]), need_attn=True)
    n = tok.shape[1]
    torch.testing.assert_close(attn[0, 2, 1], torch.full((n,), 1.0 / n))  # the code: logits 0 over all N tokens
    assert not torch.allclose(attn[0, 2, 0], torch.full((n,), 1.0 / n))  # other rows untouched


@pytest.mark.parametrize("k", [1, 3, 6])
def test_head_ranking_returns_top_traits_distinct_heads(k):
    net = _net().eval()
    x = _x(2)
    order = net.rank_heads(x, top_traits=k)
    assert order.shape == (2, k)
    assert all(len(set(row.tolist())) == k for row in order)
    traits = net.attention_maps(x, top_traits=k)["traits"]
    assert traits.shape == (2, k, 8, 8)
    with pytest.raises(ValueError, match="top_traits"):
        net.rank_heads(x, top_traits=7)


def test_shallow_prompts_are_carried_through_all_blocks():
    net = _net(vpt_mode="shallow").train()
    assert net.prompts.shape == (1, 5, 96)
    assert net.tokens_before_last(_x()).shape[1] == 5 + 1 + 64
    net(_x()).sum().backward()
    assert net.prompts.grad.abs().sum() > 0


def _vit_ckpt(path, seed: int = 3) -> dict:
    """A tiny fixture in the zoo's checkpoint format: a trained-looking vit_nano, net.-prefixed."""
    torch.manual_seed(seed)
    vit = zoo.create_model("vit_nano", num_classes=10)
    torch.save({"state_dict": {f"net.{k}": v for k, v in vit.state_dict().items()},
                "hyper_parameters": {"model": {"name": "vit_nano", "kwargs": {}}, "num_classes": 10}}, path)
    return vit.state_dict()


def test_backbone_ckpt_from_a_zoo_vit(tmp_path):
    path = tmp_path / "vit.ckpt"
    sd = _vit_ckpt(path)
    net = _net(backbone_ckpt=str(path))
    own = net.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith("head."))
    assert not any(p.requires_grad for p in net.backbone.parameters())


def test_backbone_ckpt_written_later_is_read_on_first_forward_unless_weights_were_loaded(tmp_path):
    path = tmp_path / "later.ckpt"
    net = _net(backbone_ckpt=str(path))  # the recipe's first step has not written it yet
    sd = _vit_ckpt(path)
    net(_x(1))
    assert torch.equal(net.backbone.pos_embed, sd["pos_embed"])
    trained = _net(backbone_ckpt=str(tmp_path / "gone.ckpt"))  # e.g. evaluate.py on another machine
    trained.load_state_dict(net.state_dict())
    trained(_x(1))  # no read of the missing file: the loaded state dict has the backbone
    assert torch.equal(trained.backbone.pos_embed, sd["pos_embed"])


def test_official_checkpoint_keys_load(tmp_path):
    src = _net().eval()
    official = {("vpt.prompt_embeddings" if k == "prompts" else k.removeprefix("backbone.")): v
                for k, v in src.state_dict().items()}
    torch.save({"model_state_dict": official, "epoch": 3}, tmp_path / "official.pth")
    dst = zoo.create_model("promptcam_vit_nano", num_classes=5, pretrained_file=str(tmp_path / "official.pth")).eval()
    x = _x(2)
    torch.testing.assert_close(dst(x), src(x))
    # a plain backbone file leaves prompts and head at their fresh values
    plain = {k: v for k, v in official.items() if not k.startswith(("vpt.", "head."))}
    sd = checkpoint_filter_fn(plain, dst)
    assert torch.equal(sd["prompts"], dst.prompts) and set(sd) == set(dst.state_dict())


def test_bench_extras_sequence_length_grows_with_classes():
    for c in (37, 200):
        with torch.device("meta"):
            net = zoo.get_spec("promptcam_vit_base_dino").builder(num_classes=c)
        e = net.bench_extras(224)
        assert e["seq_len"] == 1 + 196 + c and e["seq_len_plain"] == 197
        assert e["trainable_params"] == 12 * c * 768 + 769


def test_paper_style_overlay_and_cli_top_traits(tmp_path):
    from PIL import Image

    from zoo.__main__ import main
    from zoo.explain import overlay

    img = overlay(torch.rand(3, 32, 32), torch.rand(8, 8), interpolation="bicubic", blur=9)
    assert img.shape == (32, 32, 3) and img.dtype.name == "uint8"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "img0.png")
    torch.save(_net().state_dict(), tmp_path / "w.pt")
    rc = main(["explain", "--model", "promptcam_vit_nano", "--num-classes", "5", "--pretrained-file",
               str(tmp_path / "w.pt"), str(tmp_path / "img0.png"), "--out", str(tmp_path / "maps"), "--top-traits", "2"])
    assert rc == 0 and len(list((tmp_path / "maps").glob("img0_traits.png"))) == 1


# ---------------------------------------------------------------------------------------- timm surface
MODES = ("deep", "shallow")


def _block_outputs(net: PromptCAM, x: torch.Tensor) -> list[torch.Tensor]:
    """Every backbone block's output (prompts first) during ``forward_features``."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in net.backbone.blocks]
    with torch.no_grad():
        net.forward_features(x)
    for h in hooks:
        h.remove()
    return outs


def test_contract_capabilities_and_class_attributes():
    net = _net()
    check_contract(net)
    assert capabilities(net).declared() == ["attention_maps", "rank_heads", "trainable_groups", "bench_extras"]
    assert "overlay_style" not in vars(net) and PromptCAM.overlay_style == dict(interpolation="bicubic", blur=9)
    assert net.num_features == net.head_hidden_size == 96
    assert net.get_classifier() is net.head


@pytest.mark.parametrize("mode", MODES)
def test_forward_is_head_of_features_pre_logits_is_the_backbone_pool(mode):
    net, x = _net(vpt_mode=mode).eval(), _x()
    with torch.no_grad():
        feats = net.forward_features(x)
        assert feats.shape == (3, 5 + 1 + 64, 96)
        assert torch.equal(net(x), net.forward_head(feats))
        pre = net.forward_head(feats, pre_logits=True)
    assert pre.shape == (3, net.head_hidden_size)
    assert torch.equal(pre, feats[:, 5])  # the class token (the backbone's global_pool='token'), after the prompts


def test_reset_classifier_rebuilds_the_class_prompts():
    net, x = _net().eval(), _x(2)
    vit = net.backbone
    with torch.no_grad():
        net.reset_classifier(7)
        assert net.prompts.shape == (6, 7, 96) and net.num_classes == 7 and net(x).shape == (2, 7)
        assert isinstance(net.head, torch.nn.Linear) and net.get_classifier() is net.head
        assert [n for n, p in net.named_parameters() if p.requires_grad] == ["prompts", "head.weight", "head.bias"]
        net.reset_classifier(0)  # no prompts: the plain frozen backbone's pooled feature
        assert net.prompts.shape == (6, 0, 96) and isinstance(net.get_classifier(), torch.nn.Identity)
        torch.testing.assert_close(net(x), vit.forward_head(vit.forward_features(x), pre_logits=True))
        assert net(x).shape == (2, net.num_features)
        with pytest.raises(ValueError, match="class prompts"):
            net.attention_maps(x)
        net.reset_classifier(0, global_pool="")  # unpooled tokens
        torch.testing.assert_close(net(x), vit.forward_features(x))
        net.reset_classifier(3, global_pool="token")
        assert net(x).shape == (2, 3) and net.attention_maps(x)["prompt_attn"].shape == (2, 6, 8, 8)
    shallow = _net(vpt_mode="shallow")
    shallow.reset_classifier(4)
    assert shallow.prompts.shape == (1, 4, 96) and shallow(x).shape == (2, 4)


def test_group_matcher_no_weight_decay_batch_independence():
    for mode in MODES:
        net = _net(vpt_mode=mode)
        assert net.no_weight_decay() == set()
        check_group_matcher(net)
        check_batch_independent(net, _x(3))


@pytest.mark.parametrize("mode", MODES)
def test_grad_checkpointing_is_real_with_prompts_per_layer(mode):
    check_grad_checkpointing(lambda: _net(vpt_mode=mode), _x(2))


def test_grad_checkpointing_seeded_drop_path_and_intermediates():
    # stochastic depth in the frozen backbone and prompt dropout: the recomputation replays the same masks
    check_grad_checkpointing(lambda: _net(drop_path_rate=0.2, vpt_dropout=0.1), _x(2))
    check_grad_checkpointing(lambda: _net(), _x(2),
                             forward=lambda n, x: torch.stack(n.forward_intermediates(x, intermediates_only=True)))


@pytest.mark.parametrize("mode", MODES)
def test_forward_intermediates_are_the_blocks_patch_tokens(mode):
    net, x = _net(vpt_mode=mode).eval(), _x(2)
    blocks = _block_outputs(net, x)
    start = 5 + 1  # prompts, class token
    with torch.no_grad():
        final, maps = net.forward_intermediates(x)
        assert torch.equal(final, net.forward_features(x))
        assert len(maps) == len(net.feature_info) == len(blocks) == 6
        for y, ref, info in zip(maps, blocks, net.feature_info):
            assert y.shape == (2, info["num_chs"], 32 // info["reduction"], 32 // info["reduction"]) == (2, 96, 8, 8)
            torch.testing.assert_close(y.flatten(2).transpose(1, 2), ref[:, start:])
        assert [i["module"] for i in net.feature_info] == [f"backbone.blocks.{i}" for i in range(6)]
        torch.testing.assert_close(maps[-2].flatten(2).transpose(1, 2), net.tokens_before_last(x)[:, start:])
        normed = net.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0].flatten(2).transpose(1, 2), final[:, start:])
        nlc = net.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert [t.shape for t in nlc] == [(2, 64, 96)] * 2
        torch.testing.assert_close(nlc[1], blocks[5][:, start:])
        calls = []
        hook = net.backbone.blocks[2].register_forward_hook(lambda *a: calls.append(1))
        early_final, early = net.forward_intermediates(x, indices=[1], stop_early=True)
        hook.remove()
        assert calls == [] and len(early) == 1
        torch.testing.assert_close(early[0], maps[1])
        torch.testing.assert_close(early_final, net.backbone.norm(blocks[1]))
    with pytest.raises(ValueError, match="output_fmt"):
        net.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("mode", MODES)
def test_prune_intermediate_layers_and_feature_getter(mode):
    import copy

    net, x = _net(vpt_mode=mode).eval(), _x(2)
    pruned = copy.deepcopy(net)
    assert pruned.prune_intermediate_layers(indices=[1, 3]) == [1, 3]
    assert len(pruned.backbone.blocks) == 4 and pruned.prompts.shape == ((4 if mode == "deep" else 1), 5, 96)
    assert isinstance(pruned.get_classifier(), torch.nn.Identity)
    with torch.no_grad():  # the class prompts stay: the maps of the pruned net are the full net's
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=[1, 3], intermediates_only=True),
                                   net.forward_intermediates(x, indices=[1, 3], intermediates_only=True))
    check_feature_getter(net, x, (1, 3, 5))
    feats = zoo.create_model("promptcam_vit_nano", num_classes=5, vpt_mode=mode, features_only=True,
                             out_indices=(2, 5)).eval()
    with torch.no_grad():
        assert [m.shape for m in feats(x)] == [(2, 96, 8, 8)] * 2
