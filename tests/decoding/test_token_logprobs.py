"""token_logprobs (the op and online_softmax.token_logprobs) against float64 references: the token's
log-softmax, its rank counted with the index tie-break, the top-n of torch.topk, the entropy
-sum p log p, and the state stats gives; hostile rows, every dtype, bad arguments."""

import pytest
import torch

import online_softmax as osm
from testlib import FLOAT_DTYPES, random_logits

ops = torch.ops.online_softmax
INF, NAN = float("inf"), float("nan")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference(x, ids, t=1.0, values=None):
    """float64 (log_probs, rank, entropy) of the rounded inputs; a row without a distribution gives NaN."""
    x64 = x.double().cpu()
    ids = ids.cpu()
    v = x64.gather(1, ids[:, None])[:, 0] if values is None else values.double().cpu()
    lse = torch.logsumexp(x64 / t, -1)
    no_dist = x64.isnan().any(-1) | (x64 == INF).any(-1) | (x64 == -INF).all(-1)
    log_probs = torch.where(no_dist, NAN, v / t - lse)
    lp = torch.log_softmax(x64 / t, -1)
    p = lp.exp()
    entropy = torch.where(no_dist, NAN, -torch.where(p > 0, p * lp, 0.0).sum(-1))
    # rank: 1 + the entries ahead of (v, token): larger, NaN above every number, equal with a lower index.
    xn, vn = x64.isnan(), v.isnan()[:, None]
    greater = (x64 > v[:, None]) | (xn & ~vn)
    equal = (x64 == v[:, None]) | (xn & vn)
    j = torch.arange(x64.shape[1])[None, :]
    ahead = (greater | (equal & (j < ids[:, None]))) & (j != ids[:, None])
    return log_probs, ahead.sum(-1) + 1, entropy


def same(a, b):
    """Equal bits up to NaN payloads."""
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b))


def check(x, ids, top_n=0, t=1.0, values=None):
    """Every output of the op against the references; returns them."""
    out = ops.token_logprobs(x, ids, top_n, t, values)
    lp, rank, top_ids, top_lp, m, d, ent = out
    acc = acc_of(x.dtype)
    rows = x.shape[0]
    assert [o.dtype for o in out] == [acc, torch.int64, torch.int64, acc, acc, acc, acc]
    assert [tuple(o.shape) for o in out] == [(rows,), (rows,), (rows, top_n), (rows, top_n), (rows,), (rows,), (rows,)]
    want_lp, want_rank, want_ent = reference(x, ids, t, values)
    tol = TOL[x.dtype]
    torch.testing.assert_close(lp.cpu().double(), want_lp, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(ent.cpu().double(), want_ent, rtol=tol, atol=10 * tol, equal_nan=True)
    assert torch.equal(rank.cpu(), want_rank)
    # The state is stats' and the top-n softmax_topk's: bit for bit on the CPU (one fold order); on
    # CUDA each kernel merges in its own tree, so the state agrees to rounding and the selection exactly.
    sm, sd = ops.stats(x, -1, t)
    tv, ti, _, _ = ops.softmax_topk(x, top_n, -1, True, t) if top_n > 0 else (top_lp.to(x.dtype), top_ids, 0, 0)
    assert torch.equal(top_ids, ti)
    if x.device.type == "cpu":
        assert same(m, sm) and same(d, sd) and same(top_lp.to(x.dtype), tv)
    else:
        for got, want in ((m, sm), (d, sd)):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
        rounding = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else tol  # softmax_topk's values are x's dtype
        torch.testing.assert_close(top_lp, tv.to(acc), rtol=rounding, atol=rounding, equal_nan=True)
    return out


def test_every_field_against_float64(device):
    for dtype in FLOAT_DTYPES:
        for vocab in (1, 7, 33, 1025, 5000, 20001):
            x = random_logits((6, vocab), dtype, device, seed=vocab)
            ids = torch.randint(0, vocab, (6,), generator=torch.Generator().manual_seed(vocab)).to(device)
            ids[0] = x[0].float().argmax()
            for top_n, t in ((0, 1.0), (min(5, vocab), 0.7), (vocab, 1.3) if vocab <= 33 else (40, 1.3)):
                lp, rank, top_ids, top_lp, _, _, _ = check(x, ids, top_n, t)
                assert rank[0] == 1
                if top_n > 0:  # top-n against torch.topk's values on float64, ids in the stable order
                    ref = torch.log_softmax(x.cpu().double() / t, -1)
                    order = torch.sort(ref, dim=-1, descending=True, stable=True).indices[:, :top_n]
                    assert torch.equal(top_ids.cpu(), order)
                    torch.testing.assert_close(top_lp.cpu().double(), ref.topk(top_n, -1).values, rtol=TOL[dtype],
                                               atol=TOL[dtype])


def test_ties_go_to_the_lower_index(device):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -0.0, 0.0, 3.0],
                      [0.0, -0.0, 0.0, -0.0, 0.0, 5.0, 5.0, 0.0]], device=device)
    for tok, want in ((1, 1), (2, 2), (4, 3), (7, 4), (3, 5), (0, 6), (5, 7), (6, 8)):
        ids = torch.full((2,), tok, device=device)
        _, rank, top_ids, _, _, _, _ = check(x, ids, 8)
        assert rank[0] == want
        # The stable descending sort's order. torch.topk's own order of equal values is not the lower
        # index first (its CPU kernel gives [4, 7, 2, 1, ...] for row 0), so it is held to the values.
        x64 = x.cpu().double()
        assert torch.equal(top_ids.cpu(), torch.sort(x64, dim=-1, descending=True, stable=True).indices)
        assert torch.equal(x64.gather(1, top_ids.cpu()), x64.topk(8, -1).values)
    wide = random_logits((3, 4099), torch.float32, device, seed=3).round()  # many ties, every vector lane
    ids = torch.tensor([0, 2048, 4098], device=device)
    _, rank, top_ids, _, _, _, _ = check(wide, ids, 100)
    order = torch.sort(wide.cpu().double(), dim=-1, descending=True, stable=True).indices
    assert torch.equal(rank.cpu(), (order == ids.cpu()[:, None]).int().argmax(-1) + 1)
    assert torch.equal(top_ids.cpu(), order[:, :100])
    # torch.topk agrees on the values (not on the order of equal ones, as above).
    want = wide.cpu().double().topk(100, -1)
    assert torch.equal(wide.cpu().double().gather(1, top_ids.cpu()), want.values)


def test_token_values_are_ranked_and_scored_instead(device):
    for dtype in FLOAT_DTYPES:
        x = random_logits((5, 3001), dtype, device, seed=4)
        ids = torch.tensor([0, 5, 3000, 17, 1000], device=device)
        acc = acc_of(dtype)
        values = torch.tensor([100.0, -INF, NAN, 0.0, x[4, 7].item()], dtype=acc, device=device)
        lp, rank, _, _, _, _, _ = check(x, ids, 3, 0.9, values)
        assert rank[0] == 1 and rank[1] == 3001 and rank[2] == 1  # NaN above every number
        assert lp[1] == -INF and lp[2].isnan()
        x4 = x[4].double()
        assert rank[4] == 1 + (x4 > x4[7]).sum() + (x4[:1000] == x4[7]).sum() - (x4[1000] > x4[7]).int()
        check(x, ids, 0, 1.0, x.to(acc).gather(1, ids[:, None])[:, 0])  # the row's own values: the plain path


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_hostile_rows(device, dtype):
    vocab = 1500
    x = random_logits((9, vocab), dtype, device, seed=5)
    x[0, 10] = INF
    x[1, 20] = NAN
    x[2] = -INF
    x[3, ::2] = -INF                        # half the row out, the scored token among them
    x[4, 1:] = -INF                         # one token left
    x[5] = random_logits((vocab,), torch.float64, device, seed=6, scale=1e4).to(dtype) if dtype != torch.float16 \
        else x[5]
    x[6] = 0.0                              # uniform: entropy log(vocab)
    x[7, 3] = -INF
    x[8, :] = x[8, 0]
    ids = torch.tensor([10, 3, 0, 4, 0, 9, 11, 3, 700], device=device)
    lp, rank, top_ids, top_lp, m, d, ent = check(x, ids, 4)
    assert lp[:3].isnan().all() and ent[:3].isnan().all()
    x1 = x[1].double()
    assert rank[0] == 1 and rank[1] == 2 + (x1 > x1[3]).sum() + (x1[:3] == x1[3]).sum()  # NaN first, then larger
    assert lp[3] == -INF and lp[4] == 0 and ent[4] == 0 and lp[7] == -INF
    assert m[2] == -INF and d[2] == 0
    torch.testing.assert_close(ent[6].double().cpu(), torch.tensor(vocab, dtype=torch.float64).log(),
                               rtol=TOL[dtype], atol=TOL[dtype])
    assert rank[8] == 701 and torch.equal(top_ids[8].cpu(), torch.arange(4))


def test_vocab_one_empty_and_layouts(device):
    x = torch.tensor([[2.5], [-INF], [NAN]], device=device)
    lp, rank, top_ids, top_lp, m, d, ent = check(x, torch.zeros(3, dtype=torch.int64, device=device), 1)
    assert lp[0] == 0 and ent[0] == 0 and (rank == 1).all() and (top_ids == 0).all()
    for vocab in (0, 5):
        out = ops.token_logprobs(torch.empty(0, vocab, device=device), torch.empty(0, dtype=torch.int64,
                                                                                   device=device), 0, 1.0, None)
        assert [tuple(o.shape) for o in out] == [(0,), (0,), (0, 0), (0, 0), (0,), (0,), (0,)]
    base = random_logits((40, 2 * 777), torch.float32, device, seed=7)
    ids = torch.randint(0, 777, (20,), generator=torch.Generator().manual_seed(8)).to(device)
    strided = base[::2, ::2]                # non-contiguous both ways
    assert not strided.is_contiguous()
    got = check(strided, ids, 6, 0.8)
    want = ops.token_logprobs(strided.contiguous(), ids, 6, 0.8, None)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    check(base.t()[:777, :20].t(), ids, 3)  # a transposed view


def test_public_api_shapes_and_values(device):
    logits = random_logits((2, 3, 1000), torch.bfloat16, device, seed=9)
    ids = torch.randint(0, 1000, (2, 3), generator=torch.Generator().manual_seed(10)).to(device)
    out = osm.token_logprobs(logits, ids, top_n=4, temperature=0.8)
    assert isinstance(out, osm.TokenLogprobs)
    assert out.log_probs.shape == (2, 3) and out.rank.shape == (2, 3)
    assert out.top_token_ids.shape == (2, 3, 4) and out.top_log_probs.shape == (2, 3, 4)
    flat = ops.token_logprobs(logits.reshape(6, 1000), ids.reshape(6), 4, 0.8, None)
    assert torch.equal(out.log_probs.reshape(6), flat[0]) and torch.equal(out.rank.reshape(6), flat[1])
    assert torch.equal(out.top_token_ids.reshape(6, 4), flat[2])
    want = torch.log_softmax(logits.double() / 0.8, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(out.log_probs.double(), want, rtol=2e-5, atol=2e-5)
    one = osm.token_logprobs(logits[0, 0], ids[0, 0])          # 1-D logits, 0-d token id
    assert one.log_probs.shape == () and one.rank.shape == () and one.top_token_ids.shape == (0,)
    assert torch.equal(one.log_probs, osm.token_logprobs(logits, ids).log_probs[0, 0])
    perm = logits.permute(1, 0, 2)                               # non-contiguous batch dims
    got = osm.token_logprobs(perm, ids.t(), top_n=2)
    assert torch.equal(got.log_probs, osm.token_logprobs(perm.contiguous(), ids.t().contiguous(), top_n=2).log_probs)
    empty = osm.token_logprobs(logits[:, :0], ids[:, :0], top_n=3)
    assert empty.log_probs.shape == (2, 0) and empty.top_log_probs.shape == (2, 0, 3)


def test_bad_arguments_name_the_argument(device):
    x = random_logits((3, 10), torch.float32, device)
    ids = torch.tensor([0, 5, 9], device=device)
    bad = [
        ((x.to(torch.int32), ids, 0, 1.0, None), TypeError, "x"),
        ((x[None], ids, 0, 1.0, None), ValueError, "x must be 2-D"),
        ((x[:, :0], ids, 0, 1.0, None), ValueError, "x must have at least one"),
        ((x, ids.int(), 0, 1.0, None), TypeError, "token_ids"),
        ((x, ids[:2], 0, 1.0, None), ValueError, "token_ids"),
        ((x, torch.tensor([0, 10, 1], device=device), 0, 1.0, None), ValueError, "token_ids must lie"),
        ((x, torch.tensor([-1, 0, 1], device=device), 0, 1.0, None), ValueError, "token_ids must lie"),
        ((x, ids, -1, 1.0, None), ValueError, "top_n"),
        ((x, ids, 11, 1.0, None), ValueError, "top_n"),
        ((x, ids, 0, 0.0, None), ValueError, "temperature"),
        ((x, ids, 0, -2.0, None), ValueError, "temperature"),
        ((x, ids, 0, INF, None), ValueError, "temperature"),
        ((x, ids, 0, NAN, None), ValueError, "temperature"),
        ((x, ids, 0, 1.0, torch.zeros(3, dtype=torch.float64, device=device)), TypeError, "token_values"),
        ((x, ids, 0, 1.0, torch.zeros(4, device=device)), ValueError, "token_values"),
    ]
    for args, kind, words in bad:
        with pytest.raises(kind, match=words):
            ops.token_logprobs(*args)
    with pytest.raises(ValueError, match="token_ids must have logits' batch shape"):
        osm.token_logprobs(x, ids[:2])
    with pytest.raises(TypeError, match="top_n"):
        osm.token_logprobs(x, ids, top_n=True)
    with pytest.raises(ValueError, match="temperature"):
        osm.token_logprobs(x, ids, temperature=0)
    with pytest.raises(TypeError, match="logits"):
        osm.token_logprobs(ids, ids)


def test_torch_compile_fullgraph_and_meta():
    logits = random_logits((3, 4, 50), torch.float32, seed=11)
    ids = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(12))
    compiled = torch.compile(lambda x, i: osm.token_logprobs(x, i, top_n=2, temperature=0.9), fullgraph=True)
    for got, want in zip(compiled(logits, ids), osm.token_logprobs(logits, ids, top_n=2, temperature=0.9)):
        assert torch.equal(got, want)
    meta = osm.token_logprobs(logits.to("meta"), ids.to("meta"), top_n=2)
    assert meta.log_probs.shape == (3, 4) and meta.top_log_probs.shape == (3, 4, 2)
