"""zoo.bench_pipeline: the synthetic JPEG cache, every number of one run, and `python -m zoo bench-pipeline --json`."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from zoo.__main__ import main
from zoo.bench_pipeline import bench_pipeline, parse_size, write_synthetic_jpegs
from zoo.errors import ZooError

FAST = dict(batch_size=16, steps=2, warmup=1, workers=[0])


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def test_synthetic_jpegs_written_once_and_real(tmp_path):
    root = write_synthetic_jpegs(12, (40, 30), cache=tmp_path, classes=3)
    assert root == tmp_path / "12_40x30"
    files = sorted((root / "train").glob("class_*/*.JPEG"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 3
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.size == (40, 30)
    stamp = files[0].stat().st_mtime_ns
    assert write_synthetic_jpegs(12, (40, 30), cache=tmp_path, classes=3) == root  # the cache, not a rewrite
    assert files[0].stat().st_mtime_ns == stamp


def test_bad_arguments_are_zoo_errors(tmp_path):
    with pytest.raises(ZooError, match="WxH"):
        parse_size("224")
    with pytest.raises(ZooError, match="at least one"):
        write_synthetic_jpegs(0, (8, 8), cache=tmp_path)
    with pytest.raises(ZooError, match="steps"):
        bench_pipeline("halonet_tiny", ["data=digits"], steps=0)


def test_bench_pipeline_reports_every_number():
    r = bench_pipeline("halonet_tiny", ["data=digits"], **FAST)
    rates = [r["net_img_s"], r["train_img_s"], r["plain_img_s"], r["lightning_img_s"], r["loader"]["0"]["img_s"]]
    assert all(v > 0 for v in rates)
    assert r["train_over_net"] > 0 and r["bound"] in ("net", "loader") and 0 <= r["loader_shortfall"] < 1
    assert math.isfinite(r["lightning_overhead_pct"]) and math.isfinite(r["loop_overhead_ms"])  # signed: noise
    assert r["batch_size"] == 16 and r["loader_workers"] == 0


def test_cli_json_on_synthetic_jpegs(tmp_path, capsys):
    code = main(["bench-pipeline", "halonet_tiny", "--synthetic-jpeg", "40", "--size", "32x32", "--cache",
                 str(tmp_path), "--batch-size", "8", "--steps", "1", "--warmup", "1", "--workers", "0",
                 "--data", "data.num_workers=0", "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["data"] == "imagefolder" and r["train_img_s"] > 0 and list(r["loader"]) == ["0"]
    assert main(["bench-pipeline", "halonet_tiny", "--size", "9x9"]) == 2  # --size without --synthetic-jpeg
