"""Property test: create_model with random valid and invalid class counts, sizes and kwargs, for every
registered model, either works (and then runs at a legal input) or raises the zoo's own error."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo

SMALL = {n for n in zoo.list_models() if (zoo.model_info(n).get("params_m") or 1e9) < 2.0}  # forward on CPU
EXAMPLES = int(os.environ.get("ZOO_PROPERTY_EXAMPLES", 4))  # more for a thorough local run

num_classes = st.one_of(st.integers(-2, 12), st.sampled_from([None, 2.5, "ten", True]))
extra = st.fixed_dictionaries({}, optional={
    "in_chans": st.one_of(st.integers(-1, 4), st.just("3")),
    "drop_path_rate": st.floats(-0.5, 1.5, allow_nan=False),
    "not_an_argument": st.just(1),
})


@pytest.mark.parametrize("name", zoo.list_models())
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(classes=num_classes, kwargs=extra, size=st.integers(-4, 80), valid_size=st.booleans(),
       bag=st.integers(1, 6), in_dim=st.one_of(st.integers(-1, 24), st.just(None)))
def test_create_model_works_or_raises_zoo_error(name, classes, kwargs, size, valid_size, bag, in_dim):
    spec = zoo.get_spec(name)
    if spec.task == "mil":
        kwargs = {**kwargs, "in_dim": in_dim if in_dim is not None else 16}
    small = name in SMALL
    try:
        if small:
            torch.manual_seed(0)
            net = zoo.create_model(name, num_classes=classes, **kwargs)
        else:  # paper-size: construction only, without memory
            with torch.device("meta"):
                net = zoo.create_model(name, num_classes=classes, **kwargs)
    except zoo.ZooError as e:
        assert str(e)
        return
    if not small:
        return
    net.eval()
    if spec.task == "mil":
        x = torch.randn(1, bag, kwargs["in_dim"])
    else:
        if valid_size:
            size = spec.input_size[-1] if spec.fixed_input_size else spec.valid_sizes(around=max(size, 1), count=1)[0]
            size = min(size, 64)
            if size % spec.size_divisor or size < spec.min_size:
                size = spec.valid_sizes(around=1, count=1)[0]
        if size < 1:
            return  # not an image
        x = torch.randn(1, kwargs.get("in_chans", spec.input_size[0]), size, size)
    try:
        with torch.no_grad():
            out = net(x)
    except zoo.InputSizeError:
        assert not valid_size or spec.task == "mil"
        return
    assert out.shape[0] == 1 and torch.isfinite(out).all()
