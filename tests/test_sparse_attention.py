"""Sparsifiner execution="sdpa" (the connectivity as a float mask to torch's fused attention) against the
official dense-then-mask execution and the other sparse ones: outputs and gradients within 1e-5 (fp32, CPU),
and what execution="auto" runs in each mode."""
import math

import pytest
import torch

import zoo
from zoo.layers.sparse_attention import (gather_attention, masked_dense_attention, sdpa_masked_attention,
                                         topk_indices_nonneg)
from zoo.layers.sparsifiner_attention import EXECUTIONS

TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # small ops: see conftest


def nano(**kw):
    torch.manual_seed(0)
    return zoo.create_model("sparsifiner_deit_nano", num_classes=10, **kw)


def test_sdpa_masked_attention_equals_masked_dense_forward_and_grads():
    torch.manual_seed(0)
    B, H, n, d = 2, 3, 50, 16
    q, k, v = (torch.randn(B, H, n, d, requires_grad=True) for _ in range(3))
    idx = topk_indices_nonneg(torch.rand(B, H, n - 1, n), math.ceil(0.25 * n))
    args = (q[:, :, 1:], k, v, idx, d ** -0.5)
    want, got = masked_dense_attention(*args), sdpa_masked_attention(*args)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(sdpa_masked_attention(*args), gather_attention(*args), **TOL)


@pytest.mark.parametrize("prune", [(), (1, 2)])
def test_model_sdpa_execution_equals_masked_in_eval_and_training(prune):
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    models = {ex: nano(token_pruning_loc=prune, token_keep_rate=0.7, execution=ex) for ex in ("masked", "sdpa", "gather")}
    for m in models.values():
        m.load_state_dict(models["masked"].state_dict())
    with torch.inference_mode():
        want = models["masked"].eval()(x)
        torch.testing.assert_close(models["sdpa"].eval()(x), want, **TOL)
    grads = {}
    for ex, m in models.items():  # phase two training step: the sparse attention under autograd
        logits, losses = m.train().forward_train(x, y)
        sum(losses.values()).backward()
        grads[ex] = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["masked"].keys() and grads["sdpa"]
    for other in ("masked", "gather"):
        for k, g in grads["sdpa"].items():
            torch.testing.assert_close(g, grads[other][k], **TOL, msg=f"{k} vs {other}")


def test_auto_execution_picks_csr_for_inference_and_sdpa_for_training():
    attn = nano().blocks[0].attn
    assert attn.execution == "auto"
    assert (attn.resolved_execution(grad=False), attn.resolved_execution(grad=True)) == ("csr", "sdpa")
    assert nano(execution="gather").blocks[0].attn.resolved_execution(grad=True) == "gather"
    assert "sdpa" in EXECUTIONS
    with pytest.raises(ValueError, match="execution must be one of"):
        nano(execution="flex")


def test_gpu_bench_variant_rows_and_checks_cpu_smoke(tmp_path, monkeypatch):
    """bench/gpu_attention.py's per-execution rows and checks, on the CPU with the tiny models standing in."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_attention", Path(__file__).resolve().parents[1] / "bench" / "gpu_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "VARIANTS", {"halonet_tiny": bench.VARIANTS["halonet26t"],
                                            "sparsifiner_deit_nano": bench.VARIANTS["sparsifiner_deit_small"]})
    out = tmp_path / "g.json"
    bench.main(["--device", "cpu", "--batch-size", "1", "--steps", "1", "--models", "halonet_tiny", "sparsifiner_deit_nano",
                "--dtype", "fp32", "--no-isolate", "--out", str(out)])
    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["halonet_tiny/timm", "halonet_tiny/sdpa", "sparsifiner_deit_nano/csr", "sparsifiner_deit_nano/sdpa",
                          "sparsifiner_deit_nano/gather", "sparsifiner_deit_nano/masked"]
    assert all(r["error"] is None and r["infer_img_s"] > 0 for r in rows.values())
    assert rows["sparsifiner_deit_nano/csr"]["train_img_s"] is None and rows["halonet_tiny/sdpa"]["train_img_s"] > 0
    checks = {c["model"]: c for c in res["checks"]}
    assert max(checks["halonet_tiny"]["max_abs_logit_diff"].values()) < 1e-5
    assert max(checks["sparsifiner_deit_nano"]["max_abs_grad_diff"].values()) < 1e-5
    assert set(checks["sparsifiner_deit_nano"]["max_abs_grad_diff"]) == {"sdpa", "gather", "masked"}
