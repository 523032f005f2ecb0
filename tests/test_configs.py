"""The Hydra config groups: ``model=NAME`` for every registered name (zoo.config_store), the few model
files, every experiment, and unknown names (composed as lightning-hydra-template's tests do)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from torch import nn

import zoo
from zoo import registry
from zoo.config_store import check_model_overrides, model_files, model_node, register_model_configs
from zoo.errors import UnknownModelError
from zoo.model_table import recipes
from zoo.validate import MODEL_DEFAULTS, MODEL_KEYS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
FILES = model_files(CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def stored():
    return register_model_configs(CONFIGS)


def composed(overrides: list[str], config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def model_cfg(overrides: list[str], config_name: str = "train") -> dict:
    return OmegaConf.to_container(composed(overrides, config_name).model, resolve=False)


def test_every_registered_model_composes_and_passes_the_config_check():
    from train import check_config

    names = zoo.list_models()
    assert len(names) > 40
    for name in names:
        cfg = composed([f"model={name}"])
        model = OmegaConf.to_container(cfg.model)
        assert model["name"] == name and set(model) == set(MODEL_KEYS), name
        if name not in FILES:
            assert model == model_node(name), name
        check_config(cfg)
    assert model_cfg(["model=vit_nano", "ckpt_path=x.ckpt"], "evaluate") == model_node("vit_nano")


def test_models_without_a_file_are_stored_and_files_are_not(stored):
    assert set(stored) == set(zoo.list_models()) - set(FILES)
    assert not set(stored) & set(FILES)  # a file and a stored node of one name would be schema-matched
    assert len(FILES) < len(zoo.list_models()) // 4  # no stub per model


def test_a_new_registered_model_needs_no_yaml():
    name = "_test_cfg_net"
    registry._REGISTRY.pop(name, None)
    zoo.register_model(lambda pretrained=False, **kw: nn.Linear(2, 2), name=name, task="classification")
    try:
        assert name in register_model_configs(CONFIGS)
        assert not (CONFIGS / "model" / f"{name}.yaml").exists()
        assert model_cfg([f"model={name}", "model.pretrained=true", "+model.kwargs.drop_path_rate=0.1"]) == {
            **model_node(name), "pretrained": True, "kwargs": {"drop_path_rate": 0.1}}
    finally:
        registry._REGISTRY.pop(name, None)


@pytest.mark.parametrize("name", FILES)
def test_model_files_hold_only_models_whose_defaults_differ(name):
    text = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())
    assert name in zoo.list_models(), f"configs/model/{name}.yaml names no registered model"
    assert text["name"] == name and set(text) == set(MODEL_KEYS)
    assert text != model_node(name), f"configs/model/{name}.yaml is a stub: delete it (the store has it)"
    assert model_cfg([f"model={name}"]) == text  # the file, not the stored node


def test_file_defaults_are_kept():
    assert model_cfg(["model=promptcam_vit_base_dino"])["pretrained"] is True
    assert model_cfg(["model=dcal_deit_tiny"])["kwargs"] == {"drop_path_rate": 0.1}
    assert model_cfg(["model=dcal_deit_nano"]) == model_node("dcal_deit_nano")
    assert MODEL_DEFAULTS == {k: v for k, v in model_node("x").items() if k != "name"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_its_model(experiment):
    from train import check_config

    named = {e: m for m, exps in recipes(CONFIGS / "experiment").items() for e in exps}
    cfg = composed([f"experiment={experiment}"])
    assert cfg.model.name == named[experiment]  # zoo.model_table reads the same `override /model:` line
    assert set(cfg.model) == set(MODEL_KEYS)
    check_config(cfg)
    check_config(composed([f"experiment={experiment}", "ckpt_path=x.ckpt"], "evaluate"), training=False)


def test_experiment_model_kwargs_merge_into_a_stored_node():
    model = model_cfg(["experiment=sparsifiner_deit_small_imagenet", "model.kwargs.teacher_ckpt=t.pth"])
    assert model["name"] == "sparsifiner_deit_small" and model["kwargs"]["teacher_ckpt"] == "t.pth"
    assert model["kwargs"]["phase"] == "backbone"


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(MissingConfigException, match="model/vit_nanoo"):
        composed(["model=vit_nanoo"])
    with pytest.raises(UnknownModelError, match=r"unknown model 'vit_nanoo'\. Did you mean: vit_nano"):
        check_model_overrides(["data=digits", "model=vit_nanoo"], CONFIGS)
    with pytest.raises(UnknownModelError, match="biformer_tiny"):
        check_model_overrides(["-m", "model=vit_nano,biformer_tinyy"], CONFIGS)
    # not a model group override, or a known name: left to Hydra
    check_model_overrides(["-m", "model=vit_nano,dcal_deit_tiny", "model.name=x", "+model.kwargs.a=1",
                           "hydra.run.dir=out", "--cfg", "job", "model=glob(*)"], CONFIGS)


def test_train_cli_unknown_model_exits_2_with_close_names(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "model=vit_nanoo", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Did you mean: vit_nano" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_import_zoo_keeps_hydra_out():
    code = "import sys, zoo; zoo.list_models(); zoo.create_model('vit_nano'); print('hydra' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
