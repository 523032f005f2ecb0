"""Issue #20 (3-5): the GPU path's option resolution, gradient accumulation with LR scaling, gradient
checkpointing from the config. Everything runs on CPU; the CUDA-only branches are checked by their
decision functions (fused AdamW, channels_last auto), never faked."""
from __future__ import annotations

import logging

import pytest
import torch

from zoo.errors import ZooError
from zoo.registry import create_model
from zoo.scale import (checkpointing_saving, compile_backend, effective_batch, optimizer_impl, saved_tensor_bytes,
                       scaled_lr, steps_per_epoch, use_channels_last)
from zoo.tasks.base import lr_lambda

SHORT = ["trainer.max_epochs=1", "+trainer.limit_val_batches=1", "test=false", "logger=none",
         "+data.val_fraction=0.05", "+data.test_fraction=0.85", "+trainer.num_sanity_val_steps=0",
         "~callbacks.rich_progress_bar", "~callbacks.rich_model_summary",
         "~callbacks.lr_monitor"]


# ---------------------------------------------------------------- option resolution (CPU and CUDA branches)
def test_option_resolution():
    cpu = [torch.zeros(2, requires_grad=True)]
    assert optimizer_impl(cpu) == {"foreach": True} and optimizer_impl([]) == {"foreach": True}
    halo, vit = create_model("halonet_tiny", num_classes=3), create_model("vit_nano", num_classes=3)
    assert use_channels_last("auto", halo, "cuda") and not use_channels_last("auto", vit, "cuda")
    assert not use_channels_last("auto", halo, "cpu") and use_channels_last(True, vit, "cpu")
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    assert effective_batch(64, world_size=4, accumulate=2) == 512 and scaled_lr(1e-3, 1024, 512) == 2e-3
    assert scaled_lr(1e-3, 1024, None) == 1e-3


@pytest.mark.parametrize("override", ["optim.accumulate=0", "optim.accumulate=1.5", "optim.lr_base_batch=0",
                                      "optim.lr_base_batch=x", "model.channels_last=maybe",
                                      "trainer.compile=tvm", "model.grad_checkpointing=2"])
def test_bad_values_are_refused(compose_cfg, override):
    from train import check_config

    with pytest.raises(ZooError, match=override.split("=")[0].split(".")[-1]):
        check_config(compose_cfg("train", [override]))


def test_new_keys_pass_and_reach_the_trainer(compose_cfg):
    from train import check_config, trainer_kwargs

    cfg = compose_cfg("train", ["optim.accumulate=4", "optim.lr_base_batch=512", "model.channels_last=true",
                                "model.grad_checkpointing=true", "trainer.compile=aot_eager"])
    check_config(cfg)
    kw = trainer_kwargs(cfg)
    assert kw["accumulate_grad_batches"] == 4 and "compile" not in kw
    with pytest.raises(ZooError, match="disagree"):
        trainer_kwargs(compose_cfg("train", ["optim.accumulate=4", "+trainer.accumulate_grad_batches=2"]))


# ---------------------------------------------------------------- accumulation and the LR rule
class _Record:
    """Lightning callback: the LR of every optimizer step, and the run's stepping numbers."""

    def __new__(cls):
        import lightning as L

        class Record(L.Callback):
            lrs: list[float] = []

            def on_before_optimizer_step(self, trainer, module, optimizer):
                self.lrs.append(optimizer.param_groups[0]["lr"])

            def on_train_end(self, trainer, module):
                self.total, self.batches = trainer.estimated_stepping_batches, trainer.num_training_batches
                self.n_train = len(trainer.datamodule.train_set)

        return Record()


def test_accumulation_matches_more_devices(compose_cfg, monkeypatch, caplog):
    """1 device x batch b x accumulate k == k devices x batch b: same effective batch, same LR per optimizer
    step (the k-device schedule computed, not launched); the real run steps the optimizer 1/k as often."""
    import train as train_mod

    b, k, base = 16, 2, 8
    rec = _Record()
    monkeypatch.setattr(train_mod, "reliability_callbacks", lambda: [rec])
    cfg = compose_cfg("train", ["model=vit_nano", *SHORT, f"data.batch_size={b}", f"optim.accumulate={k}",
                                f"optim.lr_base_batch={base}", "optim.lr=1e-3", "optim.warmup_epochs=0.3"])
    with caplog.at_level(logging.INFO, logger="zoo.train"):
        train_mod.train(cfg)
    assert f"effective batch {b * k} = batch {b} x 1 device(s) x accumulate {k}" in caplog.text

    steps = steps_per_epoch(rec.n_train, b, world_size=1, accumulate=k)
    assert rec.total == steps == steps_per_epoch(rec.n_train, b, world_size=k, accumulate=1)
    assert len(rec.lrs) == steps == -(-rec.batches // k)  # global steps: half the micro-batches

    o = {**train_mod.container(cfg.optim)}
    lr_k_devices = scaled_lr(o["lr"], effective_batch(b, world_size=k, accumulate=1), base)
    f = lr_lambda(o, steps_per_epoch(rec.n_train, b, world_size=k), max_epochs=1)
    assert rec.lrs == pytest.approx([lr_k_devices * f(s) for s in range(steps)])
    assert lr_k_devices == pytest.approx(1e-3 * b * k / base)


# ---------------------------------------------------------------- compile, channels_last, checkpointing
def test_compile_keeps_the_nets_own_keys(compose_cfg, monkeypatch, tmp_path):
    """trainer.compile (aot_eager here: inductor works on this CPU with gcc, but takes ~70 s on one thread to
    compile vit_nano's forward and backward) trains two steps;
    the checkpoint's keys are the uncompiled net's."""
    import train as train_mod
    from zoo.weights import extract_state_dict, safe_load

    built = []
    real = train_mod.build_task
    monkeypatch.setattr(train_mod, "build_task", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    train_mod.train(compose_cfg("train", ["model=vit_nano", *SHORT, "+trainer.limit_train_batches=2",
                                          "trainer.compile=aot_eager", "model.channels_last=true"]))
    net = built[0].net
    assert net._compiled_call_impl is not None  # nn.Module.compile: compiled in place
    assert net.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    sd = extract_state_dict(safe_load(str(ckpt)))
    assert sd.keys() == create_model("vit_nano", num_classes=10).state_dict().keys()

    # evaluate.py runs the checkpoint's net the same way when asked
    import evaluate as evaluate_mod

    loaded = []
    real_load = evaluate_mod.load_task
    monkeypatch.setattr(evaluate_mod, "load_task", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    metrics = evaluate_mod.evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "model=vit_nano",
                                                             "trainer.compile=aot_eager", "model.channels_last=true"]))
    assert loaded[0].net._compiled_call_impl is not None and 0 <= metrics["test/acc"] <= 1
    assert loaded[0].net.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)


def _task(name: str, **model):
    from zoo.data import ClassificationDataModule
    from zoo.runner import build_task, prepare_data

    dm = ClassificationDataModule(dataset="digits", batch_size=4)
    prepare_data(dm, name)
    return build_task({"name": name, **model}, dm), next(iter(dm.train_dataloader()))


def test_grad_checkpointing_flag_reaches_the_net():
    counts = []
    for on in (False, True):
        task, batch = _task("vit_nano", grad_checkpointing=on)
        counts.append(saved_tensor_bytes(lambda: task.training_step(batch, 0))[0])
    assert counts[1] < counts[0] / 2, counts


def test_grad_checkpointing_refused_where_unsupported():
    from zoo.data import SegmentationDataModule
    from zoo.runner import build_task, prepare_data

    dm = SegmentationDataModule(dataset="shapes", batch_size=2)
    prepare_data(dm, "fpn_tiny")
    with pytest.raises(ZooError, match="grad_checkpointing"):
        build_task({"name": "fpn_tiny", "grad_checkpointing": True}, dm)


def test_channels_last_applies_to_net_and_batches():
    task, (x, y) = _task("halonet_tiny", channels_last=True)
    task.configure_model()  # no trainer: CPU, where only an explicit true turns it on
    conv = next(m for m in task.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert task.to_memory_format(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(task.training_step((x, y), 0))


def test_memory_measure_reports_a_saving():
    assert "less)" in checkpointing_saving("vit_nano", batch=2)
