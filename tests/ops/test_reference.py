"""Tests of the textbook reference algorithms in online_softmax/reference/textbook.py, against
torch.softmax and one another. They import the package (its merge is the package's own)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from online_softmax.reference import textbook as ref
from testlib import random_logits

INF = math.inf
NAN = math.nan
F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=2e-6, atol=1e-7)

SIZES = [1, 7, 33, 1000]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, scale=1.0, dtype=torch.float64, seed=0):
    return random_logits(shape, dtype, scale=scale, seed=seed)


def _block_sizes(n):
    return sorted({1, 3, 16, n, n + 5})


def _all_algorithms(n):
    """(name, callable) for every algorithm that should match torch.softmax (naive excluded)."""
    algos = [
        ("safe", ref.safe_softmax),
        ("online", ref.online_softmax),
        ("halves", lambda x: ref.merge_two_halves(x, x.shape[-1] // 2)),
        ("state", lambda x: ref.softmax_from_state(x, ref.partial_state(x))),
    ]
    for bs in _block_sizes(n):
        algos.append((f"block{bs}", lambda x, bs=bs: ref.block_online_softmax(x, bs)))
    for nb in sorted({1, 2, 3, 7, n, n + 3}):
        algos.append((f"batched{nb}", lambda x, nb=nb: ref.batched_block_online_softmax(x, nb)))
    return algos


# --------------------------------------------------------------------------------------------
# Agreement with torch on ordinary inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_all_algorithms_match_torch_float64(n):
    x = _randn(5, n, seed=n)
    expected = torch.softmax(x, dim=-1)
    for name, fn in _all_algorithms(n):
        if name == "online" and n == 1000:
            continue  # covered by its own test on a smaller row count
        torch.testing.assert_close(fn(x), expected, **F64, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(ref.naive_softmax(x), expected, **F64)


def test_online_softmax_vectorized_rows():
    x = _randn(64, 300, seed=1)
    torch.testing.assert_close(ref.online_softmax(x), torch.softmax(x, -1), **F64)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 33), (4, 1, 16)])
def test_any_leading_shape(shape):
    x = _randn(*shape, seed=2)
    expected = torch.softmax(x, dim=-1)
    for name, fn in _all_algorithms(shape[-1]):
        torch.testing.assert_close(fn(x), expected, **F64, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n", [7, 33, 1000])
def test_float32_matches_float64_reference(n):
    x64 = _randn(6, n, scale=3.0, seed=3)
    x32 = x64.float()
    expected = torch.softmax(x64, dim=-1).float()
    for name, fn in _all_algorithms(n):
        if name == "online" and n == 1000:
            continue
        out = fn(x32)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, **F32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n", [1, 33, 1000])
def test_log_softmax_from_state(n):
    x = _randn(4, n, scale=5.0, seed=4)
    out = ref.log_softmax_from_state(x, ref.partial_state(x))
    torch.testing.assert_close(out, torch.log_softmax(x, -1), **F64)


def test_rows_sum_to_one_and_shift_invariance():
    x = _randn(3, 257, seed=5)
    y = ref.block_online_softmax(x, 16)
    torch.testing.assert_close(y.sum(-1), torch.ones(3, dtype=torch.float64), **F64)
    torch.testing.assert_close(ref.block_online_softmax(x + 1000.0, 16), y, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Large logits: the reason for the max subtraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_logits(dtype):
    x = _randn(4, 33, scale=1e4, dtype=dtype, seed=6)
    x64 = x.double()
    expected = torch.softmax(x64, -1)
    tol = F64 if dtype == torch.float64 else F32
    for name, fn in _all_algorithms(33):
        out = fn(x).double()
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out, expected, **tol, msg=lambda m, name=name: f"{name}: {m}")
    # documented failure of the naive formula: exp overflows to inf and the row turns into NaN
    naive = ref.naive_softmax(x)
    assert not torch.isfinite(naive).all()
    assert torch.isnan(naive).any()
    assert torch.isinf(torch.exp(x)).any()


def test_naive_underflow_gives_nan():
    x = torch.full((5,), -1e4, dtype=torch.float64)
    assert torch.isnan(ref.naive_softmax(x)).all()
    torch.testing.assert_close(ref.safe_softmax(x), torch.full((5,), 0.2, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Special values: must reproduce torch's NaN/inf behaviour exactly
# --------------------------------------------------------------------------------------------

SPECIAL_ROWS = [
    [-INF, -INF, -INF, -INF],
    [INF, 0.0, 1.0, 2.0],
    [0.0, 1.0, 2.0, INF],
    [NAN, 1.0, 2.0, 3.0],
    [1.0, 2.0, 3.0, NAN],
    [INF, INF, 0.0, 0.0],
    [-INF, INF, 0.0, 1.0],
    [NAN, -INF, 0.0, 1.0],
    [-INF, -INF, NAN, -INF],
    [1.0, -INF, 2.0, -INF],
    [-INF, -INF, -INF, 5.0],
    [-INF, INF, -INF, -INF],
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_special_values_match_torch(dtype):
    x = torch.tensor(SPECIAL_ROWS, dtype=dtype)
    expected = torch.softmax(x, -1)
    expected_log = torch.log_softmax(x, -1)
    for name, fn in _all_algorithms(x.shape[-1]):
        torch.testing.assert_close(
            fn(x), expected, equal_nan=True, rtol=0, atol=1e-7,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    # every split of the row into two halves
    for split in range(x.shape[-1] + 1):
        torch.testing.assert_close(ref.merge_two_halves(x, split), expected, equal_nan=True,
                                   rtol=0, atol=1e-7)
    torch.testing.assert_close(ref.log_softmax_from_state(x, ref.partial_state(x)), expected_log,
                               equal_nan=True, rtol=0, atol=1e-6)


def test_all_neg_inf_row_is_nan_and_state_is_empty():
    x = torch.full((2, 9), -INF, dtype=torch.float64)
    m, d = ref.partial_state(x)
    assert torch.equal(m, torch.full((2,), -INF, dtype=torch.float64))
    assert torch.equal(d, torch.zeros(2, dtype=torch.float64))
    for name, fn in _all_algorithms(9):
        assert torch.isnan(fn(x)).all(), name


def test_nan_and_inf_states():
    m, d = ref.partial_state(torch.tensor([[NAN, 1.0], [INF, 1.0]], dtype=torch.float64))
    assert math.isnan(m[0].item()) and math.isnan(d[0].item())
    assert m[1].item() == INF and math.isnan(d[1].item())


# --------------------------------------------------------------------------------------------
# The merge: identity, associativity, commutativity
# --------------------------------------------------------------------------------------------


def _random_states(count, rows=6, seed=7):
    g = _gen(seed)
    states = []
    for i in range(count):
        n = 1 + i * 5
        x = torch.randn(rows, n, generator=g, dtype=torch.float64) * (1 + 10 * i)
        states.append(ref.partial_state(x))
    return states


def test_empty_state():
    m, d = ref.empty_state((2, 3), dtype=torch.float32)
    assert m.shape == d.shape == (2, 3)
    assert m.dtype == d.dtype == torch.float32
    assert (m == -INF).all() and (d == 0).all()
    assert isinstance(ref.empty_state((1,), torch.float64), ref.SoftmaxPartial)


def test_merge_identity_is_exact():
    s = ref.partial_state(_randn(6, 17, scale=30.0, seed=8))
    e = ref.empty_state(s.m.shape, dtype=s.m.dtype)
    for merged in (ref.merge(e, s), ref.merge(s, e)):
        assert torch.equal(merged.m, s.m)
        assert torch.equal(merged.d, s.d)


def test_merge_two_empty_states():
    e = ref.empty_state((4,), dtype=torch.float64)
    m, d = ref.merge(e, e)
    assert not torch.isnan(m).any() and not torch.isnan(d).any()
    assert torch.equal(m, torch.full((4,), -INF, dtype=torch.float64))
    assert torch.equal(d, torch.zeros(4, dtype=torch.float64))


def test_merge_identity_with_special_states():
    x = torch.tensor([[NAN, 1.0], [INF, 1.0], [-INF, -INF]], dtype=torch.float64)
    s = ref.partial_state(x)
    e = ref.empty_state((3,), dtype=torch.float64)
    for merged in (ref.merge(e, s), ref.merge(s, e)):
        torch.testing.assert_close(merged.m, s.m, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(merged.d, s.d, equal_nan=True, rtol=0, atol=0)


def test_merge_commutative_and_associative():
    a, b, c = _random_states(3)
    e = ref.empty_state(a.m.shape, dtype=a.m.dtype)
    ab, ba = ref.merge(a, b), ref.merge(b, a)
    assert torch.equal(ab.m, ba.m) and torch.equal(ab.d, ba.d)
    left = ref.merge(ref.merge(a, b), c)
    right = ref.merge(a, ref.merge(b, c))
    torch.testing.assert_close(left.m, right.m, rtol=0, atol=0)
    torch.testing.assert_close(left.d, right.d, **F64)
    with_empty = ref.merge(ref.merge(a, e), ref.merge(e, ref.merge(c, b)))
    torch.testing.assert_close(with_empty.d, left.d, **F64)


def test_merge_equals_state_of_concatenation():
    x = _randn(5, 40, scale=20.0, seed=9)
    for split in (0, 1, 13, 39, 40):
        merged = ref.merge(ref.partial_state(x[:, :split]), ref.partial_state(x[:, split:]))
        whole = ref.partial_state(x)
        torch.testing.assert_close(merged.m, whole.m, rtol=0, atol=0)
        torch.testing.assert_close(merged.d, whole.d, **F64)


# --------------------------------------------------------------------------------------------
# Online top-k
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (33, 33), (500, 10), (2000, 5)])
def test_topk_matches_torch(n, k):
    x = _randn(3, n, scale=4.0, seed=10 + n)
    values, indices = ref.online_softmax_topk(x, k)
    exp_values, exp_indices = torch.softmax(x, -1).topk(k, dim=-1)
    assert indices.dtype == torch.int64
    assert values.shape == indices.shape == (3, k)
    assert torch.equal(indices, exp_indices)
    torch.testing.assert_close(values, exp_values, **F64)

    log_values, log_indices = ref.online_softmax_topk(x, k, log=True)
    exp_log_values, _ = torch.log_softmax(x, -1).topk(k, dim=-1)
    assert torch.equal(log_indices, exp_indices)
    torch.testing.assert_close(log_values, exp_log_values, **F64)


def test_topk_1d_and_float32():
    x = _randn(50, scale=2.0, dtype=torch.float32, seed=11)
    values, indices = ref.online_softmax_topk(x, 4)
    assert values.shape == indices.shape == (4,)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    exp_values, exp_indices = torch.softmax(x.double(), -1).topk(4)
    assert torch.equal(indices, exp_indices)
    torch.testing.assert_close(values, exp_values.float(), **F32)


def test_topk_ties_go_to_lower_index():
    x = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    _, idx = ref.online_softmax_topk(x, 2)
    assert idx.tolist() == [1, 2]
    values, idx = ref.online_softmax_topk(x, 4)
    assert idx.tolist() == [1, 2, 3, 0]
    p = torch.softmax(x, -1)
    torch.testing.assert_close(values, p[[1, 2, 3, 0]], **F64)
    _, idx = ref.online_softmax_topk(torch.tensor([3.0, 3.0, 3.0, 3.0]), 3)
    assert idx.tolist() == [0, 1, 2]
    _, idx = ref.online_softmax_topk(torch.tensor([-INF, -INF, 0.0, -INF]), 3)
    assert idx.tolist() == [2, 0, 1]


def test_topk_nan_ordering():
    x = torch.tensor([1.0, NAN, 3.0, NAN, 2.0], dtype=torch.float64)
    values, idx = ref.online_softmax_topk(x, 3)
    assert idx.tolist() == [1, 3, 2]
    assert torch.isnan(values).all()  # a NaN logit makes the whole softmax row NaN
    _, idx = ref.online_softmax_topk(x, 5)
    assert idx.tolist() == [1, 3, 2, 4, 0]
    # NaN beats +inf as well
    _, idx = ref.online_softmax_topk(torch.tensor([INF, 0.0, NAN]), 2)
    assert idx.tolist() == [2, 0]


def test_topk_special_values_match_softmax():
    x = torch.tensor([[INF, 0.0, 1.0], [-INF, -INF, -INF], [1.0, -INF, 2.0]], dtype=torch.float64)
    values, idx = ref.online_softmax_topk(x, 3)
    assert idx.tolist() == [[0, 2, 1], [0, 1, 2], [2, 0, 1]]
    expected = torch.gather(torch.softmax(x, -1), 1, idx)
    torch.testing.assert_close(values, expected, equal_nan=True, **F64)
    log_values, _ = ref.online_softmax_topk(x, 3, log=True)
    expected_log = torch.gather(torch.log_softmax(x, -1), 1, idx)
    torch.testing.assert_close(log_values, expected_log, equal_nan=True, **F64)


def test_topk_zero_rows():
    values, idx = ref.online_softmax_topk(torch.empty(0, 5), 2)
    assert values.shape == idx.shape == (0, 2) and idx.dtype == torch.int64


# --------------------------------------------------------------------------------------------
# Edge shapes and bad arguments
# --------------------------------------------------------------------------------------------


def test_empty_last_dim():
    x = torch.empty(3, 0, dtype=torch.float64)
    algos = _all_algorithms(0)[:4] + [
        ("block", lambda x: ref.block_online_softmax(x, 4)),
        ("batched", lambda x: ref.batched_block_online_softmax(x, 2)),
    ]
    for name, fn in algos:
        assert fn(x).shape == (3, 0), name
    m, d = ref.partial_state(x)
    assert (m == -INF).all() and (d == 0).all()


def test_bad_arguments():
    x = _randn(2, 5, seed=12)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="block_size"):
            ref.block_online_softmax(x, bad)
        with pytest.raises(ValueError, match="num_blocks"):
            ref.batched_block_online_softmax(x, bad)
    for bad in (0, 6, -1, 2.0):
        with pytest.raises(ValueError, match="k"):
            ref.online_softmax_topk(x, bad)
    with pytest.raises(ValueError, match="split"):
        ref.merge_two_halves(x, -1)
    with pytest.raises(ValueError, match="split"):
        ref.merge_two_halves(x, 6)
    with pytest.raises(ValueError, match="1-d or 2-d"):
        ref.online_softmax_topk(x.reshape(1, 2, 5), 1)
    with pytest.raises(ValueError, match="x"):
        ref.safe_softmax(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating"):
        ref.online_softmax(torch.arange(5))


# --------------------------------------------------------------------------------------------
# Property-based check
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False),
        min_size=1, max_size=64,
    ),
    block_size=st.integers(min_value=1, max_value=70),
    num_blocks=st.integers(min_value=1, max_value=70),
)
def test_property_block_algorithms_match_torch(values, block_size, num_blocks):
    x = torch.tensor(values, dtype=torch.float64)
    expected = torch.softmax(x, -1)
    torch.testing.assert_close(ref.block_online_softmax(x, block_size), expected, **F64)
    torch.testing.assert_close(ref.batched_block_online_softmax(x, num_blocks), expected, **F64)
    split = block_size % (len(values) + 1)
    torch.testing.assert_close(ref.merge_two_halves(x, split), expected, **F64)
