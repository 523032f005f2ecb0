"""One owner of a run's input: size, channels, mean/std, interpolation and crop are resolved once,
given to the datamodule and the net, stored in the checkpoint and restored by evaluate.py, explain
and export. Each case here failed before the run input had one owner."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.spec import RunInput, resolve_run_input, stored_input

from conftest import ROOT

SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=2", "test_last=false"]


def _train(compose_cfg, run: Path, overrides: list[str]) -> tuple[dict, Path]:
    from train import train

    metrics = train(compose_cfg("train", [*overrides, *SHORT], out_dir=run))
    return metrics, run / "checkpoints" / "last.ckpt"


def _evaluate(compose_cfg, out: Path, ckpt: Path, overrides: list[str]) -> dict:
    from evaluate import evaluate

    return evaluate(compose_cfg("evaluate", [*overrides, f"ckpt_path={ckpt}", "+trainer.limit_test_batches=2"],
                                out_dir=out))


def test_resolution_order():
    spec = zoo.get_spec("halonet_tiny")
    # nothing given: the spec (its weights' preprocessing)
    run = resolve_run_input(spec, {}, {"img_size": 99})
    assert (run.img_size, run.in_chans, run.mean, run.crop_pct) == (32, 3, spec.mean, spec.crop_pct)
    # a checkpoint's stored input beats the spec; the user's beats both and is reported
    said = []
    run = resolve_run_input(spec, {"img_size": 64}, stored={"img_size": 96, "in_chans": 1, "mean": [0.3]},
                            log=said.append)
    assert run.img_size == 64 and run.in_chans == 1 and run.mean == (0.3,) and run.std == (0.5,)
    assert said == ["override: data.img_size=64 replaces the checkpoint's img_size=96"]
    assert RunInput(**run.__dict__).as_dict()["mean"] == [0.3]


def test_evaluate_restores_the_trained_size_and_logs_an_override(compose_cfg, tmp_path, caplog):
    trained, ckpt = _train(compose_cfg, tmp_path / "run", ["model=halonet_tiny", "data=digits", "data.img_size=64"])
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hp["data_info"]["img_size"] == 64 and hp["data_info"]["crop_pct"] == zoo.get_spec("halonet_tiny").crop_pct
    again = _evaluate(compose_cfg, tmp_path / "eval", ckpt, ["data=digits"])  # no img_size given: the stored 64
    for k in trained:
        assert again[k] == pytest.approx(trained[k], abs=1e-6), k
    with caplog.at_level(logging.WARNING):
        _evaluate(compose_cfg, tmp_path / "eval2", ckpt, ["data=digits", "data.img_size=32"])
    assert "override: data.img_size=32 replaces the checkpoint's img_size=64" in caplog.text


def test_one_channel_checkpoint_evaluates_and_explains(compose_cfg, tmp_path):
    trained, ckpt = _train(compose_cfg, tmp_path / "run", ["model=halonet_tiny", "data=digits", "+data.in_chans=1"])
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert stored_input(hp)["in_chans"] == 1 and len(stored_input(hp)["mean"]) == 1
    again = _evaluate(compose_cfg, tmp_path / "eval", ckpt, ["data=digits"])  # default data config: 3 channels
    assert again["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    from PIL import Image

    img = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(img)
    out = subprocess.run([sys.executable, "-m", "zoo", "explain", "--ckpt", str(ckpt), str(img), "--out",
                          str(tmp_path / "maps")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "maps").glob("*.png"))


@pytest.mark.parametrize("name", ["vit_nano", "sparsifiner_deit_nano", "promptcam_vit_nano"])
def test_fixed_size_vits_train_at_another_size(name, compose_cfg, tmp_path):
    trained, ckpt = _train(compose_cfg, tmp_path / "run", [f"model={name}", "data=digits", "data.img_size=48"])
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hp["model"]["kwargs"]["img_size"] == 48 and hp["data_info"]["img_size"] == 48
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    pos = next(v for k, v in sd.items() if k.endswith("pos_embed"))
    assert pos.shape[1] - (48 // 4) ** 2 in (0, 1)  # a 12x12 grid (+ class token)
    again = _evaluate(compose_cfg, tmp_path / "eval", ckpt, ["data=digits"])
    assert again["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)


def test_pos_embed_resized_from_weights_of_another_size(tmp_path):
    """pretrained_file weights of a 32 px ViT load into one built for 48 px: the grid is resampled, not
    re-initialised (the DCAL recipe loads 224 px DeiT weights into a 448 px net the same way)."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    small = zoo.create_model("vit_nano", num_classes=10)
    save_file(small.state_dict(), str(tmp_path / "w.safetensors"))
    big = zoo.create_model("vit_nano", num_classes=10, img_size=48, pretrained_file=str(tmp_path / "w.safetensors"))
    want = resample_abs_pos_embed(small.pos_embed.detach(), new_size=[12, 12], num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed.detach(), want)
    assert big.pretrained_cfg["input_size"] == (3, 48, 48) and big.pretrained_cfg["fixed_input_size"]
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_dcal_cub_recipe_says_its_size_once(compose_cfg):
    from zoo.runner import net_input_kwargs

    cfg = compose_cfg("train", ["experiment=dcal_deit_tiny_cub"])
    assert cfg.data.img_size == 448 and "img_size" not in cfg.model.kwargs

    class CubAt448:  # what net_input_kwargs reads of the datamodule (CUB is not on this machine)
        img_size = 448

        @staticmethod
        def model_kwargs():
            return {}

    assert net_input_kwargs("dcal_deit_tiny", CubAt448()) == {"img_size": 448}
    with torch.device("meta"):
        net = zoo.create_model("dcal_deit_tiny", num_classes=200, img_size=448)
    assert net.pos_embed.shape[1] == 28 * 28 + 1


def test_featurebags_checkpoint_evaluates(compose_cfg, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "bags"
    (root / "pt_files").mkdir(parents=True)
    rows = ["bag_id,label,split"]
    for i in range(16):
        torch.save(torch.from_numpy(rng.normal(size=(int(rng.integers(2, 9)), 8)).astype(np.float32)),
                   root / "pt_files" / f"b{i}.pt")
        split = "train" if i < 10 else "val" if i < 13 else "test"
        rows.append(f"b{i},{('normal', 'tumor')[i % 2]},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    data = ["data=featurebags", f"data.root={root}", "data.labels=labels.csv", "data.num_workers=0"]
    trained, ckpt = _train(compose_cfg, tmp_path / "run", ["model=abmil", *data])
    again = _evaluate(compose_cfg, tmp_path / "eval", ckpt, data)
    for k in trained:
        assert again[k] == pytest.approx(trained[k], abs=1e-6, nan_ok=True), k


def test_evaluate_refuses_other_class_names(compose_cfg, tmp_path):
    """Same class count, other classes: scoring would compare the wrong labels, so evaluate.py stops."""
    from PIL import Image

    def tree(root, classes):
        for split in ("train", "val", "test"):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for i in range(4):
                    Image.new("RGB", (40, 40), (60 * i, 100, 30)).save(root / split / c / f"{i}.png")
        return root

    a = tree(tmp_path / "a", ["cat", "dog"])
    b = tree(tmp_path / "b", ["ant", "bee"])
    _, ckpt = _train(compose_cfg, tmp_path / "run", ["model=halonet_tiny", "data=imagefolder", f"data.root={a}",
                                                     "data.batch_size=4"])
    with pytest.raises(zoo.ZooError, match="not data 'imagefolder's"):
        _evaluate(compose_cfg, tmp_path / "eval", ckpt, ["data=imagefolder", f"data.root={b}"])
