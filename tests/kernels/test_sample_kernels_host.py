"""The CUDA sampling kernels (csrc/kernels/sample.cu) executed on the CPU by the project's host
runtime, against the CPU kernels of the same ops: the same draws from the same uniforms, the same
top-p cuts, the same -1 rows, each launch the one online_softmax.cuda_plan reports. This is how
those CUDA sources are verified without a GPU."""

import pytest
import torch

import host_kernels as hkmod
import online_softmax  # noqa: F401  (the CPU ops)
from host_kernels import HostKernels, Limits, assert_ran, plan_for
from online_softmax._checks import state_dtype
from testlib import dense_edited, pad_edits, random_edits, random_logits

pytestmark = hkmod.requires_toolchain()

ops = torch.ops.online_softmax


@pytest.fixture(scope="module")
def hk():
    return HostKernels()


def rows_of(rows, n, dtype, seed=0, scale=2.5):
    return random_logits((rows, n), dtype, scale=scale, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 31, 256, 257, 3001])
@pytest.mark.parametrize("cut", [None, -2.0, 0.0])
def test_sample_categorical_draws_what_the_cpu_kernel_draws(hk, dtype, n, cut):
    rows, draws = 5, 7
    x = rows_of(rows, n, dtype, seed=n)
    x[1, : n // 2] = float("-inf")
    t = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8], dtype=torch.float64)
    ratio = None if cut is None else torch.full((rows,), cut, dtype=torch.float64)
    u = torch.rand(rows, draws, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want_tok, want_lp = ops.sample_categorical(x, t, ratio, u)
    hk.launches()  # forget earlier launches
    got_tok, got_lp = hk.sample_categorical(x, t, ratio, u, Limits(num_sms=2))
    assert_ran(hk, plan_for("sample_categorical", (rows, n), dtype, Limits(num_sms=2), num_samples=draws,
                            min_log_ratio=ratio is not None), ["sample_kernel"])
    assert torch.equal(got_tok, want_tok)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got_lp, want_lp, rtol=tol, atol=tol)


def test_sample_categorical_rows_without_a_distribution(hk):
    x = rows_of(4, 600, torch.float32)
    x[0] = float("-inf")
    x[1, 5] = float("nan")
    x[2, 9] = float("inf")
    t = torch.ones(4, dtype=torch.float64)
    u = torch.rand(4, 3, dtype=torch.float64)
    for ratio in (None, torch.full((4,), -1.0, dtype=torch.float64)):
        tok, lp = hk.sample_categorical(x, t, ratio, u)
        assert (tok[:3] == -1).all() and torch.isnan(lp[:3]).all()
        assert (tok[3] >= 0).all() and (tok[3] < 600).all()


def test_sample_categorical_across_grid_loops(hk):
    """More rows than the grid (capped at 64 blocks per SM): blocks loop over rows."""
    x = rows_of(300, 40, torch.float32, seed=3)
    t = torch.ones(300, dtype=torch.float64)
    u = torch.rand(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = ops.sample_categorical(x, t, None, u)
    hk.launches()
    got = hk.sample_categorical(x, t, None, u, Limits(num_sms=1))
    assert torch.equal(got[0], want[0])
    plan = plan_for("sample_categorical", (300, 40), torch.float32, Limits(num_sms=1), num_samples=2)
    assert plan.launches[0].grid < 300
    assert_ran(hk, plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [7, 300, 4099])
def test_top_p_threshold_cuts_where_the_cpu_kernel_cuts(hk, dtype, n):
    rows = 6
    x = rows_of(rows, n, dtype, seed=n + 1, scale=3.0)
    x[5] = float("-inf")
    x[4, 2] = float("nan")
    t = torch.tensor([1.0, 0.7, 1.5, 1.0, 1.0, 1.0], dtype=torch.float64)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.0, 0.9, 0.9], dtype=torch.float64)
    want_ratio, want_status = ops.top_p_threshold(x, t, top_p)
    hk.launches()
    got_ratio, got_status = hk.top_p_threshold(x, t, top_p, Limits(num_sms=2))
    assert_ran(hk, plan_for("top_p_threshold", (rows, n), dtype, Limits(num_sms=2)), ["top_p_kernel"])
    assert torch.equal(got_status, want_status)
    assert want_status[4] == 2 and want_status[5] == 2
    # Both cuts keep the same tokens (each may sit anywhere in the gap below the last one kept).
    m = x.double().amax(-1, keepdim=True)
    ok = want_status < 2
    kept_want = x.double() >= m + want_ratio[:, None] * t[:, None]
    kept_got = x.double() >= m + got_ratio[:, None] * t[:, None]
    assert torch.equal(kept_got[ok], kept_want[ok])


def test_top_p_threshold_reports_ties(hk):
    x = torch.full((2, 500), -1.0)
    x[:, :3] = 2.0
    x[:, 3:200] = 1.0
    t = torch.ones(2, dtype=torch.float64)
    top_p = torch.tensor([0.6, 0.05], dtype=torch.float64)
    want = ops.top_p_threshold(x, t, top_p)
    got = hk.top_p_threshold(x, t, top_p)
    assert got[1].tolist() == want[1].tolist() == [1, 1]


def host_edit_case(dtype, n, seed):
    """Rows without edits, with edits at the 256-element chunk edges, with hundreds of random ones,
    banning all but two tokens, and with hostile values (+inf; an edit over x's NaN)."""
    x = rows_of(6, n, dtype, seed=seed)
    x[5, n // 3] = float("nan")
    acc = state_dtype(dtype)
    edges = sorted({i for i in (0, 255, 256, 511, 512, n // 2, n - 1) if i < n})
    ids, values = random_edits(n, [0, 0, len(edges), min(n, 400), n - 2, 1], acc, seed=seed)
    lists = [ids[r][ids[r] >= 0].tolist() for r in range(6)]
    vals = [values[r][ids[r] >= 0].tolist() for r in range(6)]
    lists[1], vals[1] = [n - 1], [float("inf")]
    lists[2], vals[2] = edges, [5.0, -1.0, float("-inf"), 2.0, 0.5, 7.0, 1.0][:len(edges)]
    vals[4] = [float("-inf")] * len(lists[4])
    lists[5], vals[5] = [n // 3], [0.25]
    return x, *pad_edits(lists, vals, acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [2, 300, 3001])
@pytest.mark.parametrize("cut", [None, -2.0])
def test_edited_rows_draw_what_the_dense_edited_copy_draws(hk, dtype, n, cut):
    """The kernels read the edits instead of x: the same bits as the same kernels on the dense edited
    copy in the accumulation dtype (float32 for float16/bfloat16 x), and the draws of the CPU op."""
    x, ids, values = host_edit_case(dtype, n, seed=n + 7)
    rows, draws = x.shape[0], 9
    t = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8, 1.3], dtype=torch.float64)
    ratio = None if cut is None else torch.full((rows,), cut, dtype=torch.float64)
    u = torch.rand(rows, draws, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    dense = dense_edited(x, ids, values)
    hk.launches()
    got_tok, got_lp = hk.sample_categorical(x, t, ratio, u, Limits(num_sms=2), ids, values)
    assert_ran(hk, plan_for("sample_categorical", (rows, n), dtype, Limits(num_sms=2), num_samples=draws,
                            min_log_ratio=ratio is not None, num_edits=ids.shape[1]), ["sample_kernel"])
    want_tok, want_lp = hk.sample_categorical(dense, t, ratio, u, Limits(num_sms=2))
    assert torch.equal(got_tok, want_tok)
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=0, equal_nan=True)
    assert (got_tok[1] == -1).all() and (got_tok[5] >= 0).all()
    cpu_tok, _ = ops.sample_categorical(x, t, ratio, u, ids, values)
    assert torch.equal(got_tok, cpu_tok)

    top_p = torch.tensor([0.9, 0.5, 0.99, 0.7, 0.9, 0.3], dtype=torch.float64)
    got = hk.top_p_threshold(x, t, top_p, Limits(num_sms=2), ids, values)
    want = hk.top_p_threshold(dense, t, top_p, Limits(num_sms=2))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[1], ops.top_p_threshold(x, t, top_p, ids, values)[1])
