import pytest
import timm
import torch
from torch import nn

import zoo
from zoo.errors import DuplicateModelError, InputSizeError, UnknownModelError

TIMM_HALONETS = ["halonet26t", "halonet50ts", "sehalonet33ts", "eca_halonext26ts", "haloregnetz_b", "halonet_h1"]


def test_list_models_pattern_and_task():
    names = zoo.list_models()
    assert set(TIMM_HALONETS + ["halonet_tiny", "abmil", "fpn_tiny"]) <= set(names)
    assert zoo.list_models("halo*") == sorted(n for n in names if n.startswith("halo"))
    assert zoo.list_models(task="mil") == ["abmil"] or "abmil" in zoo.list_models(task="mil")
    assert all(zoo.get_spec(n).task == "segmentation" for n in zoo.list_models(task="segmentation"))


def test_unknown_model_lists_close_names():
    with pytest.raises(UnknownModelError) as e:
        zoo.create_model("halonet26")
    assert "halonet26t" in str(e.value) and "python -m zoo list" in str(e.value)


def test_duplicate_registration_is_an_error():
    with pytest.raises(DuplicateModelError):
        zoo.register_model(lambda pretrained=False, **kw: nn.Identity(), name="halonet_tiny")


def test_model_info_keys():
    info = zoo.model_info("halonet26t")
    assert info["task"] == "classification" and info["input_size"] == [3, 256, 256]
    assert info["size_divisor"] == 256 and "Vaswani" in info["paper"]
    assert info["params_m"] == pytest.approx(12.48, abs=0.01)


@pytest.mark.parametrize("name", TIMM_HALONETS)
def test_halonet_params_equal_timm(name):
    with torch.device("meta"):
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
        ours = sum(p.numel() for p in zoo.get_spec(name).builder().parameters())
    assert ours == ref


def test_create_model_num_classes_and_kwargs():
    net = zoo.create_model("halonet_tiny", num_classes=7, drop_rate=0.1)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net.zoo_spec.name == "halonet_tiny"


@pytest.mark.parametrize("name,bad,good", [("halonet26t", 224, 256), ("haloregnetz_b", 256, 224), ("halonet_tiny", 48, 64)])
def test_wrong_input_size_fails_before_forward_naming_valid_sizes(name, bad, good):
    spec = zoo.get_spec(name)
    with pytest.raises(InputSizeError) as e:
        spec.check_input_size(bad)
    assert str(good) in str(e.value)
    net = zoo.create_model(name, num_classes=3)
    calls = []
    net.stem.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(InputSizeError):
        net(torch.zeros(1, 3, bad, bad))
    assert not calls  # refused before the first layer ran


def test_pretrained_file_loads_timm_weights_and_reinits_head(tmp_path):
    from safetensors.torch import save_file

    src = zoo.create_model("halonet_tiny", num_classes=10)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "zoo.ckpt")
    for f in ("w.safetensors", "zoo.ckpt"):
        dst = zoo.create_model("halonet_tiny", num_classes=4, pretrained_file=str(tmp_path / f))
        torch.testing.assert_close(dst.stem.conv.weight, src.stem.conv.weight)
        assert dst.get_classifier().weight.shape[0] == 4


def test_pretrained_file_refuses_code_running_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(zoo.WeightsError, match="refused"):
        zoo.create_model("halonet_tiny", pretrained_file=str(tmp_path / "evil.pth"))
