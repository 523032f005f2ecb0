"""BiFormer attn_impl="flex" (block-sparse FlexAttention) against the gather path, and the GPU benchmark's
CPU smoke run. torch 2.14 has no FlexAttention backward on CPU: gradients are compared on CUDA only."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.layers import routing_attention
from zoo.layers.routing_attention import BiLevelRoutingAttention

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each shape is one compile of flex_attention; past dynamo's recompile limit (8) calls would run the
    eager (dense) flex path: start every test with an empty cache so the compiled kernel is what is tested."""
    torch._dynamo.reset()


def _pair(name: str, device: str = "cpu", **kw):
    torch.manual_seed(0)
    g = zoo.create_model(name, **kw).to(device)
    f = zoo.create_model(name, attn_impl="flex", **kw).to(device)
    f.load_state_dict(g.state_dict())
    return g, f


# (10, 13): map padded on both sides; 16: regions padded to CUDA's block size (exercised here on CPU),
# (12, 12) with 16: only the block padding
@pytest.mark.parametrize("size, multiple", [((10, 13), 1), ((10, 13), 16), ((12, 12), 16)])
def test_bra_flex_matches_gather(size, multiple, monkeypatch):
    monkeypatch.setattr(routing_attention, "_flex_block_multiple", lambda device: multiple)
    torch.manual_seed(0)
    g = BiLevelRoutingAttention(dim=64, num_heads=2, n_win=4, topk=3)
    f = BiLevelRoutingAttention(dim=64, num_heads=2, n_win=4, topk=3, attn_impl="flex")
    f.load_state_dict(g.state_dict())
    x = torch.randn(2, *size, 64)
    with torch.no_grad():
        torch.testing.assert_close(f(x), g(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [64, 56])  # 56: every BRA stage (14, 7, 4 at n_win 4 -> 14, 7 pad) padded
def test_nano_flex_matches_gather(size):
    g, f = _pair("biformer_nano")
    g.eval(), f.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(f(x), g(x), atol=1e-4, rtol=0)


def test_tiny_224_flex_matches_gather():
    g, f = _pair("biformer_tiny")
    g.eval(), f.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(f(x), g(x), atol=1e-4, rtol=0)


def test_attn_impl_keeps_state_dict_keys_and_is_checked():
    g, f = _pair("biformer_nano")
    assert list(g.state_dict()) == list(f.state_dict())
    assert {m.attn_impl for m in f.modules() if isinstance(m, BiLevelRoutingAttention)} == {"flex"}
    fpn = zoo.create_model("biformer_fpn_nano", encoder=dict(attn_impl="flex"))
    assert all(m.attn_impl == "flex" for m in fpn.modules() if isinstance(m, BiLevelRoutingAttention))
    with pytest.raises(Exception, match="attn_impl"):
        zoo.create_model("biformer_nano", attn_impl="dense")


def test_flex_backward_on_cpu_is_refused_by_torch():
    _, f = _pair("biformer_nano")
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        f(torch.randn(1, 3, 64, 64))


@pytest.mark.skipif(not CUDA, reason="FlexAttention backward needs CUDA in torch 2.14")
def test_flex_grads_match_gather_cuda():
    g, f = _pair("biformer_nano", "cuda")
    x = torch.randn(2, 3, 56, 56, device="cuda")  # padded
    a, b = g(x), f(x)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, pg), pf in zip(g.named_parameters(), f.parameters()):
        torch.testing.assert_close(pf.grad, pg.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_gpu_bench_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_attention", ROOT / "bench" / "gpu_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    bench.main(["--device", "cpu", "--batch-size", "2", "--steps", "2", "--models", "biformer_nano",
                "--dtype", "fp32", "--no-isolate", "--out", str(out)])  # fp32, one process: reuses the compiled kernels
    res = json.loads(out.read_text())
    assert [r["label"] for r in res["rows"]] == ["biformer_nano/gather", "biformer_nano/flex"]
    assert all(r["error"] is None and r["infer_img_s"] > 0 for r in res["rows"])
    assert res["rows"][0]["train_img_s"] > 0 and res["rows"][1]["train_img_s"] is None  # no flex backward on CPU
    assert res["rows"][1]["gmacs"] == res["rows"][0]["gmacs"] and res["rows"][0]["infer_peak_share"] > 0
    assert res["checks"][0]["max_abs_logit_diff"] < 1e-4 and res["meta"]["peak_tflops"] == 989.0
