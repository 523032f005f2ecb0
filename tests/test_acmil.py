"""ACMIL / ABMIL: masking, diversity loss, batching, official keys, feature extraction."""
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.models.acmil import diversity_loss, stochastic_topk_mask

from conftest import ROOT


def test_masking_picks_only_among_top_k_real_instances():
    torch.manual_seed(0)
    B, M, N, K, p = 3, 5, 30, 10, 0.6
    logits = torch.randn(B, M, N)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 20:] = False
    valid[2, 4:] = False  # fewer real instances than K
    logits[~valid[:, None].expand(B, M, N)] = 100.0  # padded logits that would win any top-k
    for _ in range(20):
        hide = stochastic_topk_mask(logits, valid, K, p)
        for b in range(B):
            n_real = int(valid[b].sum())
            k_bag = min(K, n_real)
            real_logits = logits[b].masked_fill(~valid[b], float("-inf"))
            top = real_logits.topk(k_bag, dim=-1).indices
            for m in range(M):
                picked = hide[b, m].nonzero()[:, 0]
                assert len(picked) == int(k_bag * p)  # a floor, not a Bernoulli draw
                assert set(picked.tolist()) <= set(top[m].tolist())
                assert valid[b, picked].all()


def test_masking_floors_and_is_off_in_eval():
    net = zoo.create_model("acmil", num_classes=2, in_dim=8, n_masked_patch=1, mask_drop=0.6)
    x = torch.randn(1, 5, 8)
    assert not stochastic_topk_mask(torch.randn(1, 5, 5), None, 1, 0.6).any()  # int(1 * 0.6) = 0
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def test_diversity_is_one_for_identical_branches_and_lower_otherwise():
    a = torch.rand(2, 1, 7).softmax(-1).expand(2, 4, 7)
    assert diversity_loss(a).item() == pytest.approx(1.0, abs=1e-6)
    b = torch.eye(7)[None, :4].expand(2, 4, 7)  # disjoint attention
    assert diversity_loss(b).item() == pytest.approx(0.0, abs=1e-6)
    net = zoo.create_model("acmil", num_classes=2, in_dim=8).eval()
    with torch.no_grad():
        net.attention.attention_weights.weight.copy_(net.attention.attention_weights.weight[:1].expand(5, -1))
        net.attention.attention_weights.bias.fill_(0.1)
    x = torch.randn(2, 9, 8)
    _, losses = net.forward_train(x, torch.tensor([0, 1]))
    assert losses["diversity"].item() == pytest.approx(1.0, abs=1e-5)


def test_diversity_is_computed_on_the_masked_attention():
    net = zoo.create_model("acmil", num_classes=2, in_dim=8).train()
    x, y = torch.randn(2, 40, 8), torch.tensor([0, 1])
    torch.manual_seed(3)
    _, _, masked = net._forward(x, None)
    torch.manual_seed(3)
    _, losses = net.forward_train(x, y)
    assert losses["diversity"].item() == pytest.approx(diversity_loss(masked).item(), abs=1e-6)
    net.eval()
    unmasked = net._forward(x, None)[2]
    assert (masked == 0).sum() == 2 * 5 * 6 and (unmasked > 0).all()


@pytest.mark.parametrize("name", ["acmil", "abmil"])
def test_batch_equals_bags_one_at_a_time(name):
    torch.manual_seed(0)
    net = zoo.create_model(name, num_classes=3, in_dim=16).eval()
    bags = [torch.randn(n, 16) for n in (7, 3, 12)]
    x = torch.zeros(3, 12, 16)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    x[~mask] = 1e4  # padding must not matter whatever it holds
    batched = net(x, mask)
    attn = net.attention_weights(x, mask)
    assert (attn[~mask[:, None].expand_as(attn)] == 0).all()
    for i, b in enumerate(bags):
        torch.testing.assert_close(batched[i: i + 1], net(b[None]), atol=1e-5, rtol=1e-5)


def test_masking_constant_is_safe_in_bf16():
    net = zoo.create_model("acmil", num_classes=2, in_dim=8).train().to(torch.bfloat16)
    x = torch.randn(2, 15, 8, dtype=torch.bfloat16)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 10:] = False
    logits, losses = net.forward_train(x, torch.tensor([0, 1]), mask=mask)
    assert torch.isfinite(logits).all() and all(torch.isfinite(v) for v in losses.values())


def test_abmil_is_the_one_branch_case():
    abmil = zoo.create_model("abmil", num_classes=2, in_dim=16)
    assert abmil.branches == 1 and len(abmil.branch_classifiers) == 0
    _, losses = abmil.forward_train(torch.randn(2, 5, 16), torch.tensor([0, 1]))
    assert set(losses) == {"slide_ce"}


def _official_keys(net, kind):
    """Our state dict renamed to the official ACMIL_GA / ABMIL key names."""
    out = {}
    for k, v in net.state_dict().items():
        k = k.replace("dimreduction.0.", "dimreduction.fc1.")
        if k.startswith("classifier.1."):
            k = ("Slide_classifier.fc." if kind == "acmil" else "classifier.fc.") + k[len("classifier.1."):]
        elif k.startswith("branch_classifiers."):
            i, rest = k[len("branch_classifiers."):].split(".1.")
            k = f"classifier.{i}.fc.{rest}"
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["acmil", "abmil"])
def test_official_checkpoint_keys_load(name, tmp_path):
    src = zoo.create_model(name, num_classes=2, in_dim=32).eval()
    torch.save({"model": _official_keys(src, name)}, tmp_path / "official.pth")
    dst = zoo.create_model(name, num_classes=2, in_dim=32, pretrained_file=str(tmp_path / "official.pth")).eval()
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(dst(x), src(x))


def _write_tiles(root, bags):
    for split, bag, n in bags:
        folder = root / split / bag
        folder.mkdir(parents=True)
        for i in range(n):
            arr = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{bag}_x{i * 256}_y{512}.png")


def test_extract_features_writes_pt_and_h5_and_skips_done_bags(tmp_path):
    from zoo.features import extract_features

    _write_tiles(tmp_path / "tiles", [("train", "slide_a", 5), ("test", "slide_b", 3)])
    out = tmp_path / "feats"
    counts = extract_features(tmp_path / "tiles", out, "halonet_tiny", batch_size=2, progress=False)
    assert counts == {"bags": 2, "written": 2, "skipped": 0}
    feats = torch.load(out / "pt_files" / "slide_a.pt", weights_only=True)
    assert feats.shape == (5, 256)
    with h5py.File(out / "h5_files" / "slide_a.h5") as f:
        np.testing.assert_allclose(f["features"][()], feats.numpy())
        assert sorted(f["coords"][()].tolist()) == [[i * 256, 512] for i in range(5)]  # rows follow sorted tile names
    before = (out / "pt_files" / "slide_b.pt").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "zoo", "extract-features", str(tmp_path / "tiles"), "--out", str(out),
                           "--model", "halonet_tiny"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0 bags written, 2 already there" in proc.stdout
    assert (out / "pt_files" / "slide_b.pt").stat().st_mtime_ns == before


def test_extracted_features_train_through_featurebags(tmp_path, compose_cfg):
    from zoo.features import extract_features
    from train import train

    _write_tiles(tmp_path / "tiles", [("all", f"bag{i}", 3 + i % 3) for i in range(12)])
    extract_features(tmp_path / "tiles", tmp_path / "feats", "halonet_tiny", progress=False)
    (tmp_path / "feats" / "labels.csv").write_text("bag_id,label\n" + "".join(f"bag{i},{i % 2}\n" for i in range(12)))
    cfg = compose_cfg("train", ["model=acmil", "data=featurebags", f"data.root={tmp_path / 'feats'}",
                                "data.labels=labels.csv", "data.num_workers=0", "trainer=debug"])
    metrics = train(cfg)
    assert "test/auroc" in metrics


def test_explain_writes_bag_mosaics(compose_cfg, tmp_path):
    from evaluate import evaluate
    from train import train

    run = tmp_path / "run"
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
             "+trainer.limit_test_batches=1", "test=false"]
    train(compose_cfg("train", ["experiment=acmil_digit_bags", *short], out_dir=run))
    out = tmp_path / "maps"
    evaluate(compose_cfg("evaluate", ["experiment=acmil_digit_bags", f"ckpt_path={run}/checkpoints/last.ckpt",
                                      "explain=true", f"explain_dir={out}", "explain_images=2",
                                      "+trainer.limit_test_batches=1"], out_dir=tmp_path / "eval"))
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4  # 2 bags x (branch_attention, slide_attention)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_coords_heatmap_is_on_the_tile_grid():
    net = zoo.create_model("acmil", num_classes=2, in_dim=8).eval()
    coords = torch.tensor([[[0, 0], [512, 0], [0, 256], [1024, 768]]])  # x, y in pixels, 256 px tiles
    maps = net.attention_maps(torch.randn(1, 4, 8), coords=coords)
    grid = maps["slide_attention"][0, 0]
    assert grid.shape == (4, 5)  # rows = y / 256 + 1, cols = x / 256 + 1
    attn = net.attention_weights(torch.randn(1, 4, 8)).mean(1)[0]
    assert (grid > 0).sum() == 4 and grid[3, 4] > 0 and grid[0, 2] > 0 and grid[1, 0] > 0
    assert grid.sum().item() == pytest.approx(1.0, abs=1e-5) and attn.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_explain_feature_bags_with_coords_draws_the_tile_grid(tmp_path):
    from evaluate import explain
    from zoo.data import MILDataModule
    from zoo.features import extract_features
    from zoo.tasks import MILTask

    _write_tiles(tmp_path / "tiles", [("all", f"bag{i}", 4) for i in range(10)])
    extract_features(tmp_path / "tiles", tmp_path / "feats", "halonet_tiny", progress=False)
    (tmp_path / "feats" / "labels.csv").write_text("bag_id,label\n" + "".join(f"bag{i},{i % 2}\n" for i in range(10)))
    for f in (tmp_path / "feats" / "pt_files").glob("*.pt"):
        f.unlink()  # h5 only: features and coords
    dm = MILDataModule(dataset="featurebags", root=str(tmp_path / "feats"), labels="labels.csv", batch_size=1)
    dm.setup()
    net = zoo.create_model("acmil", num_classes=2, in_dim=256)
    task = MILTask(net, model={"name": "acmil", "kwargs": {"in_dim": 256}}, num_classes=2)
    paths = explain(task, dm, str(tmp_path / "maps"), 4)
    assert len(paths) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
