"""zoo.explain: overlays, PNG grids, de-normalisation, checkpoint loading, and `python -m zoo explain`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import zoo
from zoo import registry
from zoo.contract import Capabilities, ZooModel
from zoo.__main__ import main
from zoo.explain import (
    MAX_PANELS,
    denormalize,
    load_net_from_checkpoint,
    normalize,
    overlay,
    save_attention_maps,
)


class TinyAttn(ZooModel, nn.Module):
    """A classifier with two kinds of maps: 2 heads at 1/2 resolution, 20 regions at 1/4 (declared)."""

    zoo_capabilities = Capabilities(attention_maps=True)

    def __init__(self, num_classes: int = 4, width: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, width, 3, 2, 1)
        self.heads = nn.Conv2d(width, 2, 1)
        self.regions = nn.Conv2d(width, 20, 3, 2, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))

    def attention_maps(self, x):
        f = self.stem(x)
        return {"heads": self.heads(f).flatten(2).softmax(-1).view(x.shape[0], 2, *f.shape[2:]),
                "regions": self.regions(f).sigmoid()}


class NoMaps(ZooModel, nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _attn(pretrained=False, **kw):
    return TinyAttn(**kw)


def _nomaps(pretrained=False, **kw):
    return NoMaps(**kw)


NAMES = ("_test_explain_attn", "_test_explain_nomaps")


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    for n in NAMES:
        registry._REGISTRY.pop(n, None)
    zoo.register_model(_attn, name=NAMES[0], input_size=(3, 32, 32), size_divisor=4,
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    zoo.register_model(_nomaps, name=NAMES[1], input_size=(3, 32, 32))
    yield
    for n in NAMES:
        registry._REGISTRY.pop(n, None)


def _read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------ overlay / denormalize
def test_overlay_shape_dtype_and_blend():
    img = torch.rand(3, 40, 30)
    amap = torch.rand(5, 4)
    out = overlay(img, amap, alpha=0.5)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    # alpha=0 gives back the image; a constant map is fine (no NaN from the min-max normalisation)
    same = overlay(img, torch.ones(3, 3), alpha=0.0)
    np.testing.assert_allclose(same, (img.permute(1, 2, 0).numpy() * 255).round(), atol=1)
    gray = overlay(torch.rand(1, 16, 16), np.random.rand(2, 2), alpha=1.0, cmap="viridis")
    assert gray.shape == (16, 16, 3)
    # alpha=1 is the colour map alone: the map's maximum is the colour map's top colour
    import matplotlib

    top = (np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255).round()
    peak = torch.zeros(8, 8)
    peak[0, 0] = 1
    full = overlay(torch.zeros(3, 8, 8), peak, alpha=1.0)
    np.testing.assert_allclose(full[0, 0], top, atol=1)


def test_denormalize_inverts_normalize():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(denormalize(normalize(x, mean, std), mean, std), x, atol=1e-6, rtol=0)
    assert denormalize(torch.full((3, 2, 2), 10.0), mean, std).max() == 1.0  # clamped


# ------------------------------------------------------------------ save_attention_maps
def test_save_attention_maps_writes_readable_pngs(tmp_path):
    b = 3
    images = torch.rand(b, 3, 32, 32)
    maps = {"heads": torch.rand(b, 4, 8, 8), "regions": torch.rand(b, 20, 4, 4), "single": torch.rand(b, 8, 8)}
    paths = save_attention_maps(images, maps, tmp_path / "out", max_images=2, titles=["a", "b", "c"])
    assert len(paths) == 2 * len(maps)  # max_images x map names
    assert len({p.name for p in paths}) == len(paths)
    assert all(p.parent == tmp_path / "out" and p.suffix == ".png" for p in paths)
    widths = {}
    for p in paths:
        arr = _read_png(p)
        assert arr.ndim == 3 and arr.shape[0] > 50
        assert arr.std() > 0  # not blank
        widths[p.stem.split("_", 2)[-1]] = arr.shape[1]
    # one panel per channel, after the input; 20 regions are capped at MAX_PANELS
    assert widths["single"] < widths["heads"] < widths["regions"]
    assert widths["regions"] == pytest.approx(widths["heads"] * (MAX_PANELS + 1) / 5, rel=0.05)
    assert paths[0].name == "sample_000_heads.png"


def test_save_attention_maps_names_and_bad_shapes(tmp_path):
    paths = save_attention_maps(torch.rand(2, 1, 16, 16), {"attn/last": torch.rand(2, 1, 4, 4)}, tmp_path,
                                names=["cat", "dog"])
    assert [p.name for p in paths] == ["cat_attn_last.png", "dog_attn_last.png"]
    with pytest.raises(ValueError, match="B=2"):
        save_attention_maps(torch.rand(2, 3, 16, 16), {"m": torch.rand(3, 1, 4, 4)}, tmp_path)


# ------------------------------------------------------------------ checkpoints
def _fake_lightning_ckpt(path, net, name, num_classes, kwargs=None):
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    sd["metrics.val.acc.correct"] = torch.tensor(3)  # task-module state that is not the net's
    torch.save({
        "state_dict": sd,
        "hyper_parameters": {"model": {"name": name, "kwargs": kwargs or {}}, "num_classes": num_classes,
                             "data_info": {"class_names": ["ant", "bee", "cat"]}},
        "epoch": 3,
    }, path)


def test_load_net_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = zoo.create_model(NAMES[0], num_classes=3, width=12).eval()
    ckpt = tmp_path / "best.ckpt"
    _fake_lightning_ckpt(ckpt, src, NAMES[0], 3, {"width": 12, "pretrained": True})
    net, hp = load_net_from_checkpoint(ckpt)
    assert hp["num_classes"] == 3 and not net.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), src(x))

    other = zoo.create_model(NAMES[0], num_classes=3, width=8)
    bad = tmp_path / "bad.ckpt"
    _fake_lightning_ckpt(bad, other, NAMES[0], 3, {"width": 12})  # weights of another width
    with pytest.raises(zoo.WeightsError, match="does not fit"):
        load_net_from_checkpoint(bad)
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "nohp.ckpt")
    with pytest.raises(zoo.WeightsError, match="model="):
        load_net_from_checkpoint(tmp_path / "nohp.ckpt")


# ------------------------------------------------------------------ CLI
@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, (size, mode) in enumerate([((50, 40), "RGB"), ((20, 20), "L")]):
        p = tmp_path / f"img{i}.{'png' if i == 0 else 'jpg'}"
        arr = (np.random.rand(size[1], size[0], 3 if mode == "RGB" else 1) * 255).astype(np.uint8)
        Image.fromarray(arr.squeeze()).save(p)
        paths.append(str(p))
    return paths


def test_cli_explain_model(tmp_path, image_files, capsys):
    out = tmp_path / "maps"
    assert main(["explain", "--model", NAMES[0], *image_files, "--out", str(out), "--img-size", "40"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["img0_heads.png", "img0_regions.png", "img1_heads.png", "img1_regions.png"]
    for p in pngs:
        _read_png(p)
    assert "wrote 4 PNGs" in capsys.readouterr().out


def test_cli_explain_pretrained_file(tmp_path, image_files):
    weights = tmp_path / "w.pth"
    torch.save(zoo.create_model(NAMES[0], num_classes=3, width=6).state_dict(), weights)
    out = tmp_path / "maps"
    rc = main(["explain", "--model", NAMES[0], "--pretrained-file", str(weights), "--num-classes", "3",
               "--model-kwargs", '{"width": 6}', image_files[1], "--out", str(out)])
    assert rc == 0 and len(list(out.glob("img1_*.png"))) == 2


def test_cli_explain_ckpt(tmp_path, image_files, capsys):
    ckpt = tmp_path / "last.ckpt"
    _fake_lightning_ckpt(ckpt, zoo.create_model(NAMES[0], num_classes=3), NAMES[0], 3)
    out = tmp_path / "maps"
    assert main(["explain", "--ckpt", str(ckpt), image_files[0], "--out", str(out)]) == 0
    assert len(list(out.glob("img0_*.png"))) == 2


def test_cli_explain_errors(tmp_path, image_files, capsys):
    assert main(["explain", "--model", NAMES[1], image_files[0], "--out", str(tmp_path)]) == 2
    assert f"{NAMES[1]} defines no attention_maps(x)" in capsys.readouterr().err
    assert main(["explain", "--model", NAMES[0], str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["explain", "--model", NAMES[0], image_files[0], "--out", str(tmp_path), "--img-size", "30"]) == 2
    assert "multiples of 4" in capsys.readouterr().err
    (tmp_path / "junk.png").write_text("not an image")
    assert main(["explain", "--model", NAMES[0], str(tmp_path / "junk.png"), "--out", str(tmp_path)]) == 2
    assert "cannot read image" in capsys.readouterr().err


@pytest.mark.skipif("halonet_tiny" not in zoo.list_models(), reason="halonet_tiny not registered yet")
def test_cli_explain_halonet_tiny(tmp_path, image_files):
    out = tmp_path / "halo"
    assert main(["explain", "--model", "halonet_tiny", image_files[0], "--out", str(out), "--img-size", "64"]) == 0
    assert len(list(out.glob("img0_*.png"))) >= 1
