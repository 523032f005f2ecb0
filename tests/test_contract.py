"""The one model contract, checked on every registered model (the way timm's tests/test_models.py is).

Every model: it inherits ``ZooModel``, declares exactly the optional capabilities it has, and its spec
describes it. Classification models: timm's ``pretrained_cfg`` equal to the spec (with existing
``first_conv`` / ``classifier`` modules), the preprocessing of the weights they load, timm's registry
round trip, and (on the CPU-sized variants, which run) timm's whole surface: forward = head(features),
pre-logits, reset_classifier, no_weight_decay / group_matcher, real gradient checkpointing,
forward_intermediates / features_only shapes and reductions, batch independence. The run-input round
trip through a checkpoint and evaluate.py is in tests/test_run_input.py.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models._manipulate import group_parameters

import zoo
from zoo.contract import capabilities, contract_violations
from zoo.spec import example_input

from conftest import count_saved_tensors

ALL = zoo.list_models()
CLASSIFIERS = zoo.list_models(task="classification")


def _side(name: str) -> int:
    spec = zoo.get_spec(name)
    return spec.input_size[-1] if spec.input_size else 0


SMALL = [n for n in ALL if _side(n) <= 64]  # the CPU variants: these run forward and backward here
SMALL_CLASSIFIERS = [n for n in SMALL if n in CLASSIFIERS]

# Preprocessing of models whose weights come from an official release trained with the official code's
# transforms (not timm's pretrained_cfg of the backbone they start from): mean, std, interpolation, crop_pct.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OFFICIAL_TRANSFORMS = {
    # rayleizhu/BiFormer main.py -> DeiT's datasets.build_transform: ImageNet stats, bicubic, resize 256 / crop 224
    "biformer": (*IMAGENET, "bicubic", 0.875),
    # lim142857/Sparsifiner (DynamicViT / DeiT build_transform): the same
    "sparsifiner": (*IMAGENET, "bicubic", 0.875),
    # Imageomics/Prompt_CAM data transforms: Inception mean/std for every backbone, test Resize((224, 224))
    "promptcam": ((0.5,) * 3, (0.5,) * 3, "bilinear", 1.0),
}


def _build(name: str, **kw):
    torch.manual_seed(0)
    spec = zoo.get_spec(name)
    if spec.task == "mil":
        kw.setdefault("in_dim", 32)
    return zoo.create_model(name, **kw)


def _x(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return example_input(zoo.get_spec(name), batch_size=batch, bag_size=5, in_dim=32)


# ------------------------------------------------------------------------------------------- every model
@pytest.mark.parametrize("name", ALL)
def test_declares_its_capabilities(name):
    spec = zoo.get_spec(name)
    with torch.device("meta"):
        net = _build(name)
    assert contract_violations(net, spec.task) == []
    assert net.zoo_spec.name == name and net.zoo_spec.task == spec.task


@pytest.mark.parametrize("name", ALL)
def test_spec_is_typed_and_complete(name):
    spec = zoo.get_spec(name)
    assert spec.paper and spec.source and spec.paper_ids, name
    assert all(i.startswith("arXiv:") for i in spec.paper_ids)
    assert spec.interpolation in ("bicubic", "bilinear", "nearest") and 0 < spec.crop_pct <= 1
    assert len(spec.mean) == len(spec.std) == (spec.input_size[0] if spec.input_size else len(spec.mean))
    info = zoo.model_info(name)
    assert info["weights"] == spec.weights.describe() and info["pretrained"] == spec.weights.downloadable
    for metric in spec.reference.metrics:
        assert isinstance(metric.value, float | int) and metric.dataset


@pytest.mark.parametrize("name", [n for n in ALL if not zoo.get_spec(n).weights.downloadable])
def test_pretrained_without_weights_is_refused_in_one_place(name):
    with pytest.raises(zoo.WeightsError) as err:
        zoo.create_model(name, pretrained=True)
    assert str(err.value).startswith(f"{name} has no weights the zoo can download")
    assert "pretrained_file=PATH" in str(err.value) and "init_from=CKPT" in str(err.value)


# ------------------------------------------------------------------------------------------- timm interop
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_pretrained_cfg_is_the_spec(name):
    spec = zoo.get_spec(name)
    with torch.device("meta"):
        net = _build(name, num_classes=7)
    cfg = net.pretrained_cfg
    assert net.default_cfg is cfg
    for key in ("input_size", "fixed_input_size", "min_input_size", "interpolation", "crop_pct", "mean", "std",
                "num_classes", "first_conv", "classifier", "license", "paper_ids"):
        assert key in cfg, key
    assert cfg["input_size"] == spec.input_size and cfg["fixed_input_size"] == spec.fixed_input_size
    assert cfg["mean"] == spec.mean and cfg["std"] == spec.std and cfg["num_classes"] == 7
    assert cfg["interpolation"] == spec.interpolation and cfg["crop_pct"] == spec.crop_pct
    side = cfg["min_input_size"][-1]
    assert side >= spec.min_size and side % spec.size_divisor == 0
    modules = dict(net.named_modules())
    assert cfg["first_conv"] in modules, f"first_conv {cfg['first_conv']!r} is not a module of {name}"
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    assert all(c in modules for c in classifiers), f"classifier {cfg['classifier']!r} missing in {name}"
    resolved = timm.data.resolve_data_config(model=net)
    assert resolved["input_size"] == spec.input_size and tuple(resolved["mean"]) == spec.mean
    assert tuple(resolved["std"]) == spec.std and resolved["crop_pct"] == spec.crop_pct


@pytest.mark.parametrize("name", [n for n in CLASSIFIERS + zoo.list_models(task="segmentation")
                                  if zoo.get_spec(n).weights.timm or zoo.get_spec(n).weights.backbone])
def test_preprocessing_is_the_weights(name):
    """A model that loads published weights preprocesses as those weights were trained: timm's
    pretrained_cfg of the tag it loads, or the official code's transforms where an official release exists."""
    spec = zoo.get_spec(name)
    family = next((f for f in OFFICIAL_TRANSFORMS if name.startswith(f)), None)
    if family is not None:
        mean, std, interpolation, crop = OFFICIAL_TRANSFORMS[family]
    elif name.startswith("msguided"):
        if name == "msguided_tiny":  # the zoo's CPU variant: its timm backbone's statistics
            mean, std = timm.get_pretrained_cfg(spec.weights.backbone).mean, timm.get_pretrained_cfg(spec.weights.backbone).std
            interpolation, crop = spec.interpolation, spec.crop_pct
        else:  # sinAshish/Multi-Scale-Attention: ToTensor() only, its DAF_stack weights were trained so
            mean, std, interpolation, crop = (0.0,) * 3, (1.0,) * 3, spec.interpolation, spec.crop_pct
    else:
        cfg = timm.get_pretrained_cfg(spec.weights.timm or spec.weights.backbone)
        assert cfg is not None, f"timm has no pretrained cfg {spec.weights.timm or spec.weights.backbone}"
        mean, std, interpolation, crop = cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct
    assert spec.mean == tuple(mean) and spec.std == tuple(std), name
    assert spec.interpolation == interpolation and spec.crop_pct == pytest.approx(crop), name


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_timm_registry_round_trip(name):
    if name.startswith(("halonet", "sehalonet", "eca_halonext", "haloregnetz")) and name != "halonet_tiny":
        assert timm.is_model(name)  # timm's own name: timm keeps its model (the same net and weights)
        return
    assert timm.is_model(name) and name in timm.list_models("*")
    if name in SMALL_CLASSIFIERS:
        net = timm.create_model(name, num_classes=3)
        assert type(net) is type(zoo.create_model(name, num_classes=3)) and net.pretrained_cfg["num_classes"] == 3
        cfg = timm.data.resolve_data_config(model=net)
        transform = timm.data.create_transform(**cfg)
        from PIL import Image

        img = Image.new("RGB", (80, 70), (120, 30, 200))
        x = transform(img)
        assert tuple(x.shape) == tuple(zoo.get_spec(name).input_size)
        assert net.eval()(x[None]).shape == (1, 3)


def test_timm_never_shadowed():
    from zoo.timm_interop import REGISTERED

    assert "halonet26t" not in REGISTERED and "biformer_tiny" in REGISTERED
    net = timm.create_model("halonet26t")  # timm's model, untouched by import zoo
    assert type(net).__module__.startswith("timm.")


# ------------------------------------------------------------------------------------------- the surface
@pytest.mark.parametrize("name", SMALL_CLASSIFIERS)
def test_forward_is_head_of_features(name):
    net = _build(name, num_classes=5).eval()
    x = _x(name)
    with torch.no_grad():
        out = net(x)
        feats = net.forward_features(x)
        torch.testing.assert_close(net.forward_head(feats), out, rtol=0, atol=0)
        pre = net.forward_head(feats, pre_logits=True)
    assert out.shape == (2, 5) and pre.shape == (2, net.head_hidden_size)
    assert isinstance(net.num_features, int) and net.get_classifier() is not None


@pytest.mark.parametrize("name", SMALL_CLASSIFIERS)
def test_reset_classifier(name):
    net = _build(name, num_classes=5).eval()
    x = _x(name)
    net.reset_classifier(3)
    with torch.no_grad():
        assert net(x).shape == (2, 3)
        net.reset_classifier(0)
        assert net(x).shape == (2, net.head_hidden_size)  # pooled pre-logits features


@pytest.mark.parametrize("name", SMALL_CLASSIFIERS)
def test_weight_decay_and_groups_cover_the_net(name):
    net = _build(name, num_classes=5)
    names = {n for n, _ in net.named_parameters()}
    assert set(net.no_weight_decay()) <= names | {n.rsplit(".", 1)[0] for n in names}
    for coarse in (False, True):
        groups = group_parameters(net, net.group_matcher(coarse=coarse))
        grouped = [n for members in groups.values() for n in members]
        assert sorted(grouped) == sorted(names), f"group_matcher(coarse={coarse}) misses parameters of {name}"


@pytest.mark.parametrize("name", SMALL_CLASSIFIERS)
def test_grad_checkpointing_is_real(name):
    x = _x(name, batch=2)

    def run(checkpointing: bool):
        net = _build(name, num_classes=5).train()
        net.set_grad_checkpointing(checkpointing)
        torch.manual_seed(3)
        n, out = count_saved_tensors(lambda: net(x))
        out.float().square().mean().backward()
        return n, out.detach(), {k: p.grad for k, p in net.named_parameters() if p.grad is not None}

    n_plain, out_plain, g_plain = run(False)
    n_ckpt, out_ckpt, g_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-5, atol=1e-5)
    assert g_ckpt.keys() == g_plain.keys()
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
    assert n_ckpt < n_plain, f"{name}: set_grad_checkpointing saved {n_ckpt} tensors vs {n_plain} without"


@pytest.mark.parametrize("name", SMALL_CLASSIFIERS)
def test_forward_intermediates_and_features_only(name):
    net = _build(name, num_classes=5).eval()
    x = _x(name)
    if net.features_unsupported:
        with pytest.raises(zoo.ModelArgumentError, match="features_only"):
            zoo.create_model(name, features_only=True)
        return
    info = net.feature_info
    assert info and all({"num_chs", "reduction", "module"} <= set(i) for i in info)
    indices = list(range(len(info)))
    with torch.no_grad():
        final, maps = net.forward_intermediates(x, indices=indices)
        torch.testing.assert_close(final, net.forward_features(x))
        only = net.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert len(maps) == len(only) == len(info)
    h, w = x.shape[-2:]
    for m, o, i in zip(maps, only, info):
        assert m.shape == (2, i["num_chs"], h // i["reduction"], w // i["reduction"]), (name, i)
        torch.testing.assert_close(m, o)
    extractor = zoo.create_model(name, features_only=True, out_indices=tuple(indices[-2:]))
    with torch.no_grad():
        feats = extractor.eval()(x)
    assert [f.shape[1] for f in feats] == extractor.feature_info.channels() == [i["num_chs"] for i in info[-2:]]
    assert extractor.feature_info.reduction() == [i["reduction"] for i in info[-2:]]
    drop = lambda cfg: {k: v for k, v in cfg.items() if k != "num_classes"}  # noqa: E731 (the head is pruned)
    assert drop(extractor.pretrained_cfg) == drop(net.pretrained_cfg)


@pytest.mark.parametrize("name", SMALL)
def test_eval_output_independent_of_batch_mates(name):
    spec = zoo.get_spec(name)
    net = _build(name, num_classes=4).eval()
    x = _x(name, batch=3)
    with torch.no_grad():
        full = net(x)
        alone = net(x[:1])
    assert full.shape[0] == 3
    torch.testing.assert_close(alone, full[:1], rtol=1e-4, atol=1e-5)
    if spec.task == "segmentation":
        assert full.shape[-2:] == x.shape[-2:]


@pytest.mark.parametrize("name", SMALL)
def test_declared_capabilities_work(name):
    spec = zoo.get_spec(name)
    net = _build(name, num_classes=4)
    caps = capabilities(net)
    x = _x(name)
    if caps.attention_maps and spec.task != "mil":
        with torch.no_grad():
            maps = net.eval().attention_maps(x)
        assert maps and all(m.ndim == 4 and m.shape[0] == 2 for m in maps.values())
    if caps.bench_extras:
        assert isinstance(net.bench_extras(_side(name) or None), dict)
    if caps.trainable_groups:
        net.freeze_backbone()
        assert 0 < sum(p.requires_grad for p in net.parameters()) < len(list(net.parameters()))


@pytest.mark.parametrize("segmenter", ["fpn_tiny", "msguided_tiny"])
@pytest.mark.parametrize("backbone", ["biformer_nano", "halonet_tiny", "dependencyvit_nano"])
def test_segmenters_take_zoo_backbones(segmenter, backbone):
    """``backbone=<zoo name>`` works with no other argument: all the backbone's levels, its own weights layout."""
    net = zoo.create_model(segmenter, num_classes=3, backbone=backbone).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert net(x).shape == (2, 3, 64, 64)
    assert contract_violations(net, "segmentation") == []
    own = zoo.create_model(segmenter, num_classes=3, out_indices=(1, 2, 3, 4))  # out_indices reach the variant
    assert own.encoder.feature_info.reduction() == [4, 8, 16, 32]
