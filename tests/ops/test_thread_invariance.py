"""A row's CPU result does not depend on the thread count, nor on the other rows of the batch.

Every CPU op reduces a row in a fixed split (pieces of a fixed length from the row's start, merged
left to right), whatever the scheduling: the bits below are compared exactly, on rows that cross
the split with odd tails, 1 thread against 2, 3, 4 and 7 (more threads than cores is fine), and a
row alone against the same row at several positions of batches of several sizes.
"""

import contextlib

import pytest
import torch

import online_softmax  # noqa: F401  (registers torch.ops.online_softmax)

ops = torch.ops.online_softmax

THREADS = [2, 3, 4, 7]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# 200000 = 12 pieces of 16384 and a tail of 3392; 3 * 16384 + 77 crosses the split with a tail
# that is no multiple of any vector step; 16383 stays one piece.
LONG = [200000, 3 * 16384 + 77]


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bits(t):
    """The tensor's bits as integers, so NaNs compare by payload and -0 differs from +0."""
    if not t.is_floating_point():
        return t
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def assert_same_bits(a, b, what=""):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_bits(x, y, f"{what}[{i}]")
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = (bits(a) != bits(b)).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ"


def logits(shape, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def over_threads(fn):
    """fn() under 1 thread, then under every count of THREADS, compared bitwise."""
    with num_threads(1):
        want = fn()
    for t in THREADS:
        with num_threads(t):
            got = fn()
        assert_same_bits(got, want, f"{t} threads")


def alone_and_in_batches(rows, run, sizes=(2, 3, 5, 8), threads=(1, 2, 3, 4)):
    """rows: a function (batch, position) -> input whose row `position` is the row under test;
    run: input -> per-row outputs (tuple of tensors with the batch as dim 0). The row alone and at
    the first, a middle and the last position of every batch size must give the same bits."""
    with num_threads(1):
        want = run(rows(1, 0))
    want = [w[0] for w in want]
    for t in threads:
        with num_threads(t):
            for b in sizes:
                for pos in sorted({0, b // 2, b - 1}):
                    got = [g[pos] for g in run(rows(b, pos))]
                    assert_same_bits(got, want, f"batch {b} position {pos} threads {t}")


def batch_with(row, b, pos, seed=1):
    """b rows: `row` at `pos`, others random of the same length and dtype."""
    others = logits((b, row.shape[-1]), row.dtype, seed=seed + b)
    others[pos] = row
    return others


# ---- contiguous rows: thread count ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LONG)
@pytest.mark.parametrize("log", [False, True])
def test_forward_threads(dtype, n, log):
    x = logits((8, n), dtype)
    over_threads(lambda: ops.forward(x, -1, log, 1.0, None))


def test_forward_threads_8x200000():
    """The shape that showed the defect: 8 rows of 200000 float32 under 3 threads."""
    x = logits((8, 200000), torch.float32, seed=3)
    with num_threads(1):
        want = torch.softmax(x, -1), ops.forward(x, -1, False, 1.0, None)
    with num_threads(3):
        got = torch.softmax(x, -1), ops.forward(x, -1, False, 1.0, None)
    assert_same_bits(got[0], want[0], "torch")
    assert_same_bits(got[1], want[1], "online_softmax")


def test_forward_threads_casting_and_temperature():
    x = logits((5, 200000), torch.bfloat16)
    over_threads(lambda: ops.forward(x, -1, False, 0.7, torch.float32))
    over_threads(lambda: ops.forward(x, -1, True, 1.3, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_threads(dtype):
    x = logits((7, 200000), dtype)
    over_threads(lambda: ops.stats(x, -1, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LONG)
@pytest.mark.parametrize("log", [False, True])
def test_backward_threads(dtype, n, log):
    y = ops.forward(logits((8, n), dtype), -1, log, 1.0, None)
    dy = logits((8, n), dtype, seed=5, scale=1.0)
    over_threads(lambda: ops.backward(dy, y, -1, log, 1.0, None))
    over_threads(lambda: ops.backward(dy, y, -1, log, 0.6, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_topk_threads(dtype, k, log):
    x = logits((8, 200000), dtype)
    over_threads(lambda: ops.softmax_topk(x, k, -1, log, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_topk_backward_threads(dtype):
    x = logits((6, 200000), dtype)
    values, indices, m, d = ops.softmax_topk(x, 9, -1, False, 1.0)
    g = logits(values.shape, dtype, seed=7, scale=1.0)
    over_threads(lambda: ops.softmax_topk_backward(g, x, indices, m, d, -1, False, 1.0))
    over_threads(lambda: ops.softmax_topk_backward(g, x, indices, m, d, -1, True, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_forward_threads(dtype):
    x = logits((6, 3 * 16384 + 77), dtype)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.3
    over_threads(lambda: ops.masked_forward(x, mask, False, 0, False, 1.0, -1, None))
    over_threads(lambda: ops.masked_forward(x, None, True, 0, True, 0.5, -1, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_threads(dtype):
    x = logits((6, 200000), dtype)
    temperature = torch.full((6,), 0.8, dtype=torch.float64)
    u = torch.rand((6, 4), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ratio = torch.full((6,), -3.0, dtype=torch.float64)
    over_threads(lambda: ops.sample_categorical(x, temperature, None, u))
    over_threads(lambda: ops.sample_categorical(x, temperature, ratio, u))
    top_p = torch.full((6,), 0.9, dtype=torch.float64)
    over_threads(lambda: ops.top_p_threshold(x, temperature, top_p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_n", [0, 5, 40])
def test_token_logprobs_threads(dtype, top_n):
    x = logits((6, 200000), dtype)
    x[2, 1000:1100] = float("-inf")
    ids = torch.tensor([0, 199999, 5, 77777, 3, 12], dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    values = logits((6,), acc, seed=3)
    over_threads(lambda: ops.token_logprobs(x, ids, top_n, 0.8, None))
    over_threads(lambda: ops.token_logprobs(x, ids, top_n, 1.0, values))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rejection_sample_threads(dtype):
    x = logits((3, 5, 60000), dtype)
    ids = torch.randint(0, 60000, (3, 4), generator=torch.Generator().manual_seed(6))
    ids[:, :2] = x[:, :2].float().argmax(-1)
    q = torch.softmax(logits((3, 4, 60000), torch.float32, seed=7), -1)
    t = torch.tensor([0.8, 0.0, 1.3], dtype=torch.float64)
    u = torch.rand((3, 5), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    u[:, :2] = 0.0
    counts = torch.tensor([4, 2, 3])
    over_threads(lambda: ops.rejection_sample(x, ids, q, counts, t, None, u))
    over_threads(lambda: ops.rejection_sample(x, ids, None, counts, t, torch.full((3, 5), -2.0, dtype=torch.float64), u))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_backward_threads(dtype):
    x = logits((6, 200000), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = x.to(acc).amax(-1)  # any per-row state: amax is exact in every order
    d = torch.full_like(m, 3.5)
    target = torch.tensor([0, 199999, 5, 77777, 3, 12], dtype=torch.int64)
    p_scale = torch.full((6,), 1 / 6, dtype=acc)
    over_threads(lambda: ops.cross_entropy_backward(x, m, d, target, p_scale, p_scale, None, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beam_search_step_threads(dtype):
    logits_ = logits((6, 70001), dtype)
    scores = logits((2, 3), dtype, seed=9, scale=1.0)
    over_threads(lambda: ops.beam_search_step(logits_, scores, 3, 6, 1.0, None, None, 1.0))


# ---- contiguous rows: alone and in batches ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LONG + [16383])
def test_forward_batch(dtype, n):
    row = logits((n,), dtype, seed=11)
    for log in (False, True):
        alone_and_in_batches(lambda b, p: batch_with(row, b, p), lambda x: (ops.forward(x, -1, log, 1.0, None),))
    alone_and_in_batches(lambda b, p: batch_with(row, b, p), lambda x: ops.stats(x, -1, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_backward_batch(dtype, log):
    n = 200000
    y_row = ops.forward(logits((1, n), dtype, seed=12), -1, log, 1.0, None)[0]
    dy_row = logits((n,), dtype, seed=13, scale=1.0)

    def rows(b, p):
        y = ops.forward(logits((b, n), dtype, seed=20 + b), -1, log, 1.0, None)
        y[p] = y_row
        return batch_with(dy_row, b, p), y

    alone_and_in_batches(rows, lambda a: (ops.backward(a[0], a[1], -1, log, 1.0, None),))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_topk_batch(dtype):
    row = logits((200000,), dtype, seed=14)
    alone_and_in_batches(lambda b, p: batch_with(row, b, p), lambda x: ops.softmax_topk(x, 7, -1, False, 1.0))
    alone_and_in_batches(lambda b, p: batch_with(row, b, p), lambda x: ops.softmax_topk(x, 30, -1, True, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_topk_backward_batch(dtype):
    n = 200000
    row = logits((n,), dtype, seed=15)

    def rows(b, p):
        x = batch_with(row, b, p)
        _, idx, m, d = ops.softmax_topk(x, 5, -1, False, 1.0)
        g = logits((b, 5), dtype, seed=30, scale=1.0)
        g[p] = logits((5,), dtype, seed=31, scale=1.0)
        return g, x, idx, m, d

    alone_and_in_batches(rows, lambda a: (ops.softmax_topk_backward(*a, -1, False, 1.0),))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_forward_batch(dtype):
    n = 3 * 16384 + 77
    row = logits((n,), dtype, seed=16)
    mrow = torch.rand((n,), generator=torch.Generator().manual_seed(17)) > 0.3

    def rows(b, p):
        mask = torch.rand((b, n), generator=torch.Generator().manual_seed(b)) > 0.5
        mask[p] = mrow
        return batch_with(row, b, p), mask

    alone_and_in_batches(rows, lambda a: (ops.masked_forward(a[0], a[1], False, 0, False, 1.0, -1, None),))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_batch(dtype):
    n = 200000
    row = logits((n,), dtype, seed=18)
    urow = torch.rand((3,), generator=torch.Generator().manual_seed(19), dtype=torch.float64)

    def per_row(b, value):
        return torch.full((b,), value, dtype=torch.float64)

    def rows(b, p):
        u = torch.rand((b, 3), generator=torch.Generator().manual_seed(b), dtype=torch.float64)
        u[p] = urow
        return batch_with(row, b, p), u

    alone_and_in_batches(rows, lambda a: ops.sample_categorical(a[0], per_row(len(a[0]), 0.9), None, a[1]))
    alone_and_in_batches(
        rows, lambda a: ops.sample_categorical(a[0], per_row(len(a[0]), 0.9), per_row(len(a[0]), -2.0), a[1]))
    alone_and_in_batches(
        rows, lambda a: ops.top_p_threshold(a[0], per_row(len(a[0]), 0.9), per_row(len(a[0]), 0.8)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rejection_sample_batch(dtype):
    n, vocab = 3, 40000
    chain = logits((n + 1, vocab), dtype, seed=21)
    ids_row = chain[:n].float().argmax(-1)
    ids_row[2] = 5
    urow = torch.rand((n + 1,), generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    urow[:2] = 0.0

    def rows(b, p):
        x = logits((b, n + 1, vocab), dtype, seed=23 + b)
        x[p] = chain
        ids = torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(b))
        ids[p] = ids_row
        u = torch.rand((b, n + 1), generator=torch.Generator().manual_seed(b), dtype=torch.float64)
        u[p] = urow
        return x, ids, u

    def run(a):
        b = len(a[0])
        return ops.rejection_sample(a[0], a[1], None, torch.full((b,), n), torch.full((b,), 0.9, dtype=torch.float64),
                                    None, a[2])

    alone_and_in_batches(rows, run, sizes=(2, 5), threads=(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_batch(dtype):
    row = logits((200000,), dtype, seed=24)

    def rows(b, p):
        ids = torch.arange(b, dtype=torch.int64) * 991
        ids[p] = 123457
        return batch_with(row, b, p), ids

    alone_and_in_batches(rows, lambda a: ops.token_logprobs(a[0], a[1], 0, 1.0, None))
    alone_and_in_batches(rows, lambda a: ops.token_logprobs(a[0], a[1], 20, 0.7, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_backward_batch(dtype):
    n = 200000
    row = logits((n,), dtype, seed=21)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rows(b, p):
        x = batch_with(row, b, p)
        target = torch.arange(b, dtype=torch.int64) * 997
        target[p] = 123457
        return x, target

    def run(a):
        x, target = a
        m = x.to(acc).amax(-1)  # any per-row state: amax is exact in every order
        scale = torch.full((len(x),), 0.25, dtype=acc)
        return (ops.cross_entropy_backward(x, m, torch.full_like(m, 3.5), target, scale, scale, None, None),)

    alone_and_in_batches(rows, run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beam_search_step_batch(dtype):
    """A batch entry's beams (3 rows) alone and among other entries."""
    beams, vocab = 3, 70001
    entry = logits((beams, vocab), dtype, seed=22)
    entry_scores = logits((beams,), dtype, seed=23, scale=1.0)

    def rows(b, p):
        x = logits((b * beams, vocab), dtype, seed=40 + b)
        x[p * beams:(p + 1) * beams] = entry
        s = logits((b, beams), dtype, seed=50 + b, scale=1.0)
        s[p] = entry_scores
        return x, s

    alone_and_in_batches(rows, lambda a: ops.beam_search_step(a[0], a[1], beams, 6, 1.0, None, None, 1.0),
                         sizes=(2, 3, 5))


# ---- the softmax dim not last ----


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_threads(dtype):
    x = logits((3, 40000, 21), dtype)
    dy = logits((3, 40000, 21), dtype, seed=24, scale=1.0)
    for log in (False, True):
        over_threads(lambda: ops.forward(x, 1, log, 1.0, None))
        y = ops.forward(x, 1, log, 1.0, None)
        over_threads(lambda: ops.backward(dy, y, 1, log, 1.0, None))
    over_threads(lambda: ops.stats(x, 1, 1.0))
    over_threads(lambda: ops.softmax_topk(x, 4, 1, False, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_batch(dtype):
    """A column of an (n, inner) layout at every kind of position (in a whole vector block, in the
    leftover block) of layouts of several widths, and of several outer sizes."""
    n = 20000 + 3
    col = logits((n,), dtype, seed=25)
    dcol = logits((n,), dtype, seed=26, scale=1.0)

    def layout(outer, inner, o, j):
        x = logits((outer, n, inner), dtype, seed=27 + inner)
        dy = logits((outer, n, inner), dtype, seed=28 + inner, scale=1.0)
        x[o, :, j] = col
        dy[o, :, j] = dcol
        return x, dy

    def run(x, dy, log):
        y = ops.forward(x, 1, log, 1.0, None)
        m, d = ops.stats(x, 1, 1.0)
        return y, ops.backward(dy, y, 1, log, 1.0, None), m, d

    for log in (False, True):
        want = None
        for outer, inner in [(1, 2), (1, 5), (2, 16), (1, 19), (2, 40), (1, 67)]:
            for o, j in sorted({(0, 0), (outer - 1, inner // 2), (outer - 1, inner - 1)}):
                for t in (1, 3):
                    with num_threads(t):
                        y, dx, m, d = run(*layout(outer, inner, o, j), log)
                    got = (y[o, :, j], dx[o, :, j], m[o, j], d[o, j])
                    if want is None:
                        want = got
                    assert_same_bits(got, want, f"outer {outer} inner {inner} at ({o}, {j}) threads {t}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_last_dim_batch(dtype):
    """Ops that take a dim: the row along dim 0, alone and beside other columns."""
    n = 200000
    col = logits((n,), dtype, seed=29)

    def rows(b, p):
        x = logits((n, b), dtype, seed=60 + b)
        x[:, p] = col
        return x

    def run(x):
        values, indices, m, d = ops.softmax_topk(x, 5, 0, False, 1.0)
        masked = ops.masked_forward(x, None, False, 0, True, 1.0, 0, None)
        return values.t(), indices.t(), m, d, masked.t()

    alone_and_in_batches(rows, run, sizes=(2, 5), threads=(1, 3))
