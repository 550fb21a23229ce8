"""Sparse per-row logit edits (edit_ids, edit_values) of sample_categorical and top_p_threshold: the
op with edits gives exactly the outputs of the op on the dense edited copy
x.to(acc).scatter(1, ids, values) (real entries only), for every dtype, with and without a cut, on
bans of the max token or of every token but one, edits at block edges, rows without edits among
rows with many, thousands of edits and hostile values; and bad edit arguments raise, naming them."""

import pytest
import torch

from online_softmax._checks import state_dtype
from testlib import dense_edited as dense, pad_edits, random_edits, random_logits

ops = torch.ops.online_softmax
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_both_ops(x, ids, values, t=None, ratio=None, top_p=None, draws=5, seed=0):
    rows = x.shape[0]
    dev = x.device
    t = torch.ones(rows, dtype=torch.float64, device=dev) if t is None else t
    u = torch.rand(rows, draws, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dev)
    d = dense(x, ids, values)
    tok, lp = ops.sample_categorical(x, t, ratio, u, ids, values)
    want_tok, want_lp = ops.sample_categorical(d, t, ratio, u)
    assert torch.equal(tok, want_tok)
    same(lp, want_lp)
    p = torch.full((rows,), 0.9, dtype=torch.float64, device=dev) if top_p is None else top_p
    got = ops.top_p_threshold(x, t, p, ids, values)
    want = ops.top_p_threshold(d, t, p)
    same(got[0], want[0])
    assert torch.equal(got[1], want[1])
    return tok, lp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1024, 1025, 3001])
@pytest.mark.parametrize("cut", [None, -2.5])
def test_edits_match_the_dense_edited_copy(device, dtype, vocab, cut):
    rows = 6
    x = random_logits((rows, vocab), dtype, scale=3.0, seed=vocab).to(device)
    counts = [0, 1, min(vocab, 5), 0, min(vocab, 40), min(vocab, 300)]  # rows without edits among others
    ids, values = random_edits(vocab, counts, state_dtype(dtype), device, seed=vocab)
    t = torch.tensor([1.0, 0.7, 1.3, 1.0, 2.0, 0.5], dtype=torch.float64, device=device)
    ratio = None if cut is None else torch.full((rows,), cut, dtype=torch.float64, device=device)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.0, 1.0, 0.3], dtype=torch.float64, device=device)
    check_both_ops(x, ids, values, t, ratio, top_p, draws=7, seed=vocab)


@pytest.mark.parametrize("dtype", DTYPES)
def test_banning_the_max_token_never_draws_it(device, dtype):
    x = random_logits((4, 2500), dtype, seed=1).to(device)
    x[:, 2000] = 40.0  # dominates every row unless banned
    ids, values = pad_edits([[2000]] * 4, [[float("-inf")]] * 4, state_dtype(dtype), device)
    tok, _ = check_both_ops(x, ids, values, ratio=torch.full((4,), -1.0, dtype=torch.float64, device=device),
                            draws=50)
    assert not (tok == 2000).any()
    tok, _ = check_both_ops(x, ids, values, draws=50)
    assert not (tok == 2000).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_banning_every_token_but_one(device, dtype):
    vocab, keep = 3000, [0, 1023, 1024, 2999]
    x = random_logits((4, vocab), dtype, seed=2).to(device)
    ids, values = pad_edits([[i for i in range(vocab) if i != k] for k in keep],
                            [[float("-inf")] * (vocab - 1)] * 4, state_dtype(dtype), device)
    for ratio in (None, torch.full((4,), -3.0, dtype=torch.float64, device=device)):
        tok, lp = check_both_ops(x, ids, values, ratio=ratio, draws=9)
        assert tok.tolist() == [[k] * 9 for k in keep]
        assert (lp == 0).all()
    ratio, status = ops.top_p_threshold(x, torch.ones(4, dtype=torch.float64, device=device),
                                        torch.full((4,), 0.9, dtype=torch.float64, device=device), ids, values)
    assert (status == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_edits_at_block_edges(device, dtype):
    """The CPU kernels patch 1024-element blocks and the CUDA ones 256-element chunks: edits on the
    first and last element of a block, of the row, and in a partial last block."""
    vocab = 2600
    x = random_logits((3, vocab), dtype, seed=3).to(device)
    edges = [0, 255, 256, 1023, 1024, 2047, 2048, 2559, 2560, vocab - 1]
    ids, values = pad_edits([edges, [vocab - 1], [0]], [[9.0, -2.0] * 5, [12.0], [float("-inf")]], state_dtype(dtype),
                            device)
    for ratio in (None, torch.full((3,), -4.0, dtype=torch.float64, device=device)):
        check_both_ops(x, ids, values, ratio=ratio, draws=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thousands_of_edits(device, dtype):
    vocab = 50000
    x = random_logits((3, vocab), dtype, seed=4).to(device)
    ids, values = random_edits(vocab, [6000, 0, 2500], state_dtype(dtype), device, seed=4, scale=3.0)
    t = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64, device=device)
    for ratio in (None, torch.full((3,), -2.0, dtype=torch.float64, device=device)):
        check_both_ops(x, ids, values, t, ratio, torch.tensor([0.9, 0.6, 0.95], dtype=torch.float64, device=device),
                       draws=11)


def test_no_edits_are_the_plain_op(device):
    x = random_logits((3, 1500), seed=5).to(device)
    t = torch.ones(3, dtype=torch.float64, device=device)
    u = torch.rand(3, 4, dtype=torch.float64).to(device)
    ids, values = pad_edits([[], [], []], [[], [], []], torch.float32, device)  # E = 0
    assert ids.shape == (3, 0)
    want = ops.sample_categorical(x, t, None, u)
    for args in ((ids, values), (None, None)):
        got = ops.sample_categorical(x, t, None, u, *args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ids, values = pad_edits([[], [3], []], [[], [1.0], []], torch.float32, device, width=4)  # all-padding rows
    check_both_ops(x, ids, values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hostile_values(device, dtype):
    """+inf or NaN edits leave the row without a distribution, as the same x value would; an edit over a
    NaN or +inf of x, or over an all -inf row, makes the row defined again; 1e4-scale values."""
    vocab = 1500
    x = random_logits((7, vocab), dtype, seed=6).to(device)
    x[2, 77] = float("nan")
    x[3, 1400] = float("inf")
    x[4] = float("-inf")
    inf, nan = float("inf"), float("nan")
    ids, values = pad_edits(
        [[5], [1030], [77], [1400, 1401], [3, 1499], [10, 20, 30], [0, 1]],
        [[inf], [nan], [0.5], [1.0, 2.0], [-1.0, 0.0], [1e4, -1e4, 9000.0], [-inf, -inf]], state_dtype(dtype), device)
    for ratio in (None, torch.full((7,), -1.5, dtype=torch.float64, device=device)):
        tok, lp = check_both_ops(x, ids, values, ratio=ratio, draws=6)
        assert (tok[:2] == -1).all() and torch.isnan(lp[:2]).all()
        assert (tok[2:] >= 0).all()
        assert (tok[5] == 10).all()  # the 1e4 edit takes all the mass
        assert set(tok[4].tolist()) <= {3, 1499}
    status = ops.top_p_threshold(x, torch.ones(7, dtype=torch.float64, device=device),
                                 torch.full((7,), 0.9, dtype=torch.float64, device=device), ids, values)[1]
    assert status[:2].tolist() == [2, 2] and (status[2:] < 2).all()


def test_non_contiguous_edit_tensors(device):
    x = random_logits((3, 900), seed=7).to(device)
    ids, values = random_edits(900, [4, 2, 4], torch.float32, device, seed=7)
    ids_t = ids.t().contiguous().t()
    values_t = values.t().contiguous().t()
    assert not ids_t.is_contiguous()
    check_both_ops(x, ids_t, values_t)


def test_vmap_with_batched_edits(device):
    x = random_logits((2, 3, 1100), seed=8).to(device)
    t = torch.ones(2, 3, dtype=torch.float64, device=device)
    u = torch.rand(2, 3, 4, dtype=torch.float64).to(device)
    p = torch.full((2, 3), 0.8, dtype=torch.float64, device=device)
    e = [random_edits(1100, [3, 0, 50], torch.float32, device, seed=s) for s in (1, 2)]
    ids = torch.stack([e[0][0], e[1][0]])
    values = torch.stack([e[0][1], e[1][1]])
    tok, lp = torch.vmap(ops.sample_categorical, in_dims=(0, 0, None, 0, 0, 0))(x, t, None, u, ids, values)
    ratio, status = torch.vmap(ops.top_p_threshold)(x, t, p, ids, values)
    for b in range(2):
        want = ops.sample_categorical(x[b], t[b], None, u[b], ids[b], values[b])
        assert torch.equal(tok[b], want[0]) and torch.equal(lp[b], want[1])
        want = ops.top_p_threshold(x[b], t[b], p[b], ids[b], values[b])
        same(ratio[b], want[0])
        assert torch.equal(status[b], want[1])
    # Edits shared by every vmapped entry (not batched).
    tok = torch.vmap(ops.sample_categorical, in_dims=(0, 0, None, 0, None, None))(x, t, None, u, ids[0], values[0])
    assert torch.equal(tok[0][1], ops.sample_categorical(x[1], t[1], None, u[1], ids[0], values[0])[0])


def test_opcheck_with_edits():
    from torch.library import opcheck
    x = random_logits((3, 2100), seed=9)
    t = torch.full((3,), 0.7, dtype=torch.float64)
    u = torch.rand(3, 4, dtype=torch.float64)
    ids, values = random_edits(2100, [2, 0, 30], torch.float32, "cpu", seed=9)
    opcheck(ops.sample_categorical.default, (x, t, None, u, ids, values))
    opcheck(ops.sample_categorical.default, (x, t, torch.full((3,), -2.0, dtype=torch.float64), u, ids, values))
    opcheck(ops.top_p_threshold.default, (x, t, torch.full((3,), 0.9, dtype=torch.float64), ids, values))
    f = torch.compile(lambda a, i, v: ops.top_p_threshold(a, t, torch.full((3,), 0.9, dtype=torch.float64), i, v),
                      fullgraph=True)
    want = ops.top_p_threshold(x, t, torch.full((3,), 0.9, dtype=torch.float64), ids, values)
    got = f(x, ids, values)
    same(got[0], want[0])


def test_bad_edit_arguments(device):
    x = random_logits((2, 10), seed=10).to(device)
    t = torch.ones(2, dtype=torch.float64, device=device)
    u = torch.rand(2, 3, dtype=torch.float64).to(device)
    p = torch.full((2,), 0.9, dtype=torch.float64, device=device)
    ids = torch.tensor([[1, 4, -1], [0, 9, -1]], device=device)
    values = torch.zeros(2, 3, device=device)
    calls = (lambda i, v, a=x: ops.sample_categorical(a, t, None, u, i, v),
             lambda i, v, a=x: ops.top_p_threshold(a, t, p, i, v))
    cases = [
        (ids, None, ValueError, "edit_values must be given with edit_ids"),
        (None, values, ValueError, "edit_ids must be given with edit_values"),
        (ids.int(), values, TypeError, "edit_ids must be an int64 tensor"),
        (ids, values.double(), TypeError, "edit_values must be float32"),
        (ids[:1], values[:1], ValueError, "edit_ids must have shape \\(rows, num_edits\\) with rows = 2"),
        (ids[0], values[0], ValueError, "edit_ids must have shape"),
        (ids, values[:, :2], ValueError, "edit_values must have edit_ids' shape"),
        (torch.tensor([[1, 10, -1], [0, 9, -1]], device=device), values, ValueError, r"edit_ids must lie in \[0, 10\)"),
        (torch.tensor([[1, -2, -1], [0, 9, -1]], device=device), values, ValueError, r"edit_ids must lie in"),
        (torch.tensor([[1, 1, -1], [0, 9, -1]], device=device), values, ValueError, "strictly ascending"),
        (torch.tensor([[4, 1, -1], [0, 9, -1]], device=device), values, ValueError, "strictly ascending"),
        (torch.tensor([[1, -1, 4], [0, 9, -1]], device=device), values, ValueError, "padding after"),
    ]
    for call in calls:
        for i, v, err, match in cases:
            with pytest.raises(err, match=match):
                call(i, v)
    if device == "cuda":
        with pytest.raises(ValueError, match="edit_ids is on cpu but x is on cuda"):
            calls[0](ids.cpu(), values)
    # bfloat16 x: the values are float32, the accumulation dtype, not x's.
    xb = x.bfloat16()
    with pytest.raises(TypeError, match="edit_values must be float32"):
        ops.sample_categorical(xb, t, None, u, ids, values.bfloat16())
    ops.sample_categorical(xb, t, None, u, ids, values)
    # the fake kernels raise alike (meta tensors take no value checks)
    with pytest.raises(ValueError, match="edit_values must be given with edit_ids"):
        ops.sample_categorical(x.to("meta"), t.to("meta"), None, u.to("meta"), ids.to("meta"), None)
