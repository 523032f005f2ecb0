"""`python -m zoo list|info`: JSON and tables, filters, the layer summary, and one-line errors (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import zoo
from zoo import registry
from zoo.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 5, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes  # create_model puts it into the net's pretrained_cfg
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Conv2d(8, 8, 3, 1, 1) for _ in range(4)])
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TinySeg(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.body(x)


class TinyMIL(nn.Module):
    def __init__(self, in_dim: int = 16, num_classes: int = 2):
        super().__init__()
        self.attn = nn.Linear(in_dim, 1)
        self.head = nn.Linear(in_dim, num_classes)

    def forward(self, x, mask=None):
        return self.head((self.attn(x).softmax(1) * x).sum(1))


def _cnn(pretrained=False, **kw):
    return TinyNet(**kw)


def _seg(pretrained=False, **kw):
    return TinySeg(**kw)


def _mil(pretrained=False, **kw):
    return TinyMIL(**kw)


TEST_MODELS = {
    "_test_cli_cnn": dict(builder=_cnn, task="classification", input_size=(3, 32, 32), size_divisor=16,
                          paper="Tiny et al., A Tiny CNN, 2024"),
    "_test_cli_seg": dict(builder=_seg, task="segmentation", input_size=(3, 24, 24)),
    "_test_cli_mil": dict(builder=_mil, task="mil", input_size=()),
}


def register_test_models() -> None:
    for name, kw in TEST_MODELS.items():
        kw = dict(kw)
        registry._REGISTRY.pop(name, None)
        zoo.register_model(kw.pop("builder"), name=name, **kw)


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    real = zoo.list_models()
    register_test_models()
    yield real
    for name in TEST_MODELS:
        registry._REGISTRY.pop(name, None)


def run_cli(*args: str, register: bool = False) -> subprocess.CompletedProcess:
    """`python -m zoo ARGS`, or with ``register`` the same CLI in a process that first registers the test models."""
    if register:
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_cli; test_cli.register_test_models(); "
                "from zoo.__main__ import main; sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "zoo", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_list_json_subprocess(tiny_models):
    proc = run_cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == tiny_models  # every model the model files register
    for r in rows:
        assert {"name", "task", "params_m", "input_size"} <= set(r)


def test_list_json_subprocess_with_registered_models():
    proc = run_cli("list", "_test_cli_*", "--json", register=True)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == set(TEST_MODELS)
    assert rows["_test_cli_cnn"]["task"] == "classification"
    assert rows["_test_cli_cnn"]["input_size"] == [3, 32, 32]
    assert rows["_test_cli_cnn"]["params_m"] == pytest.approx(sum(p.numel() for p in TinyNet().parameters()) / 1e6,
                                                              abs=1e-3)


def test_list_pattern_and_task_filters(capsys):
    assert main(["list", "_test_cli_*", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(TEST_MODELS)
    assert main(["list", "_test_cli_*", "--task", "segmentation", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["_test_cli_seg"]
    assert main(["list", "--task", "mil", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert "_test_cli_mil" in [r["name"] for r in rows] and all(r["task"] == "mil" for r in rows)
    assert main(["list", "_no_such_model_*", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_list_table(capsys):
    assert main(["list", "_test_cli_*"]) == 0
    out = capsys.readouterr().out
    for name in TEST_MODELS:
        assert name in out
    assert "3x32x32 /16" in out and "Tiny et al." in out and "classification" in out
    assert main(["list", "_no_such_model_*"]) == 0
    assert "no models" in capsys.readouterr().out


def test_info_prints_spec_params_and_layers(capsys):
    assert main(["info", "_test_cli_cnn"]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in TinyNet().parameters())
    assert "params_m" in out and f"{n / 1e6:.3f} M" in out
    assert "stem" in out and "blocks" in out and "head" in out
    assert "[1, 8, 16, 16]" in out  # stem output shape from one forward at 32x32
    assert "x4" in out  # the 4 identical blocks are folded into one line
    assert "[1, 5]" in out


def test_info_json_mil_and_sizes(capsys):
    assert main(["info", "_test_cli_mil", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_shape"] == [1, 8, 64]  # a bag of 8 instances, in_dim 64
    names = {row["name"] for row in data["layers"]}
    assert {"", "attn", "head"} <= names
    assert main(["info", "_test_cli_seg", "--img-size", "40", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["out_shape"] == [1, 3, 40, 40]
    assert main(["info", "_test_cli_cnn", "--img-size", "40"]) == 2  # not a multiple of 16
    err = capsys.readouterr().err
    assert "multiples of 16" in err and "Traceback" not in err


def test_unknown_model_in_process(capsys):
    assert main(["info", "_test_cli_cnx"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "_test_cli_cnn" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_model_subprocess_exit_code_2():
    proc = run_cli("info", "_test_cli_sag", register=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown model" in proc.stderr and "_test_cli_seg" in proc.stderr  # the close names
    assert proc.stdout == ""


# ------------------------------------------------ model names: zoo first, then timm (bench, extract-features, explain)
def test_model_names_zoo_first_then_timm():
    import timm

    from zoo.bench import _expand
    from zoo.validate import resolve_model_name

    assert resolve_model_name("resnet18") == "timm:resnet18"
    assert resolve_model_name("resnet18.a1_in1k") == "timm:resnet18.a1_in1k"
    assert resolve_model_name("timm:resnet18") == "timm:resnet18"
    assert timm.is_model("halonet26t")  # both know it: on the zoo's command line it is the zoo's
    assert resolve_model_name("halonet26t") == "halonet26t" == _expand(["halonet26t"])[0]
    assert _expand(["resnet18", "_test_cli_cnn"]) == ["timm:resnet18", "_test_cli_cnn"]
    assert _expand(["halonet*"]) == zoo.list_models("halonet*")  # a pattern the zoo matches is the zoo's
    found = _expand(["resnet18*"])  # one only timm's names match
    assert "timm:resnet18" in found and all(n.startswith("timm:") for n in found)
    with pytest.raises(zoo.UnknownModelError, match=r"neither a zoo model nor a timm model\. Did you mean: .*resnet18"):
        resolve_model_name("resnet18x")
    with pytest.raises(zoo.UnknownModelError, match="Did you mean: .*_test_cli_cnn"):
        resolve_model_name("_test_cli_cnx")


def test_bench_takes_a_timm_name(capsys):
    rc = main(["bench", "resnet18", "--img-size", "32", "--batch-size", "2", "--iters", "1", "--warmup", "0",
               "--no-isolate", "--threads", "1", "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert rc == 0 and row["model"] == "timm:resnet18" and not row.get("error")
    assert row["params_m"] == pytest.approx(11.690, abs=1e-3)  # timm's resnet18 with its 1000-class head
    assert main(["bench", "resnet18x", "--json"]) == 2
    err = capsys.readouterr().err
    assert "neither a zoo model nor a timm model" in err and "resnet18" in err and len(err.strip().splitlines()) == 1


def _tiles(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "bag0"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    return root


def test_extract_features_takes_a_timm_name(tmp_path, capsys):
    import torch

    tiles = _tiles(tmp_path / "tiles")
    feats = {}
    for model in ("resnet18", "timm:resnet18"):
        torch.manual_seed(0)  # the same random resnet18 both times
        out = tmp_path / model.replace(":", "_")
        assert main(["extract-features", str(tiles), "--out", str(out), "--model", model, "--img-size", "32",
                     "--batch-size", "2"]) == 0, capsys.readouterr().err
        feats[model] = torch.load(out / "pt_files" / "bag0.pt", weights_only=True)
    assert feats["resnet18"].shape == (3, 512)  # timm resnet18's pooled features
    torch.testing.assert_close(feats["resnet18"], feats["timm:resnet18"])
    assert main(["extract-features", str(tiles), "--out", str(tmp_path / "x"), "--model", "resnet18x"]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_explain_refuses_a_timm_name_clearly(tmp_path, capsys):
    for model in ("resnet18", "timm:resnet18"):
        assert main(["explain", "--model", model, str(tmp_path / "a.png"), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "is a timm model" in err and "attention maps" in err
