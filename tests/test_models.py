"""Every registered model: forward and backward at its smallest legal input, all parameters get gradients."""
import pytest
import torch

import zoo
from zoo.contract import capabilities


def smallest_input(spec):
    if spec.task == "mil":
        return None
    c = spec.input_size[0]
    s = spec.input_size[-1] if spec.fixed_input_size else spec.valid_sizes(around=1, count=1)[0]
    return torch.randn(2, c, s, s)


@pytest.mark.parametrize("name", zoo.list_models())
def test_forward_backward_all_params_get_grads(name):
    torch.manual_seed(0)
    spec = zoo.get_spec(name)
    num_classes = 3
    if spec.task == "mil":
        net = zoo.create_model(name, num_classes=num_classes, in_dim=32)
        x = torch.randn(2, 9, 32)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 5:] = False
        out = net(x, mask=mask)
        expected = (2, num_classes)
    else:
        net = zoo.create_model(name, num_classes=num_classes)
        x = smallest_input(spec)
        out = net(x)
        expected = (2, num_classes) if spec.task == "classification" else (2, num_classes, *x.shape[-2:])
    assert out.shape == expected
    assert torch.isfinite(out).all()
    loss = out.float().square().mean()
    if capabilities(net).own_objective:  # the contract says whether the net has its own forward_train
        y = torch.randint(0, num_classes, expected[:1] if spec.task != "segmentation" else (2, *x.shape[-2:]))
        _, losses = net.forward_train(x, y, **({"mask": mask} if spec.task == "mil" else {}))
        loss = loss + sum(losses.values())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_abmil_image_bags_and_padding():
    net = zoo.create_model("abmil", num_classes=2, in_chans=1).eval()
    x = torch.randn(2, 6, 1, 28, 28)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    a = net.attention_weights(x, mask)[:, 0]
    assert torch.allclose(a.sum(-1), torch.ones(2)) and (a[1, 4:] == 0).all()
    # a padded bag scores exactly like the same bag alone
    alone = net(x[1:2, :4])
    torch.testing.assert_close(net(x, mask)[1:2], alone, atol=1e-5, rtol=1e-5)


def test_halonet_attention_maps_shape():
    net = zoo.create_model("halonet_tiny", num_classes=10).eval()
    maps = net.attention_maps(torch.randn(2, 3, 64, 64))
    assert maps["halo_received"].shape == (2, 4, 8, 8)
    assert (maps["halo_received"] >= 0).all()
