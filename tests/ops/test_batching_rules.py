"""Every op's batching rule (online_softmax/batching.py) under torch.vmap, called on the op itself:
the vmapped call equals the op called per sample, for the vmapped dim anywhere and unbatched
operands mixed in; none falls back to vmap's per-sample loop (its warning is an error here)."""

import warnings

import pytest
import torch
from torch.func import vmap

import online_softmax  # noqa: F401  (registers the ops)
from testlib import random_logits

ops = torch.ops.online_softmax


@pytest.fixture(autouse=True)
def no_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


def test_every_op_has_a_batching_rule():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("online_softmax::")]
    assert len(names) >= 13
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "FuncTorchBatched")]
    assert not missing, f"ops without a batching rule: {missing}"


def _per_sample(fn, xs, in_dim):
    outs = [fn(x) for x in xs.unbind(in_dim)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


def _assert_same(got, want):
    if isinstance(want, tuple):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("shape,dim", [((3, 7), -1), ((3, 7), 0), ((2, 3, 5), 1), ((6,), 0), ((), 0)])
@pytest.mark.parametrize("in_dim", [0, -1])
def test_row_ops_vmap(device, shape, dim, in_dim):
    xs = random_logits((4, *shape), torch.float32).to(device).movedim(0, in_dim)
    cases = [
        lambda x: ops.forward(x, dim, True, 0.7, torch.float64),
        lambda x: ops.stats(x, dim, 1.3),
        lambda x: ops.softmax_topk(x, 1, dim, False, 1.0),
        lambda x: ops.masked_forward(x, None, False, 0, False, 0.5, dim, None),
    ]
    for fn in cases:
        _assert_same(vmap(fn, in_dims=in_dim)(xs), _per_sample(fn, xs, in_dim))


def test_backward_ops_vmap_with_unbatched_operands():
    x = random_logits((3, 7), torch.float64)
    y = torch.softmax(x, -1)
    gs = random_logits((4, 3, 7), torch.float64, seed=1)
    got = vmap(lambda g: ops.backward(g, y, -1, False, 1.0, None))(gs)
    _assert_same(got, _per_sample(lambda g: ops.backward(g, y, -1, False, 1.0, None), gs, 0))
    values, idx, m, d = ops.softmax_topk(x, 2, -1, True, 1.0)
    gv = random_logits((4, 3, 2), torch.float64, seed=2)
    fn = lambda g: ops.softmax_topk_backward(g, x, idx, m, d, -1, True, 1.0)  # noqa: E731
    _assert_same(vmap(fn)(gv), _per_sample(fn, gv, 0))


@pytest.mark.parametrize("mask_batched", [False, True])
def test_masked_forward_vmap_with_a_broadcast_mask(mask_batched):
    xs = random_logits((3, 2, 4, 6), torch.float32)
    masks = torch.rand(3, 1, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    if mask_batched:
        fn = lambda x, mk: ops.masked_forward(x, mk, True, 1, True, 0.5, -1, None)  # noqa: E731
        got = vmap(fn)(xs, masks)
        want = torch.stack([fn(x, mk) for x, mk in zip(xs, masks)])
    else:
        fn = lambda x: ops.masked_forward(x, masks[0], False, 0, False, 0.5, -1, None)  # noqa: E731
        got, want = vmap(fn)(xs), _per_sample(fn, xs, 0)
    _assert_same(got, want)


def test_sampling_ops_vmap():
    xs = random_logits((2, 3, 50), torch.float32)
    t = torch.full((3,), 0.9, dtype=torch.float64)
    u = torch.rand(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fn = lambda x, uu: ops.sample_categorical(x, t, None, uu)  # noqa: E731
    got = vmap(fn)(xs, u)
    want = tuple(torch.stack(o) for o in zip(*[fn(x, uu) for x, uu in zip(xs, u)]))
    _assert_same(got, want)
    top_p = torch.full((3,), 0.8, dtype=torch.float64)
    fn = lambda x: ops.top_p_threshold(x, t, top_p)  # noqa: E731
    _assert_same(vmap(fn)(xs), _per_sample(fn, xs, 0))


def test_rejection_sample_vmap():
    xs = random_logits((2, 3, 4, 50), torch.float32)
    ids = torch.randint(0, 50, (2, 3, 3), generator=torch.Generator().manual_seed(3))
    q = torch.softmax(random_logits((3, 3, 50), torch.float32, seed=4), -1)   # unbatched operand
    counts = torch.tensor([3, 1, 2])
    t = torch.tensor([0.9, 0.0, 1.1], dtype=torch.float64)
    u = torch.rand(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fn = lambda x, i, uu: ops.rejection_sample(x, i, q, counts, t, None, uu)  # noqa: E731
    got = vmap(fn)(xs, ids, u)
    want = tuple(torch.stack(o) for o in zip(*[fn(x, i, uu) for x, i, uu in zip(xs, ids, u)]))
    _assert_same(got, want)


def test_token_logprobs_vmap():
    xs = random_logits((2, 3, 50), torch.float32)
    ids = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(6))
    values = torch.randn(3, generator=torch.Generator().manual_seed(7))  # unbatched operand
    for fn in (lambda x, i: ops.token_logprobs(x, i, 5, 0.8, None),  # noqa: E731
               lambda x, i: ops.token_logprobs(x, i, 0, 1.0, values)):
        got = vmap(fn)(xs, ids)
        want = tuple(torch.stack(o) for o in zip(*[fn(x, i) for x, i in zip(xs, ids)]))
        _assert_same(got, want)


def test_decoding_ops_vmap():
    seqs = torch.randint(0, 5, (2, 3, 9), generator=torch.Generator().manual_seed(2))
    fn = lambda s: ops.ngram_banned_tokens(s, 2)  # noqa: E731
    _assert_same(vmap(fn)(seqs), _per_sample(fn, seqs, 0))
    logits = random_logits((2, 2 * 3, 20), torch.float32)
    scores = random_logits((2, 2, 3), torch.float32, seed=3)
    fn = lambda lg, sc: ops.beam_search_step(lg, sc, 3, 4, 1.0, None, None, 1.0)  # noqa: E731
    got = vmap(fn)(logits, scores)
    want = tuple(torch.stack(o) for o in zip(*[fn(lg, sc) for lg, sc in zip(logits, scores)]))
    _assert_same(got, want)


def test_beam_search_advance_refuses_vmap_by_name():
    running = torch.zeros(2, 1, 2, 3, dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="beam_search_advance does not support torch.vmap"):
        vmap(lambda r: ops.beam_search_advance(*([r] * 12), 0, 0, 1.0, 0))(running)
