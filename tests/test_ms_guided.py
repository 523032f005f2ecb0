"""Multi-scale self-guided attention segmenter: shapes, PAM fast path, the official loss, official keys,
attention maps, the medical segmentation metrics and the CHAOS slice layout through segfolder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.data import SegmentationDataModule
from zoo.data.folders import SegFolderDataset
from zoo.errors import InputSizeError
from zoo.models.ms_guided import PAM, SemanticModule, checkpoint_filter_fn
from zoo.tasks import SegmentationTask
from zoo.tasks.segmentation import SurfaceDistances, hd95_msd, scores_from_confusion


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return zoo.create_model("msguided_tiny", num_classes=3)


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (64, 96), (96, 32)])
def test_output_at_input_resolution(tiny, hw):
    tiny.eval()
    with torch.no_grad():
        out = tiny(torch.randn(1, 3, *hw))
    assert out.shape == (1, 3, *hw) and torch.isfinite(out).all()


def test_rejects_sizes_not_multiple_of_32(tiny):
    with pytest.raises(InputSizeError, match="multiples of 32"):
        tiny(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("hw", [(16, 16), (64, 64)])  # N = 256 and N = 4096 tokens
def test_pam_sdpa_equals_plain(hw):
    torch.manual_seed(0)
    fast = PAM(64, impl="sdpa")
    plain = PAM(64, impl="plain")
    plain.load_state_dict(fast.state_dict())
    for m in (fast, plain):
        m.gamma.data.fill_(0.7)
    x = torch.randn(2, 64, *hw)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fast(xa), plain(xb)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.query_conv.weight.grad, plain.query_conv.weight.grad, atol=1e-3, rtol=1e-4)


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return names


def test_pam_sdpa_does_not_fall_back_to_the_math_path():
    """The math fallback (softmax + bmm) keeps the N x N matrix for backward; a fused kernel does not."""
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    names = _graph_names(PAM(64, impl="sdpa")(x))
    assert any("ScaledDotProduct" in n for n in names) and not any("Softmax" in n for n in names), names
    assert any("Softmax" in n for n in _graph_names(PAM(64, impl="plain")(x)))


def test_gammas_start_at_zero(tiny):
    gammas = [p for n, p in tiny.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 16 and all(g.item() == 0 for g in gammas)  # 2 steps x 4 scales x (PAM, CAM)
    assert len([m for m in tiny.modules() if isinstance(m, SemanticModule)]) == 2  # shared across scales


def test_loss_terms_match_formula():
    """sum_8 CE + 0.25 sum_4 MSE(z1_s, z2_s) + 0.1 sum_8 MSE(X, R), recomputed from hooked intermediates."""
    torch.manual_seed(0)
    net = zoo.create_model("msguided_tiny", num_classes=3).train()
    for n, p in net.named_parameters():  # non-zero gammas: the attention paths count
        if n.endswith("gamma"):
            p.data.fill_(0.3)
    seen = {"sem": [], "heads": [], "refined": []}
    for sm in net.semantic:
        sm.register_forward_hook(lambda m, i, o: seen["sem"].append((i[0], o[0], o[1])))
    for h in net.head:
        h.register_forward_hook(lambda m, i, o: seen["heads"].append(o))
    for h in net.head_refined:
        h.register_forward_hook(lambda m, i, o: seen["refined"].append(o))
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64))
    y[0, :4] = 255  # ignored
    logits, losses = net.forward_train(x, y)
    assert set(losses) == {"ce_initial", "ce_refined", "guidance", "recon"}
    assert len(seen["sem"]) == 8 and len(seen["heads"]) == 4 and len(seen["refined"]) == 4
    up = [F.interpolate(o, size=(64, 64), mode="bilinear", align_corners=False) for o in seen["heads"] + seen["refined"]]
    ce = [F.cross_entropy(o, y, ignore_index=255) for o in up]
    z = [s[1] for s in seen["sem"]]  # step-1 scales 1..4, then step-2 scales 1..4
    guidance = 0.25 * sum(((z[s].reshape(-1) - z[s + 4].reshape(-1)) ** 2).mean() for s in range(4))
    recon = 0.1 * sum(((xi - r) ** 2).mean() for xi, _, r in seen["sem"])
    torch.testing.assert_close(losses["ce_initial"], sum(ce[:4]))
    torch.testing.assert_close(losses["ce_refined"], sum(ce[4:]))
    torch.testing.assert_close(losses["guidance"], guidance)
    torch.testing.assert_close(losses["recon"], recon)
    torch.testing.assert_close(logits, torch.stack(up[4:]).mean(0))
    assert seen["sem"][0][0].shape == (2, 32, 16, 16)  # cat(F_s, F_MS): 2 x 16 channels at stride 4
    # inference = mean of the 4 refined outputs (the initial heads are for training only)
    net.eval()
    seen["refined"].clear()
    with torch.no_grad():
        out = net(x)
    ref = torch.stack([F.interpolate(o, size=(64, 64), mode="bilinear", align_corners=False) for o in seen["refined"]]).mean(0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_official_keys_map_to_zoo_keys(tiny):
    official = {
        "resnext.layer0.0.weight": "encoder.conv1.weight",
        "resnext.layer0.1.running_mean": "encoder.bn1.running_mean",
        "resnext.layer1.1.0.conv1.weight": "encoder.layer1.0.conv1.weight",
        "resnext.layer3.5.bn2.bias": "encoder.layer3.5.bn2.bias",
        "down4.0.weight": "down.3.0.weight",
        "fuse1.fuse_attn.6.weight": "fuse.fuse_attn.6.weight",
        "semanticModule_2_1.dec1.decode.6.weight": "semantic.1.dec1.decode.6.weight",
        "pam_attention_1_4.attn.3.query_conv.weight": "guide.0.3.pam.attn.3.query_conv.weight",
        "cam_attention_2_1.attn.3.gamma": "guide.1.0.cam.attn.3.gamma",
        "conv_sem_1_1.weight": "guide.0.3.sem_conv.weight",  # conv_sem_1_1 serves the layer4 scale
        "conv_sem_2_4.bias": "guide.1.0.sem_conv.bias",
        "conv8_1.weight": "guide.0.3.proj.weight",
        "conv8_14.bias": "guide.1.0.proj.bias",
        "predict2.weight": "head.1.weight",
        "predict3_2.bias": "head_refined.2.bias",
    }
    unused = ["conv6_1.1.weight", "conv7_4.1.bias", "attention2.fuse_attn.0.weight", "refine3.fuse_attn.1.bias"]
    t = torch.zeros(1)
    out = checkpoint_filter_fn({k: t for k in list(official) + unused}, tiny)
    assert set(out) == set(official.values())
    zoo_sd = {"head.0.weight": t}
    assert checkpoint_filter_fn(zoo_sd, tiny) is zoo_sd  # zoo keys pass through


def test_attention_maps(tiny):
    tiny.eval()
    maps = tiny.attention_maps(torch.randn(2, 3, 64, 64))
    assert sorted(maps) == sorted(f"scale{s}_{k}" for s in range(1, 5) for k in ("pam", "cam"))
    for m in maps.values():
        assert m.shape == (2, 2, 16, 16) and (m >= 0).all()
    # received attention: the mean of rows that each sum to 1, so it sums to 1 over positions
    torch.testing.assert_close(maps["scale1_pam"].sum((-1, -2)), torch.ones(2, 2))
    assert all(not m.keep_map for m in tiny.modules() if hasattr(m, "keep_map"))


def test_bench_extras(tiny):
    e = tiny.bench_extras(256)
    assert e["pam_tokens"] == 4096 and e["pam_impl"] == "sdpa" and e["pam_matrices_mb_per_sample"] == 512.0


# ============================================================================ metrics
def test_dice_iou_vs_from_confusion():
    # class 1: tp 1, fp 2, fn 0 -> Dice 2/4, IoU 1/3, VS 1 - 2/4
    s = scores_from_confusion(torch.tensor([[8, 2], [0, 1]]))
    assert s["dice"][1].item() == pytest.approx(0.5) and s["iou"][1].item() == pytest.approx(1 / 3)
    assert s["vs"][1].item() == pytest.approx(0.5) and s["vs"][0].item() == pytest.approx(1 - 2 / 18)


def test_hd95_and_msd_known_values():
    gt = np.zeros((8, 8), bool)
    pred = np.zeros((8, 8), bool)
    gt[2, 2] = pred[2, 5] = True  # one pixel each, 3 columns apart
    assert hd95_msd(pred, gt) == pytest.approx((3.0, 3.0))
    assert hd95_msd(pred, gt, spacing=(2.0, 0.5)) == pytest.approx((1.5, 1.5))  # (row, column) spacing
    pred[2, 2] = True  # pred -> gt distances [0, 3], gt -> pred [0]
    hd, msd = hd95_msd(pred, gt)
    assert hd == pytest.approx(0.95 * 3) and msd == pytest.approx(1.0)
    # a 4x4 square against itself shifted by one row: every border distance is 0 or 1
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.roll(a, 1, axis=0)
    hd, msd = hd95_msd(a, b)
    # a's top row (4 px) and the inner 2 px of its bottom row are 1 away from b's border, the 6 others on it;
    # the same from b's side
    assert hd == pytest.approx(1.0) and msd == pytest.approx(12 / 24)


def test_surface_metric_skips_absent_classes_and_ignored_pixels():
    m = SurfaceDistances(3)
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2, 2] = pred[0, 2, 5] = 1
    pred[1, 4, 4] = 2  # class 2 predicted but not labelled: skipped
    pred[0, 7, 7] = 1
    target[0, 7, 7] = 255  # ignored: the stray prediction there does not count
    m.update(pred, target)
    out = m.compute()
    assert out["hd95"][1].item() == pytest.approx(3.0) and out["msd"][1].item() == pytest.approx(3.0)
    assert torch.isnan(out["hd95"][2]) and torch.isnan(out["msd"][0])


def test_task_logs_medical_metrics_on_test_only():
    task = SegmentationTask(torch.nn.Conv2d(1, 3, 1), model={"name": "x", "kwargs": {}}, num_classes=3,
                            data_info={"class_names": ["bg", "a", "b"], "spacing": [1.0, 2.0]})
    assert task.metrics["val"].surface is None and task.metrics["test"].surface.spacing == (1.0, 2.0)
    y = torch.zeros(1, 8, 8, dtype=torch.long)
    y[0, 1:4, 1:4] = 1
    y[0, 5:7, 5:7] = 2
    logits = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    task.update_metrics(task.metrics["test"], logits, y)
    m = task.compute_metrics(task.metrics["test"])
    for k in ("miou", "dice", "vs", "hd95", "msd", "dice_a", "vs_b", "hd95_a", "msd_b", "iou_bg"):
        assert k in m, k
    assert m["dice"].item() == 1 and m["miou"].item() == 1 and m["vs"].item() == 1
    assert m["hd95"].item() == 0 and m["msd"].item() == 0
    assert "hd95" not in task.compute_metrics(task.metrics["val"])


# ============================================================================ CHAOS layout
CHAOS_MAP = {0: 0, 63: 1, 126: 2, 189: 3, 252: 4}


@pytest.fixture
def chaos_tree(tmp_path):
    """root/{train,val}/{Img,GT}/Subj_{X}slice_{Y}.png: 8-bit grey slices, masks at grey levels 0..252.
    The image's grey level equals its mask's, so every joint transform can be checked pixel by pixel."""
    rng = np.random.default_rng(0)
    levels = np.array(list(CHAOS_MAP))
    root = tmp_path / "chaos"
    for split, n in (("train", 6), ("val", 2)):
        (root / split / "Img").mkdir(parents=True)
        (root / split / "GT").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            for c in range(1, 5):  # one organ-like block per class, at random places
                r, q = rng.integers(0, 24, 2)
                mask[r:r + 8, q:q + 6] = levels[c]
            name = f"Subj_{i // 3 + 1}slice_{i % 3 + 1}.png"
            Image.fromarray(mask, mode="L").save(root / split / "Img" / name)
            Image.fromarray(mask, mode="L").save(root / split / "GT" / name)
    return root


def test_chaos_layout_through_segfolder(chaos_tree):
    kw = dict(dataset="segfolder", root=str(chaos_tree), num_classes=5, value_map=CHAOS_MAP, in_chans=1,
              img_size=32, mean=[0.0], std=[1.0], batch_size=2, crop_scale=None, vflip=True, rotate_degrees=30,
              test_fraction=0.34, spacing=[1.5, 1.5])
    dm = SegmentationDataModule(**kw)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 2)
    lut = np.full(256, 255)
    for k, v in CHAOS_MAP.items():
        lut[k] = v
    raw = SegFolderDataset(dm.train_set.pairs, num_classes=5, value_map=CHAOS_MAP, in_chans=1)  # no transform
    changed, ignored = 0, 0
    torch.manual_seed(0)
    for _ in range(5):
        for i in range(len(dm.train_set)):
            x, m = dm.train_set[i]
            assert x.shape == (1, 32, 32) and m.shape == (32, 32) and m.dtype == torch.long
            grey = (x[0] * 255).round().long().clamp(0, 255)
            keep = m != 255
            # joint: the transformed image still carries its own mask's grey levels
            assert torch.equal(torch.from_numpy(lut)[grey[keep]], m[keep])
            ignored += int((~keep).any())
            changed += int(not torch.equal(m, raw[i][1]))
    assert changed > 10 and ignored > 5  # flips / rotations happened; rotated-in corners are ignored
    x, m = dm.val_set[0]  # no augmentation outside training
    raw = np.array(Image.open(dm.val_set.pairs[0][1]))
    assert torch.equal(m, torch.from_numpy(lut[raw]))
    assert set(m.unique().tolist()) <= {0, 1, 2, 3, 4}


def test_msguided_tiny_shapes_experiment_end_to_end(compose_cfg, tmp_path):
    """The experiment composes and runs one batch each of train/val/test; metrics.json has the medical metrics."""
    from train import train

    cfg = compose_cfg("train", ["experiment=msguided_tiny_shapes", "trainer=debug", "data.batch_size=4",
                                "data.num_train=8", "data.num_val=4", "data.num_test=4",
                                f"metrics_file={tmp_path}/m.json"])
    train(cfg)
    metrics = json.loads((tmp_path / "m.json").read_text())
    for k in ("test/miou", "test/dice", "test/vs", "test/hd95", "test/msd", "test/dice_circle"):
        assert k in metrics, k
    assert Path(cfg.paths.output_dir, "metrics.json").is_file()


# ============================================================================ backbones and contract
def test_contract(tiny):
    from zoo.contract import ZooModel, capabilities, contract_violations

    assert isinstance(tiny, ZooModel) and contract_violations(tiny, "segmentation") == []
    assert capabilities(tiny).declared() == ["own_objective", "attention_maps", "trainable_groups", "bench_extras"]


def test_default_backbone_is_timms_features_only_net(tiny):
    import timm

    ref = timm.create_model("resnet10t", features_only=True, out_indices=(1, 2, 3, 4))
    assert type(tiny.encoder) is type(ref)  # same keys: timm weights and official checkpoints map as before
    assert list(tiny.encoder.state_dict()) == list(ref.state_dict())
    alias = zoo.get_spec("msguided_tiny").builder(encoder="resnet18")  # the older argument name
    assert alias.encoder.feature_info.channels() == [64, 128, 256, 512]


@pytest.mark.parametrize("backbone,scales", [("biformer_nano", 4), ("halonet_tiny", 3)])
def test_zoo_backbone_builds_trains_and_explains(backbone, scales):
    from timm.models._features import FeatureGetterNet

    torch.manual_seed(0)
    # the builder, as create_model calls it (create_model keeps out_indices for its own features_only)
    net = zoo.get_spec("msguided_tiny").builder(num_classes=3, backbone=backbone, out_indices=None)
    assert isinstance(net.encoder, FeatureGetterNet) and len(net.down) == scales
    assert len(net.head) == len(net.head_refined) == len(net.guide[0]) == scales
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64))
    logits, losses = net.train().forward_train(x, y)
    assert logits.shape == (2, 3, 64, 64) and set(losses) == {"ce_initial", "ce_refined", "guidance", "recon"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in net.head_refined.parameters())
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 64, 64)
    maps = net.attention_maps(x)
    side = 64 // net.encoder.feature_info.reduction()[0]
    assert sorted(maps) == sorted(f"scale{s}_{k}" for s in range(1, scales + 1) for k in ("pam", "cam"))
    assert all(m.shape == (2, 2, side, side) for m in maps.values())
    assert net.bench_extras(64)["pam_matrices_mb_per_sample"] == round(2 * scales * side**4 * 4 / 2**20, 1)
