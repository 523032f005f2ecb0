"""Reliability: resume after SIGKILL / SIGTERM reproduces an uninterrupted run, atomic checkpoint
writes, refusal of code-running pickles, clear errors for bad input and non-finite losses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# 3 epochs x 3 steps of 8 digits; augmentation on, so the restored RNG state matters
TINY = ["model=halonet_tiny", "data=digits", "data.batch_size=8", "trainer.max_epochs=3",
        "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "+trainer.num_sanity_val_steps=0", "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread_per_module")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_intra_op_thread_per_module):
    """An uninterrupted run: its test metrics and final weights."""
    from conftest import compose
    from train import train

    run = tmp_path_factory.mktemp("reference")
    metrics = train(compose("train", TINY, run))
    return metrics, torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_run(run: Path, metrics: dict, reference) -> None:
    ref_metrics, ref_ckpt = reference
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == ref_ckpt["global_step"] == 9 and ckpt["epoch"] == 2
    for k, v in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=0, atol=0, msg=k)
    assert metrics == pytest.approx(ref_metrics, abs=1e-7)
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(ref_metrics, abs=1e-7)


def test_sigkill_mid_epoch_then_resume_latest_equals_uninterrupted(reference, compose_cfg, tmp_path):
    from train import train

    runs = tmp_path / "runs"
    killed = runs / "first"
    proc = subprocess.run(
        [sys.executable, "train.py", *TINY, "logger=none", "callbacks.lr_monitor=null", f"hydra.run.dir={killed}",
         "+callbacks.kill._target_=interrupt_helpers.SignalAt", "+callbacks.kill.step=5", "+callbacks.kill.signal=KILL"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the end of epoch 0 survived
    assert not (killed / "metrics.json").exists()

    # a new invocation (its own run dir) finds and continues the newest run of the task
    metrics = train(compose_cfg("train", [*TINY, "resume=latest", f"resume_root={runs}"], out_dir=runs / "second"))
    assert_same_run(killed, metrics, reference)


def test_sigterm_saves_checkpoint_and_ckpt_path_last_resumes_mid_epoch(reference, compose_cfg, tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from train import train

    run = tmp_path / "run"
    kill = ["+callbacks.kill._target_=interrupt_helpers.SignalAt", "+callbacks.kill.step=5", "+callbacks.kill.signal=TERM"]
    sys.path.insert(0, str(ROOT / "tests"))
    with pytest.raises(SIGTERMException):  # Lightning's handler: finish the batch, then exit
        train(compose_cfg("train", [*TINY, *kill], out_dir=run))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["epoch"] == 1  # mid-epoch: 2 of epoch 1's 3 steps done

    metrics = train(compose_cfg("train", [*TINY, "ckpt_path=last"], out_dir=run))
    assert_same_run(run, metrics, reference)


def test_ckpt_path_last_without_checkpoint_starts_fresh(compose_cfg, tmp_path):
    from train import resolve_resume

    cfg = compose_cfg("train", [*TINY, "ckpt_path=last"], out_dir=tmp_path / "new")
    assert resolve_resume(cfg) is None
    cfg = compose_cfg("train", [*TINY, "resume=latest", f"resume_root={tmp_path}"], out_dir=tmp_path / "new")
    assert resolve_resume(cfg) is None


def test_atomic_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    from zoo.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dies_half_way(obj, f, *a, **k):  # a kill while the bytes are being written
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


# ---------------------------------------------------------------- safe loading and export
class RunsCode:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {"name": "halonet_tiny"}}, "x": RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize("where", ["ckpt_path", "init_from", "evaluate", "pretrained_file", "explain", "export"])
def test_code_running_pickle_is_refused(where, compose_cfg, tmp_path):
    from zoo.errors import WeightsError

    evil, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(WeightsError, match="refused to load .*evil.ckpt"):
        if where == "evaluate":
            from evaluate import evaluate

            evaluate(compose_cfg("evaluate", [f"ckpt_path={evil}", "trainer=debug"]))
        elif where == "pretrained_file":
            import zoo

            zoo.create_model("halonet_tiny", pretrained_file=str(evil))
        elif where == "explain":
            from zoo.explain import load_net_from_checkpoint

            load_net_from_checkpoint(evil)
        elif where == "export":
            from zoo.export import export

            export(evil, "safetensors", tmp_path / "out.safetensors")
        else:
            from train import train

            train(compose_cfg("train", [*TINY, f"{where}={evil}"]))
    assert not marker.exists()


def tiny_checkpoint(tmp_path: Path, name: str, kwargs: dict, img_size: int | None) -> Path:
    import zoo

    torch.manual_seed(0)
    net = zoo.create_model(name, num_classes=3, **kwargs)
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": {"name": name, "kwargs": kwargs}, "num_classes": 3,
                                     "data_info": {"img_size": img_size}}}, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
@pytest.mark.parametrize("name,kwargs,size", [("halonet_tiny", {}, 32), ("abmil", {"in_dim": 16}, None)])
def test_export_formats_reproduce_outputs(fmt, name, kwargs, size, tmp_path):
    from zoo.__main__ import main

    if fmt == "onnx":  # the optional export extras: pip install onnx onnxruntime onnxscript
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    ckpt = tiny_checkpoint(tmp_path, name, kwargs, size)
    out = tmp_path / f"net.{fmt}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0  # checks outputs itself
    assert out.is_file()
    if fmt == "safetensors":  # loadable without the zoo's pickles, with the model named in its metadata
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            assert f.metadata()["zoo_model"] == name


def test_export_rejects_unfaithful_output(tmp_path, monkeypatch):
    from zoo.export import ExportError, export

    ckpt = tiny_checkpoint(tmp_path, "abmil", {"in_dim": 16}, None)
    monkeypatch.setattr(torch.jit, "load", lambda p: (lambda x: torch.zeros(x.shape[0], 3)))
    with pytest.raises(ExportError, match="outputs differ"):
        export(ckpt, "torchscript", tmp_path / "net.pt")


# ---------------------------------------------------------------- bad input
def _png(path: Path, size=(8, 8), value=0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def test_unreadable_images_skipped_with_count_or_error(tmp_path, caplog):
    from zoo.data.folders import ImageList
    from zoo.errors import DataFormatError

    good = _png(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:30])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    samples = [(str(truncated), 0), (str(good), 1), (str(garbage), 2)]

    ds = ImageList(samples, in_chans=1)
    with caplog.at_level("WARNING", logger="zoo.data"):
        items = [ds[i] for i in range(3)] + [ds[0]]
    assert [t for _, t in items] == [1, 1, 1, 1]  # each bad one replaced by the next readable
    assert ds.skipped == {str(truncated), str(garbage)}
    assert "truncated.png" in caplog.text and "2 skipped so far" in caplog.text

    strict = ImageList(samples, in_chans=1, bad_images="error")
    with pytest.raises(DataFormatError, match="truncated.png"):
        strict[0]


def test_mask_of_other_size_names_both_files(tmp_path):
    from zoo.data.folders import SegFolderDataset
    from zoo.errors import DataFormatError

    img, mask = _png(tmp_path / "images" / "a.png", (8, 8)), _png(tmp_path / "masks" / "a.png", (8, 6))
    with pytest.raises(DataFormatError) as e:
        SegFolderDataset([(img, mask)], num_classes=2)[0]
    assert str(img) in str(e.value) and str(mask) in str(e.value)


def test_bad_bags_name_the_file(tmp_path):
    import h5py

    from zoo.data.bags import FeatureBagDataset
    from zoo.errors import DataFormatError

    (tmp_path / "pt_files").mkdir()
    (tmp_path / "h5_files").mkdir()
    torch.save(torch.randn(4, 8), tmp_path / "pt_files" / "ok.pt")
    torch.save(torch.zeros(0, 8), tmp_path / "pt_files" / "empty.pt")
    torch.save(torch.randn(4, 5), tmp_path / "pt_files" / "narrow.pt")
    evil, marker = malicious_checkpoint(tmp_path)
    (tmp_path / "pt_files" / "evil.pt").write_bytes(evil.read_bytes())
    with h5py.File(tmp_path / "h5_files" / "cut.h5", "w") as f:
        f["features"] = torch.randn(64, 8).numpy()
    whole = (tmp_path / "h5_files" / "cut.h5").read_bytes()
    (tmp_path / "h5_files" / "cut.h5").write_bytes(whole[: len(whole) // 2])

    ds = FeatureBagDataset(tmp_path, ["ok", "empty", "narrow", "cut", "evil"], [0] * 5, in_dim=8)
    assert ds[0][0].shape == (4, 8)
    for i, (name, why) in enumerate([("empty.pt", "empty"), ("narrow.pt", "feature size 5"),
                                     ("cut.h5", "truncated or corrupt"), ("evil.pt", "cannot read")], start=1):
        with pytest.raises(DataFormatError, match=why) as e:
            ds[i]
        assert name in str(e.value)
    assert not marker.exists()
    with pytest.raises(DataFormatError, match="missing") as e:
        FeatureBagDataset(tmp_path, ["ok", "nowhere"], [0, 1])
    assert "nowhere.pt" in str(e.value)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(compose_cfg, tmp_path):
    from zoo.callbacks import NonFiniteLossError

    from train import train

    run = tmp_path / "run"
    nan = ["+callbacks.nan._target_=interrupt_helpers.NaNLossAt", "+callbacks.nan.step=4"]
    sys.path.insert(0, str(ROOT / "tests"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 \(epoch 1, batch 1\)") as e:
        train(compose_cfg("train", [*TINY, *nan], out_dir=run))
    assert str(run / "checkpoints") in str(e.value)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("override,message", [
    ("+data.img_sz=32", "unknown config key data.img_sz. Did you mean img_size"),
    ("data.batch_size=abc", "data.batch_size='abc' has the wrong type"),
    ("+optim.lrr=0.1", "unknown config key optim.lrr. Did you mean lr"),
    ("+trainer.max_epoch=3", "Did you mean max_epochs"),
    ("data.dataset=digitz", "choose one of .*digits"),
    ("+model.kwargz={}", "Valid keys of model: channels_last, freeze_backbone, grad_checkpointing, kwargs, name"),
])
def test_config_errors_name_key_and_choices_before_data_loads(override, message, compose_cfg, tmp_path):
    from zoo.validate import ConfigError

    from train import train

    # the data folder does not exist: the config error must come first
    cfg = compose_cfg("train", ["data=imagefolder", f"data.root={tmp_path / 'missing'}", override])
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_every_experiment_passes_config_check(compose_cfg):
    from train import check_config

    for exp in sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")):
        check_config(compose_cfg("train", [f"experiment={exp}"]))
        check_config(compose_cfg("evaluate", [f"experiment={exp}", "ckpt_path=x.ckpt"]), training=False)


# ---------------------------------------------------------------- distributed
def test_ddp_two_cpu_processes_match_single_process(compose_cfg, tmp_path):
    """torchrun, 2 ranks on gloo: each task trains and evaluates; the synced test metrics equal a
    single-process evaluation of the same checkpoint; only rank 0 writes files."""
    from evaluate import evaluate

    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_tasks import COMMON, TASKS

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "tests/ddp_tasks.py", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    writes = [json.loads((tmp_path / f"writes_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(v > 0 for v in writes[0].values()), writes[0]
    assert not any(writes[1].values()), f"rank 1 wrote files: {writes[1]}"

    single_overrides = [o for o in COMMON if not o.startswith("trainer.") and o != "trainer=ddp"]
    for task, overrides in TASKS.items():
        r = ddp[task]
        assert r["world_size"] == 2 and r["train"] and r["evaluate"]
        assert json.loads((tmp_path / task / "metrics.json").read_text()) == pytest.approx(r["train"], nan_ok=True)
        data = [o for o in overrides if o.lstrip("+").startswith("data")]
        single = evaluate(compose_cfg("evaluate", [*single_overrides, *data, f"ckpt_path={r['ckpt']}"],
                                      out_dir=tmp_path / f"{task}_single"))
        assert set(single) == set(r["evaluate"]), task
        for k, v in single.items():
            assert r["evaluate"][k] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), f"{task} {k}"
