"""Property-based fuzzing of the kernels against the textbook reference algorithms, on each device
(the `device` fixture: the rows are drawn on the CPU, the op runs on the device, the reference on the
CPU)."""

import math

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import online_softmax as osm
from online_softmax import reference

finite = st.floats(min_value=-80, max_value=80, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([float("-inf"), float("inf"), float("nan"), 0.0, 1e4, -1e4])


# The device fixture is a constant string: nothing to reset between examples.
fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def rows(draw, allow_special=False):
    n = draw(st.integers(min_value=1, max_value=80))
    m = draw(st.integers(min_value=1, max_value=4))
    elem = st.one_of(finite, special) if allow_special else finite
    data = draw(st.lists(st.lists(elem, min_size=n, max_size=n), min_size=m, max_size=m))
    return torch.tensor(data, dtype=torch.float32)


@settings(fuzz, max_examples=150)
@given(x=rows(), block=st.integers(min_value=1, max_value=40), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_softmax_vs_block_online_reference(device, x, block, temperature):
    ref = reference.block_online_softmax(x.double() / temperature, block)
    xd = x.to(device)
    torch.testing.assert_close(osm.softmax(xd, -1, temperature=temperature).double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(osm.log_softmax(xd, -1, temperature=temperature).double().cpu(),
                               torch.log(ref), rtol=1e-5, atol=1e-4)


@settings(fuzz, max_examples=150)
@given(x=rows(allow_special=True))
def test_special_values_vs_torch(device, x):
    for ours, theirs in ((osm.softmax, torch.softmax), (osm.log_softmax, torch.log_softmax)):
        y, ref = ours(x.to(device), -1).cpu(), theirs(x.double(), -1)
        torch.testing.assert_close(torch.isnan(y), torch.isnan(ref))
        ok = torch.isfinite(ref)
        torch.testing.assert_close(y[ok].double(), ref[ok], rtol=1e-5, atol=1e-5)


@settings(fuzz, max_examples=100)
@given(x=rows(allow_special=True), data=st.data())
def test_topk_vs_heap_reference(device, x, data):
    k = data.draw(st.integers(min_value=1, max_value=x.shape[1]))
    log = data.draw(st.booleans())
    values, indices = (t.cpu() for t in osm.softmax_topk(x.to(device), k, log=log))
    ref_v, ref_i = reference.online_softmax_topk(x.double(), k, log=log)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(values.double(), ref_v.double(), rtol=1e-5, atol=1e-5, equal_nan=True)


@settings(fuzz, max_examples=100)
@given(x=rows(), pieces=st.integers(min_value=1, max_value=5))
def test_stats_merge_vs_reference(device, x, pieces):
    chunks = torch.tensor_split(x.to(device), min(pieces, x.shape[1]), dim=1)  # views: rows that start mid-row
    merged = osm.merge_states(osm.softmax_stats(c) for c in chunks)
    ref = reference.partial_state(x.double())
    torch.testing.assert_close(merged.max.double().cpu(), ref.m)
    torch.testing.assert_close(merged.sumexp.double().cpu(), ref.d, rtol=1e-5, atol=0)
    assert not math.isnan(merged.sumexp.sum().item())
