"""The CUDA cross_entropy_backward kernels (csrc/kernels/cross_entropy.cu) executed on the CPU by the
project's host runtime, against the float64 evaluation of the formula on the same rounded inputs and
against the CPU op: every dtype, rows at and around each register configuration's capacity, aligned
and off a 16-byte boundary, the chunked path for long rows and for few rows, grids smaller than the
work, hostile values, with and without smooth_scale and weight, out-of-range targets. Each launch is
the one online_softmax.cuda_plan reports."""

import pytest
import torch

import host_kernels as hkmod
import online_softmax  # noqa: F401  (the CPU op, where this build has it)
from host_kernels import HostKernels, Limits, assert_ran, plan_for
from testlib import assert_cross_entropy_grad, cross_entropy_case, row_state, state_dtype
from test_kernels_host import DTYPES, REGISTER_CAPACITIES, vec

pytestmark = hkmod.requires_toolchain()

ARG_NAMES = ("x", "max", "sumexp", "target", "p_scale", "target_scale", "smooth_scale", "weight")
ROWS_KERNEL = ["cross_entropy_backward_rows_kernel"]
CHUNKS_KERNEL = ["cross_entropy_backward_chunks_kernel"]


@pytest.fixture(scope="module")
def hk():
    return HostKernels()


def cpu_op():
    """The CPU op, or None where the running build does not register it yet."""
    try:
        op = torch.ops.online_softmax.cross_entropy_backward
    except (AttributeError, RuntimeError):
        return None
    return op if torch._C._dispatch_has_kernel_for_dispatch_key(op._qualified_op_name, "CPU") else None


def run(hk, args, limits=Limits(), expect=None, return_error=False):
    """Launches the kernel, checks the launches against cuda_plan and, where the build has it, the
    result against the CPU op's."""
    x = args["x"]
    hk.launches()  # forget earlier launches
    out, error = hk.cross_entropy_backward(**args, limits=limits, return_error=True)
    assert_ran(hk, plan_for("cross_entropy_backward", tuple(x.shape), x.dtype, limits), expect)
    op = cpu_op()
    if op is not None and error == 0:
        want = op(*[args[k] for k in ARG_NAMES])
        assert_cross_entropy_grad(want, args, what="the CPU op")
        assert torch.equal(torch.isnan(out), torch.isnan(want)), "NaN pattern differs from the CPU op's"
        infinite = torch.isinf(want)
        assert torch.equal(out[infinite], want[infinite]), "infinities differ from the CPU op's"
    return (out, error) if return_error else out


SMOOTHING = [(False, False), (True, False), (True, True), (False, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth,weight", SMOOTHING)
def test_register_configs_at_and_around_capacity(hk, dtype, smooth, weight):
    v = vec(dtype)
    for cap in REGISTER_CAPACITIES:
        # The largest row a configuration takes whatever its alignment, and one element more.
        fit = cap * v - (v - 1)
        for n, offset in ((fit, 1), (fit + 1, 0), (max(1, fit - 2), 1)):
            if cap == REGISTER_CAPACITIES[-1] and n > fit:
                continue  # past the last configuration: the chunked path
            args = cross_entropy_case(3, n, dtype, seed=n, offset=offset, smooth=smooth, weight=weight)
            out = run(hk, args, expect=ROWS_KERNEL)
            assert_cross_entropy_grad(out, args, what=f"rows {n} {dtype} offset {offset}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth,weight", SMOOTHING[:3])
def test_chunks_for_long_rows_and_for_few_rows(hk, dtype, smooth, weight):
    v = vec(dtype)
    # Past the largest register configuration: chunks of 4096 granules, the last one short.
    for offset in (0, 1):
        args = cross_entropy_case(2, 4096 * v + 3 * v + 1, dtype, seed=offset, offset=offset, smooth=smooth,
                                  weight=weight)
        out = run(hk, args, limits=Limits(num_sms=1), expect=CHUNKS_KERNEL)
        assert_cross_entropy_grad(out, args, what=f"long rows {dtype} offset {offset}")
    # Fewer rows than SMs: each row cut into chunks to fill them.
    args = cross_entropy_case(3, 1024 * v + 5, dtype, seed=3, offset=1, smooth=smooth, weight=weight)
    plan = plan_for("cross_entropy_backward", (3, 1024 * v + 5), dtype, Limits(num_sms=8))
    assert plan.path == "split" and plan.chunks > 1
    out = run(hk, args, limits=Limits(num_sms=8), expect=CHUNKS_KERNEL)
    assert_cross_entropy_grad(out, args, what=f"few rows {dtype}")


def test_grids_smaller_than_the_work(hk):
    """The grid is capped at 64 blocks per SM: blocks loop over rows, and over rows' chunks."""
    args = cross_entropy_case(9000, 3, torch.float32, seed=1, smooth=True, weight=True)
    plan = plan_for("cross_entropy_backward", (9000, 3), torch.float32, Limits(num_sms=1))
    assert plan.launches[0].grid * plan.launches[0].rows_per_block < 9000
    assert_cross_entropy_grad(run(hk, args, limits=Limits(num_sms=1), expect=ROWS_KERNEL), args, what="row loop")
    n = 4097 * 4
    args = cross_entropy_case(40, n, torch.float32, seed=2, offset=3, smooth=True)
    plan = plan_for("cross_entropy_backward", (40, n), torch.float32, Limits(num_sms=1))
    assert plan.launches[0].grid < 40 * plan.chunks
    assert_cross_entropy_grad(run(hk, args, limits=Limits(num_sms=1), expect=CHUNKS_KERNEL), args, what="chunk loop")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,limits", [(77, Limits()), (40000, Limits(num_sms=1)), (9000, Limits(num_sms=8))])
def test_special_values(hk, dtype, n, limits):
    """-inf logits (p = 0), a row of -inf with the empty state (-inf, 0) (NaN, as the formula), NaN
    in x, max or sumexp, +inf logits, and 1e4-scale logits whose differences to max must stay exact."""
    args = cross_entropy_case(7, n, dtype, seed=n, offset=1, smooth=True, weight=True)
    x, mx, d = args["x"], args["max"], args["sumexp"]
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x[2, 5] = float("nan")
    x[4] = (torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 1e4).to(dtype)
    m64, d64 = row_state(x)
    mx.copy_(m64.to(state_dtype(dtype)))
    d.copy_(d64.to(state_dtype(dtype)))
    x[3, 2] = float("inf")  # beside a finite state: +inf out
    mx[1], d[1] = float("-inf"), 0.0
    d[5] = float("nan")
    args["target"][0] = 0  # a target at a -inf logit: the gradient is -target_scale there
    out = run(hk, args, limits=limits)
    assert_cross_entropy_grad(out, args, what=f"special values {dtype} n={n}")
    assert torch.isnan(out[1]).all() and torch.isnan(out[5]).all() and torch.isnan(out[2, 5])
    assert out[3, 2] == float("inf")


@pytest.mark.parametrize("n,limits", [(300, Limits()), (20000, Limits(num_sms=8)), (20000, Limits(num_sms=1))])
def test_out_of_range_targets_are_flagged_and_never_written(hk, n, limits):
    for bad in (-1, n, n + 10 ** 6, -(2 ** 40)):
        args = cross_entropy_case(3, n, torch.float32, seed=5, smooth=True)
        args["target"][1] = bad
        out, error = run(hk, args, limits=limits, return_error=True)
        assert error == 1
        # The bad row gets the formula without the one-hot (no column matches); the others are exact.
        row = {k: (v[1:2] if k not in ("weight",) and v is not None else v) for k, v in args.items()}
        row["target"] = torch.tensor([-1])
        assert_cross_entropy_grad(out[1:2], row, what="bad target's row")
        good = {k: (v[::2] if k not in ("weight",) and v is not None else v) for k, v in args.items()}
        assert_cross_entropy_grad(out[::2], good, what="rows beside a bad target")
    out, error = run(hk, cross_entropy_case(3, n, torch.float32, seed=6), limits=limits, return_error=True)
    assert error == 0


def test_empty_shapes_launch_nothing(hk):
    for rows, n in ((0, 5), (4, 0), (0, 0)):
        args = cross_entropy_case(rows, n, torch.float32)
        hk.launches()
        out = hk.cross_entropy_backward(**args)
        assert out.shape == (rows, n)
        assert hk.launches() == []
        assert plan_for("cross_entropy_backward", (rows, n), torch.float32, Limits()).path == "nothing"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,limits,kernel", [(77, Limits(), ROWS_KERNEL), (40000, Limits(num_sms=1), CHUNKS_KERNEL),
                                             (9000, Limits(num_sms=8), CHUNKS_KERNEL)])
def test_in_place_equals_out_of_place(hk, dtype, n, limits, kernel):
    """out = x (the in-place op): every element is read before it is written, in both kernels,
    aligned and not, so the gradient is the out-of-place one bit for bit, the targets' included."""
    for offset in (0, 1):
        args = cross_entropy_case(5, n, dtype, seed=n + offset, offset=offset, smooth=True, weight=True)
        want = run(hk, args, limits=limits, expect=kernel)
        x = args["x"]
        hk.launches()
        got = hk.cross_entropy_backward(**args, limits=limits, in_place=True)
        assert got.data_ptr() == x.data_ptr()
        assert_ran(hk, plan_for("cross_entropy_backward", tuple(x.shape), x.dtype, limits), kernel)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        same = ~torch.isnan(want)
        assert torch.equal(got[same], want[same]), f"in place differs {dtype} n={n} offset {offset}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,limits,kernel", [(1000, Limits(), ROWS_KERNEL), (40000, Limits(num_sms=1), CHUNKS_KERNEL)])
def test_large_logits_keep_their_probabilities(hk, dtype, n, limits, kernel):
    """1e4-scale logits (and 1e38-scale in float64): the softmax comes from (max, sumexp), so each
    probability is the float64 softmax of the rounded logits within a few ulps. Through a rounded
    lse = max + log(sumexp) it was off by up to an ulp of lse (6e-4 relative at 1e4 in float32)."""
    scale = 1e4 if dtype == torch.float32 else 1e300
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(4, n, generator=g, dtype=torch.float64) * 2 + scale).to(dtype)
    args = cross_entropy_case(4, n, dtype, seed=1, smooth=True, weight=True)
    args["x"] = x
    m, d = row_state(x)
    args["max"], args["sumexp"] = m.to(state_dtype(dtype)), d.to(state_dtype(dtype))
    out = run(hk, args, limits=limits, expect=kernel)
    want = args["p_scale"].double()[:, None] * torch.softmax(x.double(), -1)
    want[torch.arange(4), args["target"]] -= args["target_scale"].double()
    want -= args["smooth_scale"].double()[:, None] * args["weight"].double()[None, :]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), want, rtol=16 * eps, atol=16 * eps * float(want.abs().max()))
