"""The CUDA token_logprobs kernel (csrc/kernels/token_logprobs.cu) executed on the CPU by the project's
host runtime, against float64 references: the token's log-softmax, its rank in torch.topk's order,
the entropy, the row state, and the top-n (the CPU op's selection exactly), each launch the one
online_softmax.cuda_plan reports, the same bits under every schedule. This is how that CUDA source is verified without a GPU."""

import pytest
import torch

import host_kernels as hkmod
import online_softmax  # noqa: F401  (the CPU ops)
from host_kernels import Limits, assert_ran, plan_for
from test_kernels_host import default_schedule, hk  # noqa: F401  (hk is a fixture)
from testlib import random_logits

pytestmark = hkmod.requires_toolchain()

ops = torch.ops.online_softmax
INF, NAN = float("inf"), float("nan")


def oracle(x, ids, t, values=None):
    """float64 log_probs, rank, entropy, max, sumexp of the rounded inputs (NaN where no distribution)."""
    x64 = x.double()
    v = x64.gather(1, ids[:, None])[:, 0] if values is None else values.double()
    no_dist = x64.isnan().any(-1) | (x64 == INF).any(-1) | (x64 == -INF).all(-1)
    lse = torch.logsumexp(x64 / t, -1)
    lp = torch.log_softmax(x64 / t, -1)
    p = lp.exp()
    entropy = torch.where(no_dist, NAN, -torch.where(p > 0, p * lp, 0.0).sum(-1))
    xn, vn = x64.isnan(), v.isnan()[:, None]
    j = torch.arange(x64.shape[1])[None, :]
    ahead = ((x64 > v[:, None]) | (xn & ~vn) | (((x64 == v[:, None]) | (xn & vn)) & (j < ids[:, None])))
    rank = (ahead & (j != ids[:, None])).sum(-1) + 1
    m = x64.amax(-1)
    return torch.where(no_dist, NAN, v / t - lse), rank, entropy, m / t, torch.exp(lse - m / t)


def check(hk, x, ids, top_n, t=1.0, values=None, limits=Limits(num_sms=2)):
    hk.launches()
    got = hk.token_logprobs(x, ids, top_n, t, values, limits)
    plan = plan_for("token_logprobs", tuple(x.shape), x.dtype, limits, k=top_n, token_values=values is not None)
    assert_ran(hk, plan, ["token_logprobs_kernel"])
    lp, rank, top_ids, top_lp, m, d, ent = got
    want_lp, want_rank, want_ent, want_m, want_d = oracle(x, ids, t, values)
    tol = 1e-10 if x.dtype == torch.float64 else 3e-5
    torch.testing.assert_close(lp.double(), want_lp, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(ent.double(), want_ent, rtol=tol, atol=10 * tol, equal_nan=True)
    assert torch.equal(rank, want_rank)
    finite = ~d.isnan() & (d > 0)  # a row of -inf has (m, d) = (-inf, 0): checked by the callers
    torch.testing.assert_close(m.double()[finite], want_m[finite], rtol=tol, atol=tol)
    torch.testing.assert_close(d.double()[finite], want_d[finite], rtol=tol, atol=tol)
    # The same rows without a distribution as the CPU's stats, the same top-n as the CPU's op.
    cpu = ops.token_logprobs(x, ids, top_n, t, values)
    assert torch.equal(d.isnan(), cpu[5].isnan()) and torch.equal(m.isnan(), cpu[4].isnan())
    if top_n > 0:
        assert torch.equal(top_ids, cpu[2])
        torch.testing.assert_close(top_lp, cpu[3], rtol=tol, atol=tol, equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 257, 3001, 9000])
def test_every_field_against_float64(hk, dtype, n):
    rows = 5
    x = random_logits((rows, n), dtype, seed=n)
    ids = torch.randint(0, n, (rows,), generator=torch.Generator().manual_seed(n))
    for top_n, t in ((0, 1.0), (min(3, n), 0.7), (min(n, 40), 1.3)):
        check(hk, x, ids, top_n, t)


def test_hostile_rows_ties_and_token_values(hk):
    n = 2100
    x = random_logits((8, n), torch.float32, seed=3)
    x[0, 10] = INF
    x[1, 20] = NAN
    x[2] = -INF
    x[3, ::2] = -INF
    x[4, 1:] = -INF
    x[5] = random_logits((n,), torch.float64, seed=4, scale=1e4).float()
    x[6] = x[6].round()  # many ties, across lanes and steps
    x[7] = 0.0
    ids = torch.tensor([10, 3, 0, 4, 0, 9, 1000, 1500])
    lp, rank, top_ids, _, m, d, ent = check(hk, x, ids, 5)
    assert lp[:3].isnan().all() and ent[:3].isnan().all()
    assert m[2] == -INF and d[2] == 0 and lp[4] == 0 and ent[4] == 0 and rank[7] == 1501
    acc_values = torch.tensor([1.0, 2.0, 3.0, 100.0, -INF, NAN, x[6, 3].item(), 0.0])
    check(hk, x, ids, 4, 0.9, acc_values)


def test_rows_start_off_a_16_byte_boundary(hk):
    """Rows of odd length in one buffer: every row but the first starts mid-granule."""
    for dtype in (torch.float32, torch.bfloat16):
        x = random_logits((6, 1027), dtype, seed=5)
        ids = torch.tensor([0, 1026, 5, 513, 1, 1000])
        check(hk, x, ids, 7, 0.8)


def test_top_n_beyond_the_buffer_is_left_to_the_binding(hk):
    n = 5000
    x = random_logits((2, n), torch.float32, seed=6)
    ids = torch.tensor([3, 4999])
    plan = plan_for("token_logprobs", (2, n), torch.float32, Limits(num_sms=2), k=2049)
    assert plan.path == "token_logprobs"
    hk.launches()
    lp, rank, top_ids, _, _, _, _ = hk.token_logprobs(x, ids, 2049, 1.0, None, Limits(num_sms=2))
    assert hk.launches() == ["token_logprobs_kernel"]
    assert (top_ids == -(2 ** 62)).all()  # untouched: the binding's softmax_topk fills them
    want_lp, want_rank, _, _, _ = oracle(x, ids, 1.0)
    assert torch.equal(rank, want_rank)
    torch.testing.assert_close(lp.double(), want_lp, rtol=3e-5, atol=3e-5)


def test_grid_loops_and_the_plan(hk):
    """More rows than the grid (capped at 64 blocks per SM): blocks loop over rows."""
    x = random_logits((150, 40), torch.float32, seed=7)
    ids = torch.randint(0, 40, (150,), generator=torch.Generator().manual_seed(8))
    plan = plan_for("token_logprobs", (150, 40), torch.float32, Limits(num_sms=1), k=3)
    assert plan.launches[0].grid < 150 and plan.launches[0].block == (256, 1)
    launch = plan.launches[0]
    assert launch.bytes_read == 150 * 40 * 4 + 150 * (8 + 4) and launch.bytes_reread == 150 * 4
    assert launch.bytes_written == 150 * (4 * 4 + 8) + 150 * 3 * (8 + 4)
    with_values = plan_for("token_logprobs", (150, 40), torch.float32, Limits(num_sms=1), token_values=True)
    assert with_values.launches[0].bytes_reread == 0 and with_values.launches[0].bytes_written == 150 * 24
    assert plan_for("token_logprobs", (0, 40), torch.float32, Limits()).path == "nothing"
    check(hk, x, ids, 3, 1.0, None, Limits(num_sms=1))


def test_every_schedule_gives_the_same_bits(hk):
    x = random_logits((4, 5000), torch.bfloat16, seed=9)
    x[1] = x[1].round()
    ids = torch.tensor([0, 2500, 4999, 17])
    runs = []
    try:
        for schedule, seed in (("in_order", 0), ("reversed", 0), ("random", 1), ("random", 7)):
            hk.set_schedule(schedule, seed)
            runs.append(hk.token_logprobs(x, ids, 20, 0.8, None, Limits(num_sms=2)))
    finally:
        default_schedule(hk)
    for other in runs[1:]:
        for a, b in zip(other, runs[0]):
            assert torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a,
                               b.view(torch.int32) if b.dtype == torch.float32 else b)
