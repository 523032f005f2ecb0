"""BiFormer's "masked" BRA execution (dense SDPA with the routing as a -inf bias), used by the default "gather"
where routing keeps at least MASKED_FROM of the regions: outputs and gradients equal the routed-gather path."""
import pytest
import torch

import zoo
from zoo.layers import routing_attention
from zoo.layers.routing_attention import MASKED_FROM, BiLevelRoutingAttention


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # small ops: see conftest


def _pair(**kw):
    torch.manual_seed(0)
    g = BiLevelRoutingAttention(**kw)
    m = BiLevelRoutingAttention(**kw, attn_impl="masked")
    m.load_state_dict(g.state_dict())
    return g, m


# (16, 16): no padding (the fused output add); (10, 13): padded on both sides (masked padded keys)
@pytest.mark.parametrize("size", [(16, 16), (10, 13)])
def test_masked_matches_gather_forward_and_grads(size, monkeypatch):
    monkeypatch.setattr(routing_attention, "MASKED_FROM", 2.0)  # "gather" stays gather on every layer
    g, m = _pair(dim=64, num_heads=2, n_win=4, topk=6)
    assert (g.execution(), m.execution()) == ("gather", "masked")
    x = torch.randn(2, *size, 64, requires_grad=True)
    a, b = g(x), m(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().mean(), [x, *g.parameters()])
    gb = torch.autograd.grad(b.square().mean(), [x, *m.parameters()])
    for u, w in zip(gb, ga):
        torch.testing.assert_close(u, w, atol=1e-5, rtol=1e-4)


def test_gather_runs_masked_where_routing_is_dense():
    net = zoo.create_model("biformer_tiny")  # n_win 7, topks (1, 4, 16): only stage 3 reaches a quarter of 49
    got = {(i, b.attn.execution()) for i, st in enumerate(net.stages) for b in st.blocks
           if isinstance(b.attn, BiLevelRoutingAttention)}
    assert got == {(0, "gather"), (1, "gather"), (2, "masked")} and 16 >= MASKED_FROM * 49 > 4
    assert BiLevelRoutingAttention(dim=64, num_heads=2, n_win=4, topk=4, attn_impl="flex").execution() == "flex"


def test_nano_default_matches_all_gather(monkeypatch):
    torch.manual_seed(0)
    net = zoo.create_model("biformer_nano").eval()  # 4x4 regions, topks 2, 4, 8: stages 2-3 run masked
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want_masked = net(x)
        monkeypatch.setattr(routing_attention, "MASKED_FROM", 2.0)
        torch.testing.assert_close(want_masked, net(x), atol=1e-5, rtol=1e-5)
