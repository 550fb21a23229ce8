"""The CUDA distillation kernels (csrc/kernels/distillation.cu) executed on the CPU by the project's
host runtime, against the float64 oracle (online_softmax.reference.distillation; for the gradient, the
backward's formula in float64, checked against autograd through the oracle in
tests/ops/test_distillation.py) on the same rounded inputs and against the CPU op: every dtype and kind, with and without hard labels, at temperatures,
rows shorter and longer than a block's threads and across the backward's register configurations
and its chunked path, rows off a 16-byte boundary, hostile values, out-of-range targets, in place,
and the same bits under every schedule. Each launch is the one online_softmax.cuda_plan reports."""

import math

import pytest
import torch

import host_kernels as hkmod
import online_softmax  # noqa: F401  (the CPU op)
from host_kernels import HostKernels, Limits, assert_ran, plan_for
from testlib import assert_distillation_grad, distillation_case, distillation_formula_grad, distillation_loss_tol, \
    distillation_oracle
from test_kernels_host import DTYPES

pytestmark = hkmod.requires_toolchain()

KINDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}
FORWARD = ["distillation_forward_kernel"]


@pytest.fixture(scope="module")
def hk():
    return HostKernels()


def options(kind, temperature, hard_weight=0.4, beta=0.3):
    return dict(kind=kind, beta=beta, temperature=temperature, hard_weight=hard_weight)


def forward(hk, s, t, tgt, kw, limits=Limits()):
    hk.launches()
    loss, stats, error = hk.distillation_forward(s, t, tgt, KINDS[kw["kind"]], kw["beta"], kw["temperature"],
                                                 kw["hard_weight"], limits=limits, return_error=True)
    assert_ran(hk, plan_for("distillation_forward", tuple(s.shape), s.dtype, limits, target=tgt is not None,
                            kind=kw["kind"]), FORWARD if s.shape[0] else [])
    return loss, stats, error


def backward(hk, g, s, t, tgt, stats, kw, limits=Limits(), in_place=False):
    hk.launches()
    out, error = hk.distillation_backward(g, s, t, tgt, stats, KINDS[kw["kind"]], kw["beta"], kw["temperature"],
                                          kw["hard_weight"], limits=limits, return_error=True, in_place=in_place)
    assert_ran(hk, plan_for("distillation_backward", tuple(s.shape), s.dtype, limits, target=tgt is not None))
    return out, error


def check(hk, s, t, tgt, kw, limits=Limits(), what=""):
    """Forward and backward against the oracle and the CPU op (loss, stats and gradient)."""
    loss, stats, error = forward(hk, s, t, tgt, kw, limits)
    assert error == 0
    tol = distillation_loss_tol(s.dtype)
    want = distillation_oracle(s, t, tgt, **kw)
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol, equal_nan=True, msg=what)
    opts = (kw["kind"], kw["beta"], kw["temperature"], kw["hard_weight"], -100)
    cpu_loss, cpu_stats = torch.ops.online_softmax.distillation_forward(s, t, tgt, *opts)
    # Rows without a distribution are NaN in both; their other stats are the scan's leftovers.
    rows = ~want.isnan()
    torch.testing.assert_close(stats[rows], cpu_stats[rows], rtol=1e-5, atol=tol, equal_nan=True, msg=what)
    g = torch.linspace(0.5, 1.5, s.shape[0], dtype=loss.dtype)
    out, error = backward(hk, g, s, t, tgt, stats, kw, limits)
    assert error == 0 and out.dtype == s.dtype
    finite = torch.isfinite(want)
    if finite.any():
        assert_distillation_grad(out[finite], distillation_formula_grad(s, t, tgt, g, **kw)[finite], s.dtype, what)
    assert torch.equal(out.isnan(), torch.ops.online_softmax.distillation_backward(g, s, t, tgt, stats, *opts).isnan())
    return loss, stats, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_the_oracle_and_the_cpu_op(hk, dtype, kind):
    for n, temperature, target in ((1, 1.0, True), (37, 0.7, False), (300, 1.0, True), (1500, 2.5, True)):
        s, t, tgt = distillation_case(4, n, dtype, seed=n, target=target)
        check(hk, s, t, tgt, options(kind, temperature), what=f"{dtype} {kind} n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_paths_and_alignment(hk, dtype):
    """The backward's register rows, its chunked path (few long rows), and rows that start off a
    16-byte boundary (a view one element into a larger buffer)."""
    kw = options("jsd", 0.8)
    for rows, n in ((6, 64), (2, 9000)):
        s, t, tgt = distillation_case(rows, n, dtype, seed=rows)
        check(hk, s, t, tgt, kw, what=f"rows={rows} n={n}")
    s, t, tgt = distillation_case(3, 41, dtype, seed=5)
    buf_s, buf_t = torch.zeros(3 * 41 + 1, dtype=dtype), torch.zeros(3 * 41 + 1, dtype=dtype)
    buf_s[1:] = s.reshape(-1)
    buf_t[1:] = t.reshape(-1)
    check(hk, buf_s[1:].view(3, 41), buf_t[1:].view(3, 41), tgt, kw, what="off a 16-byte boundary")


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_values(hk, kind):
    n = 70
    s, t, _ = distillation_case(8, n, torch.float32, seed=9, target=False)
    s[0, ::3] = -math.inf
    t[1, ::4] = -math.inf
    s[2] = -math.inf
    t[3] = -math.inf
    s[4, 5] = math.nan
    t[5, 6] = math.inf
    s[6] += 1e4
    t[6] += 1e4
    s[7, ::5] = t[7, ::5] = -math.inf
    loss, _stats, grad = check(hk, s, t, None, options(kind, 0.9, beta=0.6), what="hostile")
    assert loss[2:6].isnan().all() and grad[2:6].isnan().all() and torch.isfinite(loss[6:]).all()


def test_in_place_and_bad_targets(hk):
    s, t, tgt = distillation_case(4, 200, torch.float32, seed=3)
    kw = options("reverse_kl", 1.3)
    loss, stats, _ = forward(hk, s, t, tgt, kw)
    g = torch.ones(4)
    want, _ = backward(hk, g, s, t, tgt, stats, kw)
    over = s.clone()
    backward(hk, g, over, t, tgt, stats, kw, in_place=True)
    assert torch.equal(over, want)
    bad = torch.tensor([0, 200, -100, -1])
    loss, _stats, error = forward(hk, s, t, bad, kw)
    assert error == 1 and loss[1].isnan() and loss[2] == 0 and torch.isfinite(loss[0])
    _out, error = backward(hk, g, s, t, bad, stats, kw)
    assert error == 1


def test_empty_vocabulary_and_rows(hk):
    z = torch.empty(2, 0)
    loss, _stats, error = forward(hk, z, z, None, options("kl", 1.0))
    assert error == 0 and loss.isnan().all()
    loss, _stats, _ = forward(hk, torch.empty(0, 5), torch.empty(0, 5), None, options("kl", 1.0))
    assert loss.shape == (0,)


def test_same_bits_under_every_schedule(hk):
    s, t, tgt = distillation_case(3, 700, torch.float32, seed=11)
    kw = options("jsd", 0.8)
    results = []
    try:
        for schedule in ("in_order", "reversed", "random"):
            hk.set_schedule(schedule, seed=3)
            loss, stats, _ = forward(hk, s, t, tgt, kw)
            grad, _ = backward(hk, torch.ones(3), s, t, tgt, stats, kw)
            results.append((loss, stats, grad))
    finally:
        hk.set_schedule("in_order")
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
