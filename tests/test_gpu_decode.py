"""data.gpu_decode: the workers read the files, the datamodule decodes and transforms the batch on the device.

On CPU the same path runs with decode_jpeg(device="cpu"): its batches must equal the PIL path's."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import ClassificationDataModule
from zoo.data.device_decode import EncodedBatch
from zoo.errors import DataFormatError
from zoo.runner import build_task

CPU = torch.device("cpu")


def _folder(root: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((36 + 3 * i, 44, 3)) * 255).astype("uint8")
                img = Image.fromarray(a)
                if i == 1:
                    img.convert("L").save(d / f"{i}.jpg", quality=90)  # grayscale JPEG, read as RGB
                elif i == 2:
                    img.save(d / f"{i}.png")  # not a JPEG: decoded by PIL in the worker
                else:
                    img.save(d / f"{i}.jpg", quality=90)
    return root


def _dm(root, gpu_decode, **kw):
    dm = ClassificationDataModule(dataset="imagefolder", root=str(root), img_size=32, batch_size=10,
                                  gpu_decode=gpu_decode, **kw)
    dm.configure_for_model(input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    dm.setup()
    return dm


def _batches(dm, loader):
    return [dm.transfer_batch_to_device(b, CPU, 0) for b in loader]


def test_eval_batches_equal_the_cpu_path(tmp_path):
    root = _folder(tmp_path)
    cpu, dev = _dm(root, False), _dm(root, True)
    raw = next(iter(dev.test_dataloader()))
    assert isinstance(raw, EncodedBatch) and not raw.train
    assert sum(t.ndim == 1 for t in raw.images) == 8 and sum(t.ndim == 3 for t in raw.images) == 2  # 2 PNGs
    for (x0, y0), (x1, y1) in zip(_batches(cpu, cpu.test_dataloader()), _batches(dev, dev.test_dataloader())):
        assert x1.dtype == torch.float32 and x1.shape == x0.shape == (10, 3, 32, 32)
        assert torch.equal(y0, y1)
        torch.testing.assert_close(x1, x0, atol=1e-5, rtol=0)


def test_train_batches_are_augmented_on_the_device_path(tmp_path):
    dev = _dm(_folder(tmp_path), True)
    raw = next(iter(dev.train_dataloader()))
    assert raw.train
    x, y = dev.transfer_batch_to_device(raw, CPU, 0)
    n = len(dev.train_set)  # train less its seeded val part
    assert x.shape == (n, 3, 32, 32) and y.shape == (n,) and torch.isfinite(x).all()
    torch.manual_seed(0)
    a = dev.transfer_batch_to_device(raw, CPU, 0)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, dev.transfer_batch_to_device(raw, CPU, 0)[0])  # random crops and flips


def _corrupt_middle(path: Path) -> None:
    """Header and end marker intact, entropy-coded data replaced: passes the worker's check, fails decoding."""
    data = bytearray(path.read_bytes())
    data[20:-2] = b"\x00" * (len(data) - 22)
    path.write_bytes(bytes(data))


def test_truncated_and_undecodable_test_images_are_errors_naming_the_file(tmp_path):
    root = _folder(tmp_path)
    bad = root / "test" / "a" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: caught in the worker
    dm = _dm(root, True)
    with pytest.raises(DataFormatError, match=str(bad)):
        _batches(dm, dm.test_dataloader())
    bad.unlink()
    _corrupt_middle(root / "test" / "b" / "4.jpg")  # caught by the device decoder
    dm = _dm(root, True)
    with pytest.raises(DataFormatError, match="4.jpg"):
        _batches(dm, dm.test_dataloader())


def test_undecodable_training_image_is_replaced_and_counted(tmp_path, caplog):
    root = _folder(tmp_path)
    bad = root / "train" / "b" / "4.jpg"
    _corrupt_middle(bad)
    dm = _dm(root, True)
    with caplog.at_level(logging.WARNING, logger="zoo.data"):
        out = _batches(dm, dm.train_dataloader())
    assert sum(len(y) for _, y in out) == len(dm.train_set) and all(torch.isfinite(x).all() for x, _ in out)
    assert dm._decoder.skipped == {str(bad)} and "skipped undecodable image" in caplog.text


def test_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="held in memory"):
        ClassificationDataModule(dataset="digits", gpu_decode=True)
    with pytest.raises(ValueError, match="timm_aug"):
        ClassificationDataModule(dataset="imagefolder", root=str(tmp_path), gpu_decode=True,
                                 timm_aug={"auto_augment": "rand-m9-mstd0.5"})


def test_lightning_fit_and_test_decode_through_the_datamodule_hook(tmp_path):
    dm = ClassificationDataModule(dataset="imagefolder", root=str(_folder(tmp_path)), batch_size=4,
                                  gpu_decode=True)
    from zoo.runner import prepare_data

    prepare_data(dm, "vit_nano")
    task = build_task({"name": "vit_nano"}, dm)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    out = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert 0 <= out["test/acc"] <= 1


def test_prepared_gpu_pipeline_script_runs_both_decoders_on_cpu(tmp_path):
    """bench/gpu_pipeline.py (the GPU measurement, prepared) on CPU: a row per decoder, each measured."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_pipeline.py"
    spec = importlib.util.spec_from_file_location("gpu_pipeline", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "r.json"
    assert script.main(["--device", "cpu", "--models", "halonet_tiny", "--batch-size", "8", "--img-size", "32",
                        "--images", "24", "--size", "32x32", "--steps", "1", "--workers", "0",
                        "--cache", str(tmp_path), "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["gpu_decode"] for r in runs] == [False, True]
    assert all(r["data"] == "imagefolder" and r["loader"]["0"]["img_s"] > 0 and r["train_img_s"] > 0 for r in runs)
    from zoo.registry import list_models

    assert "deit_small" not in list_models(), "the benchmark reference leaked into the zoo's registry"

