"""Hub folders (zoo.hub): save -> load round trips for every task, timm's local-dir:, the model card,
the refusals (overwrite, pickles), evaluate/init_from/pretrained_file on a folder, and push's errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
import zoo.hf
from zoo.errors import ZooError
from zoo.explain import load_net_from_checkpoint

INFO = {"dataset": "digits", "img_size": 32, "in_chans": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear", "crop_pct": 1.0, "class_names": ["zero", "one", "two"]}
CASES = {  # one model per task: name, kwargs, input
    "classification": ("vit_nano", {}, lambda: torch.randn(2, 3, 32, 32)),
    "segmentation": ("fpn_tiny", {}, lambda: torch.randn(1, 3, 64, 64)),
    "mil": ("abmil", {"in_dim": 16}, lambda: torch.randn(2, 5, 16)),
}


def fake_run(tmp_path: Path, name: str = "vit_nano", kwargs: dict | None = None, info: dict | None = None,
             num_classes: int = 3) -> tuple[Path, torch.nn.Module]:
    """RUN/checkpoints/best.ckpt (a Lightning-style dict) + RUN/config.yaml + RUN/metrics.json."""
    kwargs = dict(kwargs or {})
    torch.manual_seed(0)
    net = zoo.create_model(name, num_classes=num_classes, **kwargs).eval()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": {"name": name, "kwargs": kwargs}, "num_classes": num_classes,
                                     "data_info": INFO if info is None else info}}, ckpt)
    (run / "config.yaml").write_text(f"model:\n  name: {name}\noptim:\n  lr: 0.00123\ntrainer:\n  max_epochs: 7\n")
    (run / "metrics.json").write_text(json.dumps({"test/acc": 0.8125, "test/loss": 0.4321}))
    return ckpt, net


@pytest.mark.parametrize("task", list(CASES))
def test_save_load_round_trip_gives_the_same_outputs(task, tmp_path):
    from zoo.__main__ import main

    name, kwargs, make_x = CASES[task]
    info = INFO if task == "classification" else {"dataset": "x", "class_names": ["a", "b", "c"]}
    ckpt, net = fake_run(tmp_path, name, kwargs, info)
    out = tmp_path / "hub"
    assert main(["save", str(ckpt), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 3 and config["model_args"] == kwargs
    assert config["zoo"]["task"] == task and config["zoo"]["version"] == zoo.__version__
    assert config["label_names"] == info["class_names"]
    x = make_x()
    with torch.no_grad():
        ref = net(x)
        loaded = zoo.create_model(f"local-dir:{out}")
        assert torch.equal(loaded.eval()(x), ref)
        assert loaded.pretrained_cfg["label_names"] == info["class_names"]
        again, hp = load_net_from_checkpoint(out)
        assert torch.equal(again(x), ref)
    assert hp["model"] == {"name": name, "kwargs": kwargs} and hp["num_classes"] == 3
    assert hp["data_info"]["class_names"] == info["class_names"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_timm_local_dir_builds_the_saved_classifier(tmp_path):
    import timm

    ckpt, net = fake_run(tmp_path)
    out = zoo.hub.save_checkpoint(ckpt, tmp_path / "hub")
    x = torch.randn(2, 3, 32, 32)
    t = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert t.num_classes == 3 and type(t) is type(net)
    with torch.no_grad():
        assert torch.equal(t(x), net(x))
    data = timm.data.resolve_data_config(model=t)  # the run's preprocessing, not the spec's
    assert tuple(data["input_size"]) == (3, 32, 32) and tuple(data["mean"]) == (0.5, 0.5, 0.5)
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    fresh = timm.create_model(f"local-dir:{out}", num_classes=5)  # timm's rule: no weights unless pretrained
    assert fresh.num_classes == 5 and "label_names" not in fresh.pretrained_cfg


def test_model_card_names_the_run_and_the_spec(tmp_path):
    ckpt, net = fake_run(tmp_path)
    text = (zoo.hub.save_checkpoint(ckpt, tmp_path / "hub") / "README.md").read_text()
    spec = zoo.get_spec("vit_nano")
    assert text.startswith("---\n") and f"license: {spec.license}" in text and "- digits" in text
    assert "| test | acc | 0.8125 |" in text and "| test | loss | 0.4321 |" in text and "metrics.json" in text
    assert "lr: 0.00123" in text and "max_epochs: 7" in text  # the recipe: the run's config.yaml
    params = sum(p.numel() for p in net.parameters()) / 1e6
    assert f"**Parameters (M):** {params:.3f}" in text and "GFLOPs" in text
    assert "3x32x32" in text and "bilinear" in text and "(zero, one, two)" in text
    assert spec.paper in text and "arxiv.org/abs/2010.11929" in text and "@misc{vit_nano" in text
    assert spec.weights.note in text  # the known limitation the spec records
    assert 'zoo.create_model("hf-hub:ORG/NAME")' in text and "timm.create_model" in text


def test_save_refuses_to_overwrite_and_never_the_input(tmp_path, capsys):
    from zoo.__main__ import main

    ckpt, _ = fake_run(tmp_path)
    out = tmp_path / "hub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["save", str(ckpt), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for target in (ckpt.parent.parent, ckpt.parent):  # a folder holding the checkpoint: not even with --overwrite
        assert main(["save", str(ckpt), "--out", str(target), "--overwrite"]) == 2
        assert "would destroy the input" in " ".join(capsys.readouterr().err.split())
    assert ckpt.is_file()
    assert main(["save", str(ckpt), "--out", str(out), "--overwrite"]) == 2  # not a Hub folder: kept
    assert "not a Hub folder" in " ".join(capsys.readouterr().err.split()) and (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    assert main(["save", str(ckpt), "--out", str(out)]) == 0  # an empty folder is fine
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["save", str(ckpt), "--out", str(out), "--overwrite"]) == 0  # a Hub folder, replaced
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_mtime_ns >= before
    assert main(["save", f"local-dir:{out}", "--out", str(out), "--overwrite"]) == 2  # its own input
    assert main(["save", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_a_folder_with_only_a_pickle_is_refused(tmp_path):
    ckpt, net = fake_run(tmp_path)
    out = zoo.hub.save_checkpoint(ckpt, tmp_path / "hub")
    (out / "model.safetensors").unlink()
    torch.save(net.state_dict(), out / "pytorch_model.bin")
    for load in (lambda: zoo.create_model(f"local-dir:{out}"), lambda: load_net_from_checkpoint(out),
                 lambda: zoo.create_model("vit_nano", num_classes=3, pretrained_file=str(out))):
        with pytest.raises(zoo.WeightsError, match=r"only pytorch_model.bin .*safetensors only"):
            load()
    with pytest.raises(ZooError, match="not a Hub folder"):
        load_net_from_checkpoint(tmp_path)


def test_init_from_and_pretrained_file_take_a_folder(tmp_path):
    from zoo.runner import init_from_checkpoint

    ckpt, net = fake_run(tmp_path)
    out = zoo.hub.save_checkpoint(ckpt, tmp_path / "hub")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        via_file = zoo.create_model("vit_nano", num_classes=3, pretrained_file=str(out)).eval()
        assert torch.equal(via_file(x), ref)
        target = zoo.create_model("vit_nano", num_classes=5)
        assert sorted(init_from_checkpoint(target, str(out))) == ["head.bias", "head.weight"]  # new head: re-initialised
        assert torch.equal(target.eval().forward_features(x), net.forward_features(x))


def test_evaluate_a_folder_like_its_checkpoint(compose_cfg, tmp_path):
    from evaluate import evaluate

    ckpt, _ = fake_run(tmp_path, info={}, num_classes=10)  # data=digits' own input and classes
    out = zoo.hub.save_checkpoint(ckpt, tmp_path / "hub")
    runs = [evaluate(compose_cfg("evaluate", [f"ckpt_path={src}", "data=digits", "trainer=debug", "model=vit_nano"],
                                 out_dir=tmp_path / f"eval{i}")) for i, src in enumerate((ckpt, out))]
    assert "test/acc" in runs[0] and runs[0] == runs[1]


def test_push_fails_at_once_without_token_or_network(tmp_path, monkeypatch):
    from zoo.__main__ import main

    ckpt, _ = fake_run(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ZooError, match="no Hugging Face token"):
        zoo.hf.push(ckpt, "me/net")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ZooError, match="the Hub cannot be reached .*HF_HUB_OFFLINE"):
        zoo.hf.push(ckpt, "me/net")
    with pytest.raises(ZooError, match="cannot download hf-hub:me/net: the Hub cannot be reached"):
        zoo.create_model("hf-hub:me/net")
    with pytest.raises(ZooError, match="ORG/NAME"):
        zoo.hf.push(ckpt, "no-org")
    assert main(["push", str(ckpt), "--repo", "me/net", "--dry-run", str(tmp_path / "dry")]) == 0
    assert sorted(p.name for p in (tmp_path / "dry").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    monkeypatch.setattr("zoo.hf._hf", lambda: (_ for _ in ()).throw(zoo.hub.HubError("needs huggingface_hub")))
    assert main(["push", str(ckpt), "--repo", "me/net"]) == 2


def test_hf_hub_without_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("zoo.hf.reachable", lambda timeout=3.0: "huggingface.co cannot be reached (gaierror)")
    with pytest.raises(ZooError, match=r"the Hub cannot be reached \(huggingface.co cannot be reached"):
        load_net_from_checkpoint("hf-hub:me/net")


def test_save_pretrained_from_python_checks_the_folder_rebuilds_the_net(tmp_path):
    torch.manual_seed(0)
    net = zoo.create_model("vit_nano", num_classes=4, img_size=64).eval()
    with pytest.raises(ZooError, match="pass the model_kwargs the net was built with"):
        zoo.save_pretrained(net, tmp_path / "bad")  # without img_size=64 the folder would build another net
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())
    out = zoo.save_pretrained(net, tmp_path / "good", model_kwargs={"img_size": 64})
    loaded = zoo.create_model(f"local-dir:{out}")
    assert loaded.pretrained_cfg["input_size"] == [3, 64, 64] and "label_names" not in loaded.pretrained_cfg
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), net(x))
    assert "No measured metrics" in (out / "README.md").read_text()


def test_hf_hub_names_load_the_downloaded_folder(tmp_path, monkeypatch):
    """The Hub stands in as a local folder (no network here): hf_hub_download returns its files."""
    import timm
    import timm.models._hub

    ckpt, net = fake_run(tmp_path)
    repo = zoo.hub.save_checkpoint(ckpt, tmp_path / "hub")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename, kwargs.get("revision")))
        return str(repo / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("zoo.hf.reachable", lambda timeout=3.0: None)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_download)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(zoo.create_model("hf-hub:me/net@v1").eval()(x), net(x))
        assert torch.equal(timm.create_model("hf-hub:me/net", pretrained=True).eval()(x), net(x))
    assert ("me/net", "model.safetensors", "v1") in asked
