"""vit_nano: a zoo class (ZooVisionTransformer) with timm's keys, sin-cos start and timm's whole surface.

The ``check_*`` helpers are the timm-surface checks shared with ``tests/test_prompt_cam.py``.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import group_parameters
from timm.models.vision_transformer import VisionTransformer

import zoo
from zoo.contract import ZooModel, capabilities, contract_violations
from zoo.layers.pos_embed import init_sincos_pos_embed_
from zoo.models.vit import NANO_ARCH, ZooVisionTransformer
from conftest import count_saved_tensors

CFG_SET_BY_CREATE_MODEL = {"lacks timm's pretrained_cfg", "lacks timm's default_cfg"}  # the lead's create_model


# ---------------------------------------------------------------------------------------- shared checks
def check_contract(net: torch.nn.Module) -> None:
    assert isinstance(net, ZooModel)
    assert [p for p in contract_violations(net, "classification") if p not in CFG_SET_BY_CREATE_MODEL] == []
    assert isinstance(net.num_features, int) and isinstance(net.head_hidden_size, int)


def check_group_matcher(net: torch.nn.Module) -> None:
    """Every parameter matches one of the matcher's own regexes, except the classifier's, which timm leaves to
    its catch-all last group (``group_with_matcher``: "un-matched layers (neck, head)")."""
    params = dict(net.named_parameters())
    head = {id(p) for p in net.get_classifier().parameters()}
    assert set(net.no_weight_decay()) <= set(params)
    for coarse in (False, True):
        matcher = net.group_matcher(coarse=coarse)
        regexes = [s if isinstance(s, str) else s[0] for spec in matcher.values() if spec is not None
                   for s in ([spec] if isinstance(spec, str) else spec)]
        unmatched = [n for n, p in params.items() if not any(re.match(r, n) for r in regexes) and id(p) not in head]
        assert unmatched == []
        groups = group_parameters(net, matcher)
        assert sorted(n for names in groups.values() for n in names) == sorted(params)


saved_tensors = count_saved_tensors  # (tensors saved for backward while running fn(), its output)


def check_grad_checkpointing(make_net, x: torch.Tensor, forward=None) -> None:
    """Same output and gradients with and without ``set_grad_checkpointing``, fewer saved tensors with it."""
    runs = []
    for enable in (False, True):
        net = make_net().train()
        net.set_grad_checkpointing(enable)
        assert net.grad_checkpointing is enable
        fn = (lambda: net(x)) if forward is None else (lambda: forward(net, x))
        n, out = saved_tensors(fn)
        out.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
        runs.append((n, out.detach(), grads))
    (n_plain, out_plain, g_plain), (n_ckpt, out_ckpt, g_ckpt) = runs
    assert n_ckpt < n_plain / 2, (n_ckpt, n_plain)
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=1e-5)
    assert g_plain and g_ckpt.keys() == g_plain.keys()
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], atol=1e-5, rtol=1e-5, msg=k)


def check_feature_getter(net: torch.nn.Module, x: torch.Tensor, out_indices: tuple[int, ...]) -> None:
    """timm's FeatureGetterNet (prunes the net) gives the unpruned net's maps, shaped as ``feature_info``."""
    with torch.no_grad():
        ref = net.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
        getter = FeatureGetterNet(copy.deepcopy(net), out_indices=out_indices).eval()
        maps = getter(x)
    assert len(maps) == len(out_indices)
    for y, r, info in zip(maps, ref, getter.feature_info.get_dicts()):
        assert y.shape == (x.shape[0], info["num_chs"], x.shape[2] // info["reduction"], x.shape[3] // info["reduction"])
        torch.testing.assert_close(y, r)
    for info in net.feature_info:
        net.get_submodule(info["module"])  # names a real module


def check_batch_independent(net: torch.nn.Module, x: torch.Tensor) -> None:
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- vit_nano
def _net(**kw) -> ZooVisionTransformer:
    torch.manual_seed(0)
    return zoo.create_model("vit_nano", num_classes=10, **kw).eval()


def _x(b: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, 32, 32)


def test_is_a_zoo_class_with_timm_keys_and_the_sincos_start():
    net = _net()
    assert type(net) is ZooVisionTransformer and isinstance(net, VisionTransformer)
    assert capabilities(net).declared() == []
    check_contract(net)
    ref = VisionTransformer(**NANO_ARCH, num_classes=10)
    assert list(net.state_dict()) == list(ref.state_dict())
    init_sincos_pos_embed_(ref.pos_embed, ref.patch_embed.grid_size, ref.embed_dim)
    assert torch.equal(net.pos_embed, ref.pos_embed) and net.pos_embed.requires_grad
    assert torch.equal(net.pos_embed[0, 0], torch.zeros(96))  # class-token row
    assert not torch.equal(_net(pos_embed_init="trunc_normal").pos_embed, net.pos_embed)
    with pytest.raises(Exception, match="pos_embed_init"):
        _net(pos_embed_init="learned")


def test_head_pre_logits_and_reset_classifier():
    net, x = _net(), _x()
    with torch.no_grad():
        feats = net.forward_features(x)
        assert torch.equal(net(x), net.forward_head(feats))
        pre = net.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, net.head_hidden_size) and net.num_features == 96
        torch.testing.assert_close(net.get_classifier()(pre), net(x))
        net.reset_classifier(5)
        assert net(x).shape == (2, 5)
        net.reset_classifier(0)
        torch.testing.assert_close(net(x), pre)
        net.reset_classifier(0, global_pool="")
        torch.testing.assert_close(net(x), feats)


def test_no_weight_decay_group_matcher_batch_independence():
    net = _net()
    assert net.no_weight_decay() >= {"pos_embed", "cls_token"}
    check_group_matcher(net)
    check_batch_independent(net, _x(3))


def test_grad_checkpointing_is_real():
    check_grad_checkpointing(_net, _x())


def test_forward_intermediates_and_features_only():
    net, x = _net(), _x()
    with torch.no_grad():
        final, maps = net.forward_intermediates(x)
        assert torch.equal(final, net.forward_features(x))
        assert len(maps) == len(net.feature_info) == 6 and maps[0].shape == (2, 96, 8, 8)
        nlc = net.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(nlc[0].transpose(1, 2).reshape(2, 96, 8, 8), maps[-1])
    kept = copy.deepcopy(net).prune_intermediate_layers(indices=[1, 3])
    assert kept == [1, 3]
    check_feature_getter(net, x, (1, 3, 5))
    feats = zoo.create_model("vit_nano", features_only=True, out_indices=(2, 5)).eval()
    with torch.no_grad():
        assert [m.shape for m in feats(x)] == [(2, 96, 8, 8)] * 2
