"""Training at scale, free of Lightning and Hydra: the option resolution the task modules and train.py call
(effective batch and LR scaling, fused optimizers, channels_last, torch.compile, gradient checkpointing).

Kept as plain functions of plain values so the GPU-only choices are unit-tested on a CPU machine.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .validate import ConfigError

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
CHANNELS_LAST = (True, False, "auto")


def effective_batch(batch_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    """Samples per optimizer step: per-device batch x devices x nodes (``world_size``) x accumulation."""
    return int(batch_size) * int(world_size) * int(accumulate)


def scaled_lr(lr: float, effective: int, lr_base_batch: int | None) -> float:
    """DeiT's linear rule, ``lr x effective / lr_base_batch``; ``lr_base_batch=None`` keeps ``lr`` as given."""
    return float(lr) if lr_base_batch is None else float(lr) * effective / int(lr_base_batch)


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1, accumulate: int = 1,
                    drop_last: bool = False) -> int:
    """Optimizer steps per epoch, as Lightning counts them (``estimated_stepping_batches``): each rank sees
    ceil(n / world) samples (DistributedSampler pads), in batches; a partial accumulation window still steps."""
    per_rank = math.ceil(n_train / world_size)
    batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    return math.ceil(batches / accumulate)


def accumulate_grad_batches(trainer: dict, optim: dict) -> int:
    """Lightning's ``accumulate_grad_batches`` from ``optim.accumulate`` (a trainer value that disagrees is refused)."""
    given, accumulate = trainer.get("accumulate_grad_batches"), int(optim.get("accumulate", 1))
    if given not in (None, 1, accumulate):
        raise ConfigError(f"trainer.accumulate_grad_batches={given} and optim.accumulate={accumulate} disagree; "
                               "set optim.accumulate only (the LR rule and its log line read it)")
    return max(accumulate, int(given or 1))


def lr_plan_line(lr: float, batch_size: int, world_size: int, accumulate: int, lr_base_batch: int | None) -> str:
    """The one line a run logs at start: the effective batch and the LR it trains with."""
    eff = effective_batch(batch_size, world_size, accumulate)
    rule = (f" = {lr:g} x {eff}/{lr_base_batch} (optim.lr_base_batch)" if lr_base_batch is not None
            else " (optim.lr as given; optim.lr_base_batch=N scales it)")
    return (f"effective batch {eff} = batch {batch_size} x {world_size} device(s) x accumulate {accumulate}; "
            f"lr {scaled_lr(lr, eff, lr_base_batch):g}{rule}")


def optimizer_impl(params: Iterable[torch.Tensor], clipping: bool = False) -> dict:
    """``fused=True`` when every parameter is a floating CUDA tensor, else ``foreach=True``. Lightning refuses
    gradient clipping with a fused optimizer under mixed precision (it unscales inside ``step``): foreach then."""
    params = list(params)
    fused = bool(params) and not clipping and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {"foreach": True}


def is_conv_net(net: nn.Module) -> bool:
    """Most of the weights in 2-d convolutions (ResNet-style nets, HaloNet): a ViT's one patch-embedding
    conv or a BiFormer's depth-wise position convs do not make it one."""
    conv = sum(p.numel() for m in net.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in net.parameters())
    return total > 0 and conv / total >= 0.5


def use_channels_last(setting: bool | str, net: nn.Module, device_type: str) -> bool:
    """``model.channels_last``: true / false as given; ``auto`` = on for conv nets on CUDA (where cuDNN's
    NHWC kernels are faster; on CPU and for transformers it only adds layout copies)."""
    if setting not in CHANNELS_LAST:
        raise ConfigError(f"model.channels_last={setting!r}: choose true, false or auto")
    if setting == "auto":
        return device_type == "cuda" and is_conv_net(net)
    return bool(setting)


def compile_backend(setting: bool | str | None) -> str | None:
    """``trainer.compile``: false -> None; true -> inductor; or a backend name (``aot_eager`` needs no C compiler)."""
    if setting in (None, False):
        return None
    if setting is True:
        return "inductor"
    if setting not in COMPILE_BACKENDS:
        raise ConfigError(f"trainer.compile={setting!r}: choose false, true or one of {', '.join(COMPILE_BACKENDS)}")
    return str(setting)


def enable_grad_checkpointing(net: nn.Module, task: str, name: str) -> None:
    """``model.grad_checkpointing=true``: the net's ``set_grad_checkpointing(True)``, which the contract promises
    every classification net (timm's surface); dense and MIL nets do not have it."""
    if task != "classification":
        raise ConfigError(f"model.grad_checkpointing=true: {name!r} is a {task} model; gradient checkpointing "
                               "is part of the classification contract only (set_grad_checkpointing). "
                               "Set model.grad_checkpointing=false")
    try:
        net.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as e:  # timm nets that refuse it
        raise ConfigError(f"model.grad_checkpointing=true: {name!r} does not support it ({e})") from None


def saved_tensor_bytes(fn) -> tuple[int, object]:
    """Bytes of the activations autograd keeps for backward while ``fn()`` runs (each storage once, parameters
    left out: they are held anyway), and ``fn``'s result. On CPU this is the training-memory number that
    ``torch.cuda.max_memory_allocated`` gives on a GPU; RSS and tracemalloc miss or blur tensors."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def checkpointing_saving(name: str, batch: int = 8, img_size: int | None = None) -> str:
    """Saved-activation bytes of one training forward of ``name`` without and with ``set_grad_checkpointing``."""
    from .registry import create_model, get_spec

    size = img_size or get_spec(name).input_size[-1]
    x = torch.randn(batch, 3, size, size)
    sizes = []
    for on in (False, True):
        net = create_model(name, num_classes=10).train()
        if on:
            enable_grad_checkpointing(net, get_spec(name).task, name)
        sizes.append(saved_tensor_bytes(lambda: net(x))[0])
    return (f"{name} batch {batch} at {size}px: {sizes[0] / 2**20:.0f} MiB of saved activations, "
            f"{sizes[1] / 2**20:.0f} MiB with model.grad_checkpointing=true ({1 - sizes[1] / sizes[0]:.0%} less)")
