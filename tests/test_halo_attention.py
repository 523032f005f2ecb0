"""HaloNet attn_impl="sdpa" (zoo.layers.halo_attention) against timm's HaloAttn forward: outputs and gradients
within 1e-5 (fp32, CPU) on halonet_tiny and on layers shaped as halonet26t's, timm weights unchanged, and the
CPU side-by-side benchmark's smoke run."""
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.layers.halo_attn import HaloAttn

import zoo
from zoo.layers.halo_attention import HaloAttention, halo_attention_sdpa, set_halo_attn_impl

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # small ops: see conftest

# halonet26t's three halo layers (at stride 16; the strided one into stride 32; at stride 32), at batch 1
HALONET26T_LAYERS = [
    (dict(dim=256, stride=1, num_heads=8, block_size=8, halo_size=2), 16),
    (dict(dim=512, stride=2, num_heads=8, block_size=8, halo_size=2), 16),
    (dict(dim=512, stride=1, num_heads=8, block_size=8, halo_size=2), 8),  # one block: the map is the block
]
OTHER_LAYERS = [
    (dict(dim=64, stride=2, num_heads=4, block_size=4, halo_size=1, qk_ratio=0.5), 8),  # q/k width != v width
    (dict(dim=64, stride=1, num_heads=4, block_size=4, halo_size=1, scale_pos_embed=True), 8),
    (dict(dim=64, stride=2, num_heads=4, block_size=6, halo_size=1, avg_down=True), 12),  # pooled after attention
    (dict(dim=64, stride=1, num_heads=2, block_size=4, halo_size=2), (8, 12)),  # not square
]


def _grads(out, params):
    return torch.autograd.grad(out.square().sum(), params)


def _assert_grads_close(got, want, msg=None):
    """Within 1e-5 on the scale of each gradient (its max magnitude): sums over a window reassociate."""
    s = want.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(got / s, want / s, **TOL, msg=msg)


@pytest.mark.parametrize("kw, hw", HALONET26T_LAYERS + OTHER_LAYERS)
def test_sdpa_layer_matches_timm(kw, hw):
    torch.manual_seed(0)
    attn = HaloAttn(**kw)
    h, w = hw if isinstance(hw, tuple) else (hw, hw)
    x = torch.randn(1 if kw["dim"] > 64 else 2, kw["dim"], h, w, requires_grad=True)
    params = [x, *attn.parameters()]
    ref, got = attn(x), halo_attention_sdpa(attn, x)
    torch.testing.assert_close(got, ref, **TOL)
    for a, b in zip(_grads(got, params), _grads(ref, params)):
        _assert_grads_close(a, b)
    with torch.inference_mode():  # the fused kernel (no autograd) and unfold windows
        torch.testing.assert_close(halo_attention_sdpa(attn, x), attn(x), **TOL)


def _wake_norms(model):
    """Every HaloNet block zero-initialises its last BN (attention invisible in the logits): randomise."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)


def test_halonet_tiny_sdpa_matches_timm_forward_and_grads():
    torch.manual_seed(0)
    ref = zoo.create_model("halonet_tiny", num_classes=10)
    _wake_norms(ref)
    sdpa = zoo.create_model("halonet_tiny", num_classes=10, attn_impl="sdpa")
    sdpa.load_state_dict(ref.state_dict())  # same keys
    assert {m.attn_impl for m in sdpa.modules() if isinstance(m, HaloAttn)} == {"sdpa"}
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(sdpa.eval()(x), ref.eval()(x), **TOL)
    ref.train(), sdpa.train()
    a, b = ref(x), sdpa(x)
    torch.testing.assert_close(b, a, **TOL)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), sdpa.parameters()):
        _assert_grads_close(q.grad, p.grad, msg=name)


def test_timm_weights_load_unchanged_into_sdpa_halonet26t():
    torch.manual_seed(0)
    theirs = timm.create_model("halonet26t").eval()
    _wake_norms(theirs)
    ours = zoo.create_model("halonet26t", attn_impl="sdpa").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_training_after_inference_mode_and_option_checks():
    """The cached index tensors are made outside inference mode: a training step after an inference call works."""
    torch.manual_seed(0)
    attn = set_halo_attn_impl(HaloAttn(dim=32, num_heads=2, block_size=4, halo_size=1), "sdpa")
    assert isinstance(attn, HaloAttention) and attn.attn_impl == "sdpa"
    x = torch.randn(1, 32, 8, 8)
    with torch.inference_mode():
        attn(x)
    attn(x.requires_grad_()).sum().backward()
    assert attn.q.weight.grad is not None
    with pytest.raises(ValueError, match="attn_impl"):
        zoo.create_model("halonet_tiny", attn_impl="flash")
    with pytest.raises(ValueError, match="block size 4"):
        attn(torch.randn(1, 32, 6, 8))


def test_local_attention_cpu_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("local_attention_cpu", ROOT / "bench" / "local_attention_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cpu.json"
    got = bench.main(["--models", "halonet_tiny", "--batch-size", "2", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == got
    rows = {(r["mode"], r["variant"]): r for r in got["rows"]}
    assert set(rows) == {(m, v) for m in ("infer", "train") for v in ("timm", "sdpa")}
    assert rows[("infer", "timm")]["today"] and rows[("infer", "timm")]["ratio_vs_today"] == 1.0
    assert all(r["max_abs_logit_diff"] < 1e-5 and r["img_s"] > 0 for r in got["rows"])
    assert sum(r["default"] for r in got["rows"]) == 2  # one default per mode
    assert got["meta"]["label"].endswith("loaded machine, ratio in one process")
