"""Run under ``torchrun --nproc_per_node=2 tests/ddp_tasks.py OUT``: for each task, train a tiny model with
trainer=ddp on CPU (gloo), then evaluate its best checkpoint with trainer=ddp; rank 0 writes OUT/ddp.json.
tests/test_reliability.py compares it with single-process evaluations of the same checkpoints."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# every test split is a multiple of 2 ranks x batch: DistributedSampler pads nothing
TASKS = {
    "classification": ["model=halonet_tiny", "data=digits", "++data.test_fraction=0.1"],  # 180 test images
    "segmentation": ["model=fpn_tiny", "data=shapes", "++data.num_train=32", "++data.num_val=16", "++data.num_test=32"],
    "mil": ["model=abmil", "data=digit_bags", "++data.num_train=32", "++data.num_val=16", "++data.num_test=32"],
}
COMMON = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
          "data.batch_size=8", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
          "+trainer.num_sanity_val_steps=0", "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]


def main(out: Path) -> None:
    import torch

    from conftest import compose
    from evaluate import evaluate
    from train import train

    torch.set_num_threads(1)
    writes = record_writes()
    results = {}
    for task, overrides in TASKS.items():
        run = out / task
        trained = train(compose("train", [*COMMON, *overrides, "test_last=false"], run))
        best = sorted((run / "checkpoints").glob("best-*.ckpt"))[0]
        data = [o for o in overrides if o.lstrip("+").startswith("data")]
        evaluated = evaluate(compose("evaluate", [*COMMON, *data, f"ckpt_path={best}"], out / f"{task}_eval"))
        results[task] = {"train": trained, "evaluate": evaluated, "ckpt": str(best),
                         "world_size": torch.distributed.get_world_size()}
    rank = int(os.environ.get("RANK", 0))
    (out / f"writes_rank{rank}.json").write_text(json.dumps(writes))
    if rank == 0:
        (out / "ddp.json").write_text(json.dumps(results, indent=2))


def record_writes() -> dict[str, int]:
    """Count, in this rank, the calls that write run files (metrics.json, config.yaml, checkpoints, CSV logs)."""
    import evaluate
    import train
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from zoo.callbacks import AtomicCheckpointIO

    counts = {"metrics": 0, "config": 0, "checkpoint": 0, "csv_log": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    train.write_metrics = counted("metrics", train.write_metrics)
    evaluate.write_metrics = counted("metrics", evaluate.write_metrics)
    train.OmegaConf.save = counted("config", train.OmegaConf.save)
    AtomicCheckpointIO.save_checkpoint = counted("checkpoint", AtomicCheckpointIO.save_checkpoint)
    ExperimentWriter.save = counted("csv_log", ExperimentWriter.save)
    return counts


if __name__ == "__main__":
    main(Path(sys.argv[1]))
