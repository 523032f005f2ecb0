"""Faults around the files the zoo reads and writes (issue #18, items 1 and 8): an export never
destroys its input or an existing file unasked, writes are atomic (a full disk leaves the previous
file as it was, and no temporary file), unreadable weights files get an error that says what they
are, and evaluate.py never silently ignores a model= that differs from the checkpoint's."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch


def tiny_checkpoint(tmp_path: Path, name: str = "abmil", kwargs: dict | None = None) -> Path:
    import zoo

    kwargs = {"in_dim": 16} if kwargs is None and name == "abmil" else dict(kwargs or {})
    torch.manual_seed(0)
    net = zoo.create_model(name, num_classes=3, **kwargs)
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": {"name": name, "kwargs": kwargs}, "num_classes": 3,
                                     "data_info": {}}}, path)
    return path


def no_temp_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- 1. export never overwrites unasked
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_export_refuses_to_overwrite_its_own_checkpoint(spelling, tmp_path, capsys):
    from zoo.__main__ import main

    ckpt = tiny_checkpoint(tmp_path)
    before = ckpt.read_bytes()
    out = {"same": ckpt, "dotdot": tmp_path / "sub" / ".." / ckpt.name, "symlink": tmp_path / "link.ckpt"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        out.symlink_to(ckpt)
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out), *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "is the checkpoint" in err and ckpt.name in err
    assert ckpt.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_export_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    from zoo.__main__ import main

    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "net.safetensors"
    out.write_bytes(b"an older export")
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already exists" in err and "--overwrite" in err and "net.safetensors" in err
    assert out.read_bytes() == b"an older export"
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out), "--overwrite"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["zoo_model"] == "abmil"
    assert no_temp_files(tmp_path)


def test_failed_export_check_leaves_previous_output_and_no_temp(tmp_path, monkeypatch):
    from zoo.export import ExportError, export

    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "net.pt"
    out.write_bytes(b"previous")
    monkeypatch.setattr(torch.jit, "load", lambda p: (lambda x: torch.zeros(x.shape[0], 3)))
    with pytest.raises(ExportError, match="outputs differ"):
        export(ckpt, "torchscript", out, overwrite=True)
    assert out.read_bytes() == b"previous"
    assert no_temp_files(tmp_path)


def test_extract_features_refuses_its_input_and_another_backbone(tmp_path):
    from PIL import Image

    from zoo.errors import ZooError
    from zoo.features import extract_features

    tiles = tmp_path / "tiles"
    for bag in ("slide_a", "slide_b"):
        (tiles / bag).mkdir(parents=True)
        for i in range(2):
            arr = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tiles / bag / f"{i * 256}_512.png")
    with pytest.raises(ZooError, match="inside the tiles folder"):
        extract_features(tiles, tiles / "feats", "halonet_tiny", progress=False)
    out = tmp_path / "feats"
    assert extract_features(tiles, out, "halonet_tiny", progress=False)["written"] == 2
    feats = (out / "pt_files" / "slide_a.pt").read_bytes()
    with pytest.raises(ZooError, match="--overwrite"):  # mixing two feature spaces in one folder
        extract_features(tiles, out, "timm:resnet18", progress=False)
    assert (out / "pt_files" / "slide_a.pt").read_bytes() == feats
    again = extract_features(tiles, out, "halonet_tiny", progress=False, overwrite=True)
    assert again == {"bags": 2, "written": 2, "skipped": 0}
    assert no_temp_files(out / "pt_files") and no_temp_files(out / "h5_files")


# ---------------------------------------------------------------- 8. a full disk
def _enospc_after_half(real):
    """A writer that writes half of the file, then fails as a full disk does."""
    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write


def test_disk_full_during_export_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    from zoo.errors import ZooError
    from zoo.export import export

    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "net.safetensors"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc_after_half(safetensors.torch.save_file))
    with pytest.raises(ZooError) as e:
        export(ckpt, "safetensors", out, overwrite=True)
    assert str(out) in str(e.value) and "disk is full" in str(e.value)
    assert out.read_bytes() == b"previous export"
    assert no_temp_files(tmp_path)


def test_disk_full_while_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch):
    from zoo.errors import ZooError
    from zoo.runner import write_metrics

    path = tmp_path / "metrics.json"
    write_metrics({"test/acc": 0.5}, path)
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ZooError) as e:
        write_metrics({"test/acc": 0.9}, path)
    assert str(path) in str(e.value) and "disk is full" in str(e.value)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"test/acc": 0.5}
    assert no_temp_files(tmp_path)


# ---------------------------------------------------------------- 8. weights files that are not what they claim
@pytest.mark.parametrize("content", ["random", "empty"])
@pytest.mark.parametrize("where", ["checkpoint", "pretrained_file"])
def test_random_bytes_are_not_a_checkpoint_not_a_malicious_pickle(content, where, tmp_path):
    import zoo
    from zoo.errors import WeightsError
    from zoo.explain import load_net_from_checkpoint

    path = tmp_path / "weights.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(4096) if content == "random" else b"")
    with pytest.raises(WeightsError) as e:
        if where == "checkpoint":
            load_net_from_checkpoint(path)
        else:
            zoo.create_model("halonet_tiny", pretrained_file=str(path))
    msg = str(e.value)
    assert "is not a checkpoint" in msg and str(path) in msg
    assert "refused" not in msg and "run or build objects" not in msg


def test_truncated_torch_checkpoint_says_truncated(tmp_path):
    from zoo.errors import WeightsError
    from zoo.weights import safe_load

    ckpt = tiny_checkpoint(tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"abmil.ckpt.*truncated or corrupt"):
        safe_load(ckpt)


@pytest.mark.parametrize("fault", ["truncated", "torch_file_named_safetensors", "random"])
def test_bad_safetensors_file_gets_a_clear_error_naming_it(fault, tmp_path):
    import zoo
    from safetensors.torch import save_file

    from zoo.errors import WeightsError

    path = tmp_path / "w.safetensors"
    sd = zoo.create_model("halonet_tiny").state_dict()
    if fault == "truncated":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif fault == "random":
        path.write_bytes(np.random.default_rng(1).bytes(2048))
    else:
        torch.save(sd, path)
    with pytest.raises(WeightsError) as e:
        zoo.create_model("halonet_tiny", pretrained_file=str(path))
    msg = str(e.value)
    assert str(path) in msg
    if fault == "torch_file_named_safetensors":
        assert "rename it to .pt" in msg
    else:
        assert "not a valid safetensors file" in msg and "truncated or corrupt" in msg


# ---------------------------------------------------------------- 8. evaluate.py model= against the checkpoint's
def test_evaluate_refuses_a_model_other_than_the_checkpoints(compose_cfg, tmp_path):
    from evaluate import evaluate
    from zoo.errors import ZooError

    ckpt = tiny_checkpoint(tmp_path, "halonet_tiny", {})
    with pytest.raises(ZooError, match=r"model=vit_nano but the checkpoint .*halonet_tiny.ckpt holds a halonet_tiny"):
        evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "model=vit_nano", "trainer=debug"]))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_evaluate_with_the_default_model_says_the_checkpoints_model_is_used(compose_cfg, tmp_path, caplog):
    import logging

    from evaluate import evaluate

    import zoo

    torch.manual_seed(0)
    net = zoo.create_model("vit_nano", num_classes=10)
    ckpt = tmp_path / "vit.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": {"name": "vit_nano", "kwargs": {}}, "num_classes": 10,
                                     "data_info": {}}}, ckpt)
    with caplog.at_level(logging.WARNING, logger="zoo.evaluate"):
        metrics = evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "data=digits", "trainer=debug"]))
    assert "test/acc" in metrics
    assert any("checkpoint's model vit_nano" in r.getMessage() and "halonet_tiny" in r.getMessage()
               for r in caplog.records)


def test_evaluate_cli_refuses_an_explicit_default_model_that_is_not_the_checkpoints(tmp_path):
    """On the command line even model=halonet_tiny (evaluate.yaml's default, given explicitly) is a choice."""
    import subprocess
    import sys

    from conftest import ROOT

    ckpt = tiny_checkpoint(tmp_path, "abmil")
    proc = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={ckpt}", "model=halonet_tiny", "trainer=debug",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model=halonet_tiny but the checkpoint" in proc.stdout + proc.stderr and "abmil" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_disk_full_while_saving_a_checkpoint_names_it_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from zoo.callbacks import AtomicCheckpointIO
    from zoo.errors import ZooError

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    real = torch.save

    def full(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ZooError) as e:
        io.save_checkpoint({"step": 2}, path)
    assert str(path) in str(e.value) and "disk is full" in str(e.value)
    assert path.read_bytes() == before
    assert no_temp_files(path.parent)
