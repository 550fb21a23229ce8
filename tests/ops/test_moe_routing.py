"""softmax_topk for MoE routing: renormalize=True (Mixtral's softmax -> topk -> divide by the sum) and
an output dtype, against the torch sequence routers run and a float64 reference."""

import pytest
import torch

import online_softmax as osm
from testlib import random_logits


def router_reference(x, k, dim=-1, renormalize=True, log=False, temperature=1.0):
    """The torch sequence, in float64."""
    p = torch.softmax(x.double() / temperature, dim)
    w, idx = p.topk(k, dim)
    if renormalize:
        w = w / w.sum(dim, keepdim=True)
    return (w.log() if log else w), idx


def logits(rows, experts, dtype, seed=0):
    return random_logits((rows, experts), dtype, scale=2.0, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("experts,k", [(8, 2), (64, 8), (256, 8), (7, 1), (64, 64), (257, 2)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("log", [False, True])
def test_renormalized_weights_equal_the_router_sequence(device, dtype, experts, k, out_dtype, log):
    x = logits(300, experts, dtype, seed=experts).to(device)
    got = osm.softmax_topk(x, k, renormalize=True, dtype=out_dtype, log=log)
    want_w, want_idx = router_reference(x.cpu(), k, log=log)
    assert got.values.dtype == (out_dtype or dtype) and got.indices.dtype == torch.int64
    assert torch.equal(got.indices.cpu(), want_idx) or dtype in (torch.bfloat16, torch.float16)
    # The weights of the indices returned, from the float64 reference, whatever the tie order.
    ref = torch.softmax(x.cpu().double(), -1).gather(-1, got.indices.cpu())
    ref = ref / ref.sum(-1, keepdim=True)
    ref = ref.log() if log else ref
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(out_dtype or dtype, 1e-2)
    torch.testing.assert_close(got.values.cpu().double(), ref, rtol=tol, atol=tol)
    if not log:
        torch.testing.assert_close(got.values.double().sum(-1).cpu(), torch.ones(300, dtype=torch.float64),
                                   rtol=tol * 4, atol=tol * 4)
    if out_dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16):
        # Computed from the logits in float32, not rounded through bfloat16 probabilities.
        assert (got.values.cpu().double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("log", [False, True])
def test_float32_values_without_renormalizing(device, dtype, log):
    x = logits(64, 256, dtype).to(device)
    got = osm.softmax_topk(x, 8, dtype=torch.float32, log=log)
    want, idx = router_reference(x.cpu(), 8, renormalize=False, log=log)
    assert got.values.dtype == torch.float32
    ref = torch.softmax(x.cpu().double(), -1).gather(-1, got.indices.cpu())
    ref = ref.log() if log else ref
    torch.testing.assert_close(got.values.cpu().double(), ref, rtol=3e-6, atol=3e-6)


def test_hostile_rows_dims_and_views(device):
    x = logits(6, 16, torch.float32).to(device)
    x[0, 3] = float("inf")
    x[1] = float("-inf")
    x[2, :5] = float("-inf")
    x[3, 7] = float("nan")
    x[4] *= 1e4
    got = osm.softmax_topk(x, 4, renormalize=True)
    want = torch.softmax(x.cpu(), -1).topk(4)
    want_w = want.values / want.values.sum(-1, keepdim=True)
    torch.testing.assert_close(got.values.cpu(), want_w, equal_nan=True)
    assert torch.isnan(got.values[1]).all() and torch.isnan(got.values[3]).all()
    # Along dim 0 of a non-contiguous view.
    y = logits(40, 12, torch.float32).to(device).t()
    got = osm.softmax_topk(y, 3, dim=0, renormalize=True, dtype=torch.float64)
    ref_w, ref_i = router_reference(y.cpu(), 3, dim=0)
    assert got.values.shape == (3, 40) and torch.equal(got.indices.cpu(), ref_i)
    torch.testing.assert_close(got.values.cpu(), ref_w, rtol=1e-6, atol=1e-6)
    assert osm.softmax_topk(x[:0], 2, renormalize=True).values.shape == (0, 2)


def test_gradients_and_compile():
    x = logits(5, 9, torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda t: osm.softmax_topk(t, 3, renormalize=True).values, (x,))
    torch.autograd.gradcheck(lambda t: osm.softmax_topk(t, 3, log=True, renormalize=True).values, (x,))
    xf = logits(5, 9, torch.float32).requires_grad_()
    v = osm.softmax_topk(xf, 3, dtype=torch.float64).values
    v.sum().backward()
    xr = xf.detach().clone().requires_grad_()
    torch.softmax(xr, -1).topk(3).values.sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad)
    f = torch.compile(lambda t: osm.softmax_topk(t, 2, renormalize=True, dtype=torch.float32), fullgraph=True)
    xb = logits(128, 64, torch.bfloat16)
    for a, b in zip(f(xb), osm.softmax_topk(xb, 2, renormalize=True, dtype=torch.float32)):
        torch.testing.assert_close(a, b)


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating"):
        osm.softmax_topk(torch.randn(3, 4), 2, dtype=torch.int32)


@pytest.mark.parametrize("src,out_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("masked", [False, True])
def test_log_values_of_zero_probabilities_are_minus_inf_with_a_dtype(device, src, out_dtype, masked):
    """A selected probability of 0 has log-value -inf in any output dtype (a straight-through cast
    of -inf made NaN), and its gradient is torch's."""
    x = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [2.0, -1.0, 0.5, 0.25]], dtype=src, device=device)
    mask = torch.tensor([True, True, True, False], device=device) if masked else None
    leaf = x.clone().requires_grad_()
    got = osm.softmax_topk(leaf, 3, log=True, dtype=out_dtype, mask=mask)
    keep = torch.ones(4, dtype=torch.bool, device=device) if mask is None else mask
    want = torch.log_softmax(x.double().masked_fill(~keep, float("-inf")), -1).gather(-1, got.indices.clamp_min(0))
    assert got.values.dtype == out_dtype
    assert not got.values.isnan().any()
    torch.testing.assert_close(got.values.double().cpu(), want.cpu(), rtol=1e-3, atol=1e-3)
    g = torch.arange(1.0, 7.0, dtype=out_dtype, device=device).reshape(2, 3)
    got.values.backward(g)
    ref_leaf = x.double().clone().requires_grad_()
    picked = torch.log_softmax(ref_leaf.masked_fill(~keep, float("-inf")), -1).gather(-1, got.indices.clamp_min(0))
    picked.backward(g.double())
    assert not leaf.grad.isnan().any()
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad.cpu(), rtol=1e-2, atol=1e-2)
