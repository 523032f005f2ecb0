"""zoo.bench: rows, numbers, isolation, errors, and `python -m zoo bench --json`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.contract import Capabilities, ZooModel
from zoo import registry
from zoo.bench import ROW_KEYS, BenchmarkError, benchmark, format_table

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("model", "infer_samples_per_sec", "train_samples_per_sec", "params_m", "gflops", "peak_mem_mb",
            "infer_step_ms", "train_step_ms", "img_size", "batch_size", "device", "dtype")


# ------------------------------------------------------------------ tiny models (module level: picklable)
class TinyCNN(ZooModel, nn.Module):
    zoo_capabilities = Capabilities(bench_extras=True)  # declared: zoo bench adds bench_extras() to its row

    def __init__(self, num_classes: int = 4, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes  # part of the classification contract (timm's attribute)
        self.features = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def bench_extras(self, img_size):
        return {"tokens": (img_size // 4) ** 2}


class TinySeg(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        return self.body(x)


class TinyMIL(nn.Module):
    def __init__(self, in_dim: int = 16, num_classes: int = 2):
        super().__init__()
        self.attn = nn.Linear(in_dim, 1)
        self.head = nn.Linear(in_dim, num_classes)

    def forward(self, x, mask=None):
        a = self.attn(x).softmax(1)
        return self.head((a * x).sum(1))


class Broken(TinyCNN):
    def forward(self, x):
        raise RuntimeError("deliberately broken")


def _tiny_cnn(pretrained=False, **kw):
    return TinyCNN(**kw)


def _tiny_seg(pretrained=False, **kw):
    return TinySeg(**kw)


def _tiny_mil(pretrained=False, **kw):
    return TinyMIL(**kw)


def _broken(pretrained=False, **kw):
    return Broken(**kw)


TEST_MODELS = {
    "_test_bench_cnn": dict(builder=_tiny_cnn, task="classification", input_size=(3, 32, 32), size_divisor=8),
    "_test_bench_seg": dict(builder=_tiny_seg, task="segmentation", input_size=(3, 32, 32)),
    "_test_bench_mil": dict(builder=_tiny_mil, task="mil", input_size=()),
    "_test_bench_broken": dict(builder=_broken, task="classification", input_size=(3, 32, 32)),
    "_test_bench_lambda": dict(builder=lambda pretrained=False, **kw: TinyCNN(**kw), task="classification",
                               input_size=(3, 16, 16)),
}


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    for name, kw in TEST_MODELS.items():
        kw = dict(kw)
        registry._REGISTRY.pop(name, None)
        zoo.register_model(kw.pop("builder"), name=name, **kw)
    yield list(TEST_MODELS)
    for name in TEST_MODELS:  # do not leak into tests that enumerate every registered model
        registry._REGISTRY.pop(name, None)


def _check_row(row, train=True):
    for k in REQUIRED:
        assert k in row, f"missing {k} in {row}"
    for k in ("infer_samples_per_sec", "infer_step_ms", "params_m", "gflops"):
        assert row[k] > 0, (k, row)
    assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0
    if train:
        assert row["train_samples_per_sec"] > 0 and row["train_step_ms"] > 0
    else:
        assert row["train_samples_per_sec"] is None and row["train_step_ms"] is None


def test_benchmark_zoo_and_timm_isolated():
    rows = benchmark(["_test_bench_cnn", "timm:resnet18"], img_size=32, batch_size=2, iters=2, warmup=1,
                     train=True, threads=1)
    assert [r["model"] for r in rows] == ["_test_bench_cnn", "timm:resnet18"]
    for r in rows:
        _check_row(r)
        assert r["img_size"] == 32 and r["batch_size"] == 2 and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["isolated"] is True
    cnn, res = rows
    assert cnn["tokens"] == 64  # bench_extras(img_size) went into the row
    assert abs(res["params_m"] - 11.69) < 0.01
    # FlopCounterMode / 2 = multiply-adds: resnet18 is 1.82 GMACs at 224, scaling with the pixel count
    assert res["gflops"] == pytest.approx(1.8186 * (32 / 224) ** 2, rel=0.02)
    assert res["train_peak_mem_mb"] > 0
    json.loads(json.dumps(rows))
    assert format_table(rows).row_count == 2


def test_benchmark_segmentation_and_mil_in_process():
    rows = benchmark(["_test_bench_seg", "_test_bench_mil"], batch_size=2, iters=2, warmup=1, train=True,
                     bag_size=10, feat_dim=16, isolate=False)
    seg, mil = rows
    _check_row(seg)
    _check_row(mil)
    assert seg["img_size"] == 32 and seg["isolated"] is False
    assert mil["bag_size"] == 10 and mil["feat_dim"] == 16 and mil["img_size"] is None
    # multiply-adds of one bag: attention (16) + head (16*2) per instance/bag
    assert mil["gflops"] == pytest.approx((10 * 16 + 16 * 2) / 1e9, rel=1e-3)


def test_benchmark_inference_only_and_wildcard():
    rows = benchmark(["_test_bench_c*"], batch_size=2, iters=1, warmup=0, isolate=False)
    assert [r["model"] for r in rows] == ["_test_bench_cnn"]
    _check_row(rows[0], train=False)
    assert rows[0]["img_size"] == 32  # the spec's own size by default
    (wide,) = benchmark(["_test_bench_cnn"], batch_size=2, iters=1, warmup=0, isolate=False,
                        model_kwargs={"num_classes": 7})
    assert wide["params_m"] == pytest.approx(rows[0]["params_m"] + 3 * 17 / 1e6, abs=2e-6)  # head 16->7


def test_unpicklable_builder_runs_in_process():
    (row,) = benchmark(["_test_bench_lambda"], batch_size=2, iters=1, warmup=0)
    assert row["isolated"] is False and row["img_size"] == 16
    _check_row(row, train=False)


def test_benchmark_errors():
    with pytest.raises(zoo.InputSizeError, match="multiples of 8"):
        benchmark(["_test_bench_cnn"], img_size=30)
    with pytest.raises(zoo.UnknownModelError, match="_test_bench_cnn"):
        benchmark(["_test_bench_cnx"])
    with pytest.raises(zoo.UnknownModelError, match="timm"):
        benchmark(["timm:resnet_does_not_exist"])
    with pytest.raises(zoo.UnknownModelError):
        benchmark(["_nothing_matches_*"])
    with pytest.raises(BenchmarkError, match="deliberately broken"):
        benchmark(["_test_bench_broken"], batch_size=2, iters=1, warmup=0, isolate=False)
    rows = benchmark(["_test_bench_broken", "_test_bench_cnn"], batch_size=2, iters=1, warmup=0,
                     isolate=False, errors="row")
    assert "deliberately broken" in rows[0]["error"] and rows[0]["infer_samples_per_sec"] is None
    assert "error" not in rows[1]
    assert format_table(rows).row_count == 2


def test_cli_bench_json_in_process(capsys, monkeypatch):
    from zoo.__main__ import main

    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe's 160-column table (pytest-xdist workers set COLUMNS)

    rc = main(["bench", "_test_bench_cnn", "--img-size", "32", "--batch-size", "2", "--iters", "2",
               "--warmup", "1", "--train", "--no-isolate", "--json"])
    rows = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert rc == 0 and len(rows) == 1
    _check_row(rows[0])
    assert set(ROW_KEYS) - {"error"} <= set(rows[0])

    rc = main(["bench", "_test_bench_cnn", "--img-size", "32", "--batch-size", "2", "--iters", "1",
               "--warmup", "0", "--no-isolate"])
    out = capsys.readouterr().out
    assert rc == 0 and "_test_bench_cnn" in out and "GFLOPs" in out and "infer/s" in out

    rc = main(["bench", "_test_bench_cnn", "--img-size", "31"])
    assert rc == 2 and "multiples of 8" in capsys.readouterr().err


@pytest.mark.skipif("halonet_tiny" not in zoo.list_models(), reason="halonet_tiny not registered yet")
def test_cli_bench_subprocess_halonet_tiny():
    proc = subprocess.run(
        [sys.executable, "-m", "zoo", "bench", "halonet_tiny", "--img-size", "32", "--batch-size", "2",
         "--iters", "2", "--warmup", "1", "--threads", "1", "--no-isolate", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    _check_row(row, train=False)
    assert row["model"] == "halonet_tiny"
    assert torch.isfinite(torch.tensor(row["gflops"]))
