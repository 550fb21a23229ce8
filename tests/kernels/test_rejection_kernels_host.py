"""The CUDA kernels of rejection_sample (csrc/kernels/rejection_sample.cu) executed on the CPU by the
project's host runtime, against the float64 oracle `rejection_sample_reference` (the op's algorithm
with the kernels' roundings): the same tokens and accepted counts, log-probabilities within
tolerance, each launch the one online_softmax.cuda_plan reports, the same bits under every schedule.

Exact token equality needs inputs where no decision sits within rounding of its boundary. The
kernels' mass D differs from the oracle's by its summation order (and, without a cut, by summing each
chunk relative to its own max): about 1e-7 relative in float32, 1e-16 in float64. So every case's
uniforms are checked first: the oracle must give the same tokens with u and q both scaled by
(1 + eps) and by (1 - eps), eps = 1e-5 (1e-11 for float64) — u q < p moves by about 2 eps, u * total
by eps, the residual max(p - q, 0) as if D moved by eps — and a batch row that fails draws new
uniforms. Tests whose point is their uniforms (near 0, near 1) assert stability instead.
"""

import math

import pytest
import torch

import host_kernels as hkmod
from test_kernels_host import default_schedule, hk  # noqa: F401  (hk is a fixture)
from host_kernels import Limits, assert_ran, plan_for
from online_softmax.reference import rejection_sample_reference
from testlib import random_logits

pytestmark = hkmod.requires_toolchain()

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KERNELS = ["rejection_states_kernel", "rejection_sample_kernel"]
CUT_KERNELS = ["rejection_max_kernel"] + KERNELS
BELOW_ONE = math.nextafter(1.0, 0.0)
# hk: the kernels under the schedule every test runs under (ONLINE_SOFTMAX_HOST_SCHEDULE), as in
# test_kernels_host.py.


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The oracle runs many small ops per row; on a loaded 2-core machine intra-op threads made each
    one about 100 times slower (50 ms for 40000 elements)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eps_of(dtype):
    return 1e-11 if dtype == torch.float64 else 1e-5


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def oracle(args, eps=0.0):
    """rejection_sample_reference, with u and q scaled by (1 + eps) when eps is given."""
    target, ids, q, counts, t, ratio, u = args
    if eps:
        u = (u * (1 + eps)).clamp(max=BELOW_ONE)
        q = None if q is None else q.double() * (1 + eps)
    return rejection_sample_reference(target, ids, q, counts, t, ratio, u)


def unstable_rows(args, eps):
    tokens, accepted, _ = oracle(args)
    bad = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for e in (eps, -eps):
        other_tokens, other_accepted, _ = oracle(args, e)
        bad |= (other_tokens != tokens).any(1) | (other_accepted != accepted)
    return bad


def with_stable_uniforms(args, seed, tries=40):
    """args with uniforms (drawn from seed) whose decisions all stand clear of rounding."""
    args = list(args)
    gen = torch.Generator().manual_seed(seed)
    batch, n1 = args[0].shape[:2]
    args[6] = torch.rand(batch, n1, generator=gen, dtype=torch.float64)
    for _ in range(tries):
        bad = unstable_rows(args, eps_of(args[0].dtype))
        if not bad.any():
            return tuple(args)
        args[6][bad] = torch.rand(int(bad.sum()), n1, generator=gen, dtype=torch.float64)
    raise AssertionError(f"rows {bad.nonzero().flatten().tolist()} have no uniforms clear of rounding")


def check(hk, args, limits=Limits(num_sms=8)):
    """Runs the host-executed kernels on args, compares with the oracle and with cuda_plan's launches.
    Returns the kernels' results."""
    target, ids, q, counts, t, ratio, u = args
    hk.launches()  # forget earlier launches
    got = hk.rejection_sample(target, ids, q, counts, t, ratio, u, limits)
    plan = plan_for("rejection_sample", tuple(target.shape), target.dtype, limits, min_log_ratio=ratio is not None,
                    draft_dtype=None if q is None else q.dtype)
    assert_ran(hk, plan, CUT_KERNELS if ratio is not None else KERNELS)
    want = oracle(args)
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    tol = tolerance(target.dtype)
    torch.testing.assert_close(got[2], want[2], rtol=tol, atol=tol, equal_nan=True)
    return got


def softmax_rows(x, t):
    """float64 softmax of each target position at temperature t (greedy rows at 1)."""
    scale = torch.where(t == 0, torch.ones_like(t), 1 / t)
    return torch.softmax(x.double() * scale[:, None, None], -1)


def make_case(batch, n, vocab, dtype, *, draft=None, cut=False, seed=0, scale=2.5, temperature=None,
              counts=None, offset=0.0):
    """A mixed batch: sampled rows (drafts drawn from a draft distribution near the target, so most are
    accepted and some rejected) and greedy rows (drafts at the arg-max for a while, then off it);
    ragged counts. draft: None (one-hot drafts), "float32" or "same" (draft_probs in that dtype)."""
    g = torch.Generator().manual_seed(seed)
    target = (random_logits((batch, n + 1, vocab), torch.float64, scale=scale, seed=seed) + offset).to(dtype)
    if temperature is None:
        temperature = [1.0, 0.0, 0.7, 0.0, 1.5, 1.0, 0.0, 2.0][:batch] + [1.0] * max(0, batch - 8)
    t = torch.tensor(temperature, dtype=torch.float64)
    if counts is None:
        counts = [n, n, n // 2, n - 1, n, max(n - 2, 0), 0, n][:batch] + [n] * max(0, batch - 8)
    counts = torch.tensor([max(c, 0) for c in counts], dtype=torch.int64)
    p = softmax_rows(target, t)
    noisy = target.double() + 0.4 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    q64 = softmax_rows(noisy, t)[:, :n].contiguous()
    q = None
    if draft is not None:
        q = q64.to(torch.float32 if draft == "float32" else dtype)
        q64 = q.double()
    ids = torch.empty(batch, n, dtype=torch.int64)
    for b in range(batch):
        for i in range(n):
            if t[b] == 0:  # greedy: the arg-max, except every third position
                best = int(target[b, i].double().argmax())
                ids[b, i] = best if i % 3 != 2 else (best + 1) % vocab
            elif q is None:  # one-hot drafts: the target's mode or a random token
                ids[b, i] = int(p[b, i].argmax()) if (b + i) % 2 == 0 else int(torch.randint(vocab, (1,), generator=g))
            else:
                ids[b, i] = int(torch.multinomial(q64[b, i], 1, generator=g))
    ratio = None
    if cut:
        choices = torch.tensor([-math.inf, -1.0, -3.0, 0.0, -0.5], dtype=torch.float64)
        ratio = choices[torch.randint(len(choices), (batch, n + 1), generator=g)]
    u = torch.zeros(batch, n + 1, dtype=torch.float64)
    return with_stable_uniforms((target, ids, q, counts, t, ratio, u), seed + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 31, 256, 257, 3001, 40000])
@pytest.mark.parametrize("n", [0, 1, 4])
def test_matches_the_oracle(hk, dtype, vocab, n):
    """Every draft dtype, with and without cuts, greedy and sampled rows, ragged counts."""
    for k, (draft, cut) in enumerate([(None, False), ("float32", True), ("same", False), (None, True),
                                      ("same", True)]):
        if dtype == torch.float32 and draft == "same":
            continue
        args = make_case(8, n, vocab, dtype, draft=draft, cut=cut, seed=vocab + 10 * n + 100 * k)
        check(hk, args)


def test_a_mix_of_accepted_and_rejected_drafts_is_exercised(hk):
    """The cases above are not all-accept or all-reject: some rows end at a rejection, some take the
    bonus, greedy rows stop where their draft leaves the arg-max."""
    args = make_case(8, 4, 3001, torch.float32, draft="float32", seed=5)
    tokens, accepted, _ = check(hk, args)
    counts = args[3]
    assert (accepted == counts).any() and (accepted < counts).any()
    assert accepted[1] == 2 and accepted[3] == 2  # greedy rows: positions 0, 1 on the arg-max, 2 off it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_into_many_parts_and_grids_that_loop(hk, dtype):
    """Many SMs cut each target row into parts of 8 chunks (a cut merges their maxima); one SM with
    more rows than the grid's 64 blocks makes every kernel loop over its work."""
    args = make_case(2, 3, 9000, dtype, draft="float32", cut=True, seed=3)
    plan = plan_for("rejection_sample", (2, 4, 9000), dtype, Limits(num_sms=64), min_log_ratio=True,
                    draft_dtype=torch.float32)
    assert plan.launches[0].threads_per_row == 256 * 5 and plan.chunks == 36
    check(hk, args, Limits(num_sms=64))
    args = make_case(70, 1, 40, dtype, seed=4)
    plan = plan_for("rejection_sample", (70, 2, 40), dtype, Limits(num_sms=1))
    assert all(launch.grid == 64 for launch in plan.launches)
    check(hk, args, Limits(num_sms=1))


def test_workspace_is_the_plans(hk):
    for cut in (False, True):
        plan = plan_for("rejection_sample", (3, 5, 5000), torch.bfloat16, Limits(num_sms=8), min_log_ratio=cut)
        assert hk.lib.osm_host_rejection_workspace_bytes(3, 3, 4, 5000, int(cut), 8) == plan.workspace_bytes


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_without_a_distribution_end_their_row(hk, dtype):
    """NaN, +inf or every token -inf at a position: -1 with NaN there and after, the row's count the
    drafts accepted before it; the other rows are unaffected."""
    target, ids, q, counts, t, ratio, u = make_case(8, 4, 300, dtype, draft="float32", seed=11)
    target = target.clone()
    target[0, 0, 7] = float("nan")                 # sampled, first position
    target[1, 2, 5] = float("inf")                 # greedy, after two accepted drafts
    target[2, 1] = float("-inf")                   # sampled, a whole position
    target[4, 4, 3] = float("nan")                 # sampled, the bonus position
    target[5, 0, :] = float("-inf")
    target[5, 0, 17] = 1.0                         # one token left: p = 1, always accepted if drafted
    ids[5, 0] = 17
    args = with_stable_uniforms((target, ids, q, counts, t, ratio, u), 12)
    tokens, accepted, lp = check(hk, args)
    assert tokens[0].tolist() == [-1] * 5 and accepted[0] == 0 and torch.isnan(lp[0]).all()
    assert accepted[1] == 2 and (tokens[1, 2:] == -1).all() and torch.isnan(lp[1, 2:]).all()
    assert tokens[5, 0] == 17 and lp[5, 0] == 0.0


def test_greedy_rows_take_the_first_of_tied_maxima_and_log_softmax_of_the_logits(hk):
    x = random_logits((2, 3, 700), torch.float32, seed=21)
    x[:, :, 600] = 20.0
    x[:, :, 300] = 20.0  # tied, lower index: the arg-max
    x[1, :, 5] = 20.0    # lower still, in the first chunk
    t = torch.zeros(2, dtype=torch.float64)
    ids = torch.tensor([[300, 600], [5, 5]])
    counts = torch.tensor([2, 2])
    ratio = torch.full((2, 3), -1.0, dtype=torch.float64)  # a greedy row ignores its cuts
    u = torch.rand(2, 3, dtype=torch.float64)
    tokens, accepted, lp = check(hk, (x, ids, None, counts, t, ratio, u))
    assert tokens.tolist() == [[300, 300, -1], [5, 5, 5]] and accepted.tolist() == [1, 2]
    want = torch.log_softmax(x.double(), -1)
    torch.testing.assert_close(lp[1], want[1, [0, 1, 2], [5, 5, 5]].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("draft", ["float32", "same"])
def test_drafts_equal_to_the_target_are_all_accepted(hk, draft):
    dtype = torch.bfloat16
    target, ids, _, counts, t, ratio, u = make_case(8, 4, 2000, dtype, seed=31)
    t = torch.where(t == 0, torch.ones_like(t), t)
    p = softmax_rows(target, t)[:, :4]
    q = p.to(torch.float32 if draft == "float32" else dtype).contiguous()
    ids = torch.multinomial(p.reshape(-1, 2000), 1, generator=torch.Generator().manual_seed(3)).reshape(8, 4)
    args = with_stable_uniforms((target, ids, q, counts, t, ratio, u), 32)
    tokens, accepted, _ = check(hk, args)
    # q rounded to bfloat16 may exceed p by its rounding: a draft is rejected only when u q >= p.
    assert (accepted == counts).sum() >= 6 if draft == "same" else torch.equal(accepted, counts)


def test_rows_longer_than_a_group_of_positions(hk):
    """The decision block merges 32 positions at a time: rows that accept 31 to 40 drafts cross into a
    second group (a greedy row on the arg-max throughout, sampled rows with q = p)."""
    n, vocab = 40, 300
    target = random_logits((6, n + 1, vocab), torch.float32, scale=2.0, seed=95)
    t = torch.tensor([0.0, 1.0, 0.0, 0.8, 1.0, 0.0], dtype=torch.float64)
    counts = torch.tensor([40, 40, 32, 33, 31, 35])
    p = softmax_rows(target, t)[:, :n]
    q = p.float().contiguous()
    ids = torch.multinomial(p.reshape(-1, vocab), 1, generator=torch.Generator().manual_seed(96)).reshape(6, n)
    ids[t == 0] = target[t == 0, :n].argmax(-1)
    ids[5, 34] = (ids[5, 34] + 1) % vocab  # the last draft of row 5 is off the arg-max
    u = torch.zeros(6, n + 1, dtype=torch.float64)
    args = with_stable_uniforms((target, ids, q, counts, t, None, u), 97)
    tokens, accepted, _ = check(hk, args)
    assert accepted[0] == 40 and accepted[2] == 32 and accepted[5] == 34
    assert (accepted[[1, 3, 4]] >= 31).all()


def test_disjoint_drafts_are_rejected_and_the_token_comes_from_p(hk):
    """q puts all its mass where p has none (the target's -inf tokens): p(v) = 0 rejects at once, and
    the residual is p itself."""
    target, ids, q, counts, t, ratio, u = make_case(4, 2, 500, torch.float32, draft="float32", seed=41,
                                                    temperature=[1.0, 0.5, 2.0, 1.0], counts=[2, 2, 1, 2])
    target = target.clone()
    target[:, :, 250:] = float("-inf")
    q = torch.zeros(4, 2, 500)
    q[:, :, 250:] = 1.0 / 250
    ids = torch.full((4, 2), 400)
    args = with_stable_uniforms((target, ids, q, counts, t, ratio, u), 42)
    tokens, accepted, lp = check(hk, args)
    assert (accepted == 0).all() and (tokens[:, 0] < 250).all() and (tokens[:, 1:] == -1).all()


def test_a_residual_without_mass_draws_from_p(hk):
    """q = 2 p (draft_probs need not sum to 1): a draft is accepted when u < 1/2, and at a rejection
    max(p - q, 0) has no mass anywhere, so the token is drawn from p itself."""
    target, ids, _, counts, t, ratio, u = make_case(8, 3, 700, torch.float32, seed=91)
    t = torch.where(t == 0, torch.ones_like(t), t)
    q = (2 * softmax_rows(target, t)[:, :3]).float().contiguous()
    args = with_stable_uniforms((target, ids, q, counts, t, ratio, u), 92)
    tokens, accepted, _ = check(hk, args)
    u = args[6]
    for b in range(8):
        if accepted[b] < counts[b]:  # rejected: u >= 1/2 at that position
            assert u[b, accepted[b]] >= 0.5 and tokens[b, accepted[b]] >= 0
    assert (accepted < counts).sum() >= 2


def test_one_hot_draft_probs_match_no_draft_probs(hk):
    target, ids, _, counts, t, ratio, u = make_case(8, 4, 1000, torch.float32, cut=True, seed=51)
    one_hot = torch.nn.functional.one_hot(ids, 1000).float()
    args = (target, ids, None, counts, t, ratio, u)
    a = check(hk, args)
    b = check(hk, (target, ids, one_hot, counts, t, ratio, u))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2].view(torch.int32), b[2].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_of_1e4_scale(hk, dtype):
    args = make_case(8, 3, 3001, dtype, draft="float32", cut=True, seed=61, offset=1e4, scale=3.0)
    check(hk, args)
    args = make_case(8, 3, 3001, dtype, seed=62, scale=1e4)  # spread at 1e4: p is one-hot to rounding
    check(hk, args)


def test_uniforms_near_zero_and_one(hk):
    """u = 0 takes the first token with weight, u just below 1 the last; accept tests at u = 0 accept
    every draft with p > 0."""
    for dtype in (torch.float32, torch.float64):
        target, ids, q, counts, t, ratio, _ = make_case(8, 3, 600, dtype, draft="float32", seed=71, scale=1.0)
        for value in (0.0, 1e-12, 1 - 1e-9, BELOW_ONE):
            u = torch.full((8, 4), value, dtype=torch.float64)
            args = (target, ids, q, counts, t, ratio, u)
            assert not unstable_rows(args, eps_of(dtype)).any()
            tokens, accepted, _ = check(hk, args)
            if value < 1e-6:
                assert torch.equal(accepted[t > 0], counts[t > 0])


def test_every_schedule_gives_the_same_bits(hk):
    args = make_case(8, 4, 3001, torch.bfloat16, draft="float32", cut=True, seed=81)
    runs = []
    try:
        for schedule, seed in (("in_order", 0), ("reversed", 0), ("random", 1), ("random", 7)):
            hk.set_schedule(schedule, seed)
            runs.append(hk.rejection_sample(*args, Limits(num_sms=8)))
    finally:
        default_schedule(hk)
    for other in runs[1:]:
        assert torch.equal(other[0], runs[0][0]) and torch.equal(other[1], runs[0][1])
        assert torch.equal(other[2].view(torch.int32), runs[0][2].view(torch.int32))


def test_an_empty_batch_launches_nothing(hk):
    target = torch.empty(0, 3, 10)
    hk.launches()
    got = hk.rejection_sample(target, torch.empty(0, 2, dtype=torch.int64), None, torch.empty(0, dtype=torch.int64),
                              torch.empty(0, dtype=torch.float64), None, torch.empty(0, 3, dtype=torch.float64))
    assert hk.launches() == [] and got[0].shape == (0, 3)
    assert plan_for("rejection_sample", (0, 3, 10), torch.float32, Limits()).launches == []
