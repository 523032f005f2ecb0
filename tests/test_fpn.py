"""Semantic-FPN segmenter: timm backbones as before, zoo classification models as backbones, the contract."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet

import zoo
from zoo.backbones import create_backbone, is_timm_model
from zoo.contract import ZooModel, capabilities, contract_violations
from zoo.errors import UnknownModelError

ZOO_BACKBONES = ["biformer_nano", "halonet_tiny"]


def _build(name: str, **kwargs):
    # the registered builder, as zoo.create_model calls it: create_model keeps `out_indices` for its own
    # features_only, so a segmenter's out_indices reach it only through the builder
    torch.manual_seed(0)
    return zoo.get_spec(name).builder(pretrained=False, **kwargs)


def test_default_backbone_is_timms_features_only_net():
    net = zoo.create_model("fpn_tiny", num_classes=3)
    ref = timm.create_model("resnet10t", features_only=True, out_indices=(0, 1, 2, 3, 4))
    assert type(net.encoder) is type(ref)  # timm's own features_only class: same keys, same pretrained weights
    assert {k: v.shape for k, v in net.encoder.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert net.encoder.feature_info.channels() == ref.feature_info.channels()
    # another timm name, by backbone= or by its older name encoder=
    for key in ("backbone", "encoder"):
        other = _build("fpn_tiny", num_classes=3, out_indices=(1, 2, 3, 4), **{key: "resnet18"})
        assert other.encoder.feature_info.channels() == [64, 128, 256, 512]


@pytest.mark.parametrize("backbone", ZOO_BACKBONES)
def test_zoo_backbone_builds_runs_and_trains(backbone):
    net = _build("fpn_tiny", num_classes=3, backbone=backbone, out_indices=None)
    assert isinstance(net.encoder, FeatureGetterNet) and isinstance(net.encoder.model, ZooModel)
    ref = zoo.create_model(backbone)
    assert net.encoder.feature_info.channels() == [i["num_chs"] for i in ref.feature_info]
    assert net.encoder.feature_info.reduction() == [i["reduction"] for i in ref.feature_info]
    x = torch.randn(2, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        feats = net.encoder(x)
        out = net(x)
    assert [f.shape[1] for f in feats] == net.encoder.feature_info.channels()
    assert [64 // f.shape[-1] for f in feats] == net.encoder.feature_info.reduction()
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    net.train()
    net(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters() if p.requires_grad)
    net.freeze_backbone()
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.decoder.parameters())


def test_zoo_backbone_levels_can_be_picked():
    net = _build("fpn_tiny", num_classes=3, backbone="biformer_nano", out_indices=(1, 2, 3))
    assert net.encoder.feature_info.reduction() == [8, 16, 32]
    net = _build("fpn_tiny", num_classes=3, backbone="biformer_nano", out_indices=2)  # timm's int: the last two
    assert net.encoder.feature_info.reduction() == [16, 32]
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_the_zoo_never_shadows_timm():
    zoo.list_models()  # the zoo's names are in timm's registry from here on (zoo.timm_interop)
    assert is_timm_model("resnet10t") and is_timm_model("resnet18.a1_in1k") and is_timm_model("halonet26t")
    assert not is_timm_model("halonet_tiny") and not is_timm_model("biformer_nano")
    with torch.device("meta"):
        clash = create_backbone("halonet26t", out_indices=(1, 2))  # zoo and timm both have it: timm's
    assert not isinstance(clash, FeatureGetterNet) and clash.feature_info.reduction() == [4, 8]
    with pytest.raises(UnknownModelError, match="halonet_tiny"):
        create_backbone("halonet_tinyy")


def test_contract():
    net = zoo.create_model("fpn_tiny", num_classes=3)
    assert isinstance(net, ZooModel) and contract_violations(net, "segmentation") == []
    assert capabilities(net).declared() == ["trainable_groups"]
    zoo_bb = _build("fpn_tiny", num_classes=3, backbone="halonet_tiny", out_indices=None)
    assert contract_violations(zoo_bb, "segmentation") == []
