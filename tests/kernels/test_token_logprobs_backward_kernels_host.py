"""The CUDA token_logprobs_backward kernels (csrc/kernels/token_logprobs_backward.cu) executed on the
CPU by the project's host runtime, against the float64 evaluation of the formula on the same rounded
inputs and against the CPU op: every dtype, rows at and around each register configuration's
capacity, aligned and off a 16-byte boundary, the chunked path for long rows and for few rows,
hostile values, with and without grad_entropy, temperatures, out-of-range token ids, in place. Each
launch is the one online_softmax.cuda_plan reports."""

import pytest
import torch

import host_kernels as hkmod
import online_softmax  # noqa: F401  (the CPU op)
from host_kernels import HostKernels, Limits, assert_ran, plan_for
from testlib import assert_token_logprobs_grad, state_dtype, token_logprobs_backward_case, token_row_state
from test_kernels_host import DTYPES, REGISTER_CAPACITIES, vec

pytestmark = hkmod.requires_toolchain()

ARG_NAMES = ("grad_log_probs", "grad_entropy", "x", "token_ids", "max", "sumexp", "entropy", "temperature")
ROWS_KERNEL = ["token_logprobs_backward_rows_kernel"]
CHUNKS_KERNEL = ["token_logprobs_backward_chunks_kernel"]


@pytest.fixture(scope="module")
def hk():
    return HostKernels()


def run(hk, args, limits=Limits(), expect=None, return_error=False):
    """Launches the kernel, checks the launches against cuda_plan and, where no id is out of range,
    the result against the CPU op's (NaN and infinities alike, values within the formula's budget)."""
    x = args["x"]
    hk.launches()  # forget earlier launches
    out, error = hk.token_logprobs_backward(**args, limits=limits, return_error=True)
    assert_ran(hk, plan_for("token_logprobs_backward", tuple(x.shape), x.dtype, limits,
                            grad_entropy=args["grad_entropy"] is not None), expect)
    if error == 0:
        want = torch.ops.online_softmax.token_logprobs_backward(*[args[k] for k in ARG_NAMES])
        assert_token_logprobs_grad(want, args, what="the CPU op")
        assert torch.equal(torch.isnan(out), torch.isnan(want)), "NaN pattern differs from the CPU op's"
        infinite = torch.isinf(want)
        assert torch.equal(out[infinite], want[infinite]), "infinities differ from the CPU op's"
    return (out, error) if return_error else out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entropy", [True, False])
def test_register_configs_at_and_around_capacity(hk, dtype, entropy):
    v = vec(dtype)
    for cap in REGISTER_CAPACITIES:
        fit = cap * v - (v - 1)
        for n, offset in ((fit, 1), (fit + 1, 0), (max(1, fit - 2), 1)):
            if cap == REGISTER_CAPACITIES[-1] and n > fit:
                continue  # past the last configuration: the chunked path
            args = token_logprobs_backward_case(3, n, dtype, seed=n, offset=offset, entropy=entropy,
                                                temperature=0.7 if offset else 1.0)
            out = run(hk, args, expect=ROWS_KERNEL)
            assert_token_logprobs_grad(out, args, what=f"rows {n} {dtype} offset {offset}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_for_long_rows_and_for_few_rows(hk, dtype):
    v = vec(dtype)
    for offset in (0, 1):
        args = token_logprobs_backward_case(2, 4096 * v + 3 * v + 1, dtype, seed=offset, offset=offset,
                                            temperature=1.3)
        out = run(hk, args, limits=Limits(num_sms=1), expect=CHUNKS_KERNEL)
        assert_token_logprobs_grad(out, args, what=f"long rows {dtype} offset {offset}")
    args = token_logprobs_backward_case(3, 1024 * v + 5, dtype, seed=3, offset=1, entropy=False)
    assert plan_for("token_logprobs_backward", (3, 1024 * v + 5), dtype, Limits(num_sms=8)).chunks > 1
    out = run(hk, args, limits=Limits(num_sms=8), expect=CHUNKS_KERNEL)
    assert_token_logprobs_grad(out, args, what=f"few rows {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,limits", [(77, Limits()), (40000, Limits(num_sms=1)), (9000, Limits(num_sms=8))])
def test_special_values(hk, dtype, n, limits):
    """-inf logits (p = 0: exactly 0, not 0 * -inf, with grad_entropy), a token at a -inf logit, a
    row of -inf with the empty state (NaN, as torch), NaN in x or sumexp, and 1e4-scale logits at a
    temperature, whose exponents must keep their digits."""
    args = token_logprobs_backward_case(7, n, dtype, seed=n, offset=1, temperature=0.9)
    x = args["x"]
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x[2, 5] = float("nan")
    x[4] = (torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 1e4).to(dtype)
    m, d, h = token_row_state(x, 0.9)
    acc = state_dtype(dtype)
    args["max"], args["sumexp"], args["entropy"] = m.to(acc), d.to(acc), h.to(acc)
    args["sumexp"][5] = float("nan")
    args["token_ids"][0] = 0  # at a -inf logit: its gradient is s * grad_log_probs alone
    out = run(hk, args, limits=limits)
    assert_token_logprobs_grad(out, args, what=f"special values {dtype} n={n}")
    assert (out[0, 3::3] == 0).all() and torch.isnan(out[1]).all() and torch.isnan(out[5]).all()
    assert torch.isnan(out[2]).all()


@pytest.mark.parametrize("n,limits", [(300, Limits()), (20000, Limits(num_sms=8))])
def test_out_of_range_token_ids_are_flagged_and_never_written(hk, n, limits):
    for bad in (-1, n, -(2 ** 40)):
        args = token_logprobs_backward_case(3, n, torch.float32, seed=5)
        args["token_ids"][1] = bad
        out, error = run(hk, args, limits=limits, return_error=True)
        assert error == 1
        good = {k: (v[::2] if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        assert_token_logprobs_grad(out[::2], good, what="rows beside a bad id")
        row = {k: (v[1:2] if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        row["token_ids"] = torch.tensor([-1])  # the formula without the one-hot
        assert_token_logprobs_grad(out[1:2], row, what="the bad id's row")


def test_empty_shapes_launch_nothing(hk):
    for rows, n in ((0, 5), (4, 0), (0, 0)):
        args = token_logprobs_backward_case(rows, n, torch.float32)
        hk.launches()
        assert hk.token_logprobs_backward(**args).shape == (rows, n)
        assert hk.launches() == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,limits,kernel", [(77, Limits(), ROWS_KERNEL), (40000, Limits(num_sms=1), CHUNKS_KERNEL)])
def test_in_place_equals_out_of_place(hk, dtype, n, limits, kernel):
    """out = x (token_logprobs_backward_): every element is read before it is written, the token's
    included, so the gradient is the out-of-place one bit for bit."""
    for offset in (0, 1):
        args = token_logprobs_backward_case(5, n, dtype, seed=n + offset, offset=offset, temperature=0.6)
        want = run(hk, args, limits=limits, expect=kernel)
        x = args["x"]
        got = hk.token_logprobs_backward(**args, limits=limits, in_place=True)
        assert got.data_ptr() == x.data_ptr()
        assert torch.equal(got, want), f"in place differs {dtype} n={n} offset {offset}"
