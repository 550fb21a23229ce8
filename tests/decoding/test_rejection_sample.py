"""online_softmax.rejection_sample (speculative decoding's verification) and its op.

- The op against its float64 oracle (online_softmax.reference.rejection_sample_reference) on the
  same uniforms: tokens equal, log-probabilities within tolerance, every dtype and draft dtype,
  ragged rows, greedy rows, cuts, hostile positions; under each CPU capability.
- The distribution: whatever the draft, every emitted token follows the target's warped
  distribution (chi-square over many rows in one call), per slot.
- The API: argument errors naming the argument, seeds, meta tensors, opcheck, torch.compile.
"""

import math

import pytest
import torch

import online_softmax as osm
from online_softmax.decoding.warpers import warped_probs
from online_softmax.reference import rejection_sample_reference, unfused_rejection_sample
from testlib import chi_square_ok, random_logits

ops = torch.ops.online_softmax
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _case(batch, n, vocab, dtype, draft_dtype, seed, *, greedy_rows=(), cut=False, ragged=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = random_logits((batch, n + 1, vocab), dtype, scale=2.0, seed=seed)
    probs = torch.softmax(x.double() / 1.0, -1)
    ids = torch.multinomial(probs[:, :n].reshape(-1, vocab), 1, generator=g).reshape(batch, n) if n else \
        torch.zeros(batch, 0, dtype=torch.int64)
    q = None
    if draft_dtype is not None:
        q = torch.softmax(random_logits((batch, n, vocab), torch.float64, scale=2.0, seed=seed + 1), -1)
        q = (0.5 * q + 0.5 * probs[:, :n]).to(draft_dtype)  # near the target: accepts and rejects both happen
    counts = torch.randint(0, n + 1, (batch,), generator=g) if ragged else torch.full((batch,), n)
    t = torch.rand(batch, generator=g, dtype=torch.float64) + 0.5
    for r in greedy_rows:
        t[r] = 0.0
    ratio = torch.full((batch, n + 1), -1.5, dtype=torch.float64) if cut else None
    u = torch.rand(batch, n + 1, generator=g, dtype=torch.float64)
    args = (x, ids, q, counts, t, ratio, u)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def assert_matches_oracle(args, got=None):
    got = ops.rejection_sample(*args) if got is None else got
    want = rejection_sample_reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    tok, acc, lp = (g.cpu() for g in got)
    assert torch.equal(acc, want[1]), (acc, want[1])
    assert torch.equal(tok, want[0]), (tok, want[0])
    assert torch.equal(lp.isnan(), want[2].isnan())
    tol = 1e-9 if args[0].dtype == torch.float64 else 2e-5
    torch.testing.assert_close(lp, want[2], rtol=tol, atol=tol, equal_nan=True)
    # token_ids padded with -1 after the emitted ones; log_probs NaN there
    emitted = torch.arange(tok.shape[1])[None] <= acc[:, None]
    assert (tok[~emitted] == -1).all() and lp[~emitted].isnan().all()
    return got


@pytest.mark.cuda_params(dtype=[torch.float32, torch.bfloat16], vocab=[3001])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 31, 1025, 3001])
@pytest.mark.parametrize("draft", ["one-hot", "float32", "own"])
def test_op_matches_the_float64_oracle(device, dtype, vocab, draft):
    draft_dtype = {"one-hot": None, "float32": torch.float32, "own": dtype}[draft]
    for n, seed in ((0, 1), (1, 2), (4, 3)):
        args = _case(6, n, vocab, dtype, draft_dtype, seed, greedy_rows=(1, 4), ragged=n == 4, device=device)
        assert_matches_oracle(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_op_with_cuts_and_long_rows(device, dtype):
    args = _case(3, 3, 40000, dtype, torch.float32, 7, greedy_rows=(2,), cut=True, device=device)
    assert_matches_oracle(args)
    args = _case(3, 3, 40000, dtype, None, 8, cut=True, device=device)
    assert_matches_oracle(args)


def test_op_hostile_positions_end_only_their_row(device):
    x, ids, q, counts, t, ratio, u = _case(6, 3, 50, torch.float32, torch.float32, 5, greedy_rows=(5,))
    ids[:, :] = x[:, :3].argmax(-1)  # drafts the target likes: several rows reach the bad positions
    q = torch.nn.functional.one_hot(ids, 50).float()
    x[0, 0, 7] = float("nan")
    x[1, 1, :] = float("-inf")
    x[2, 2, 3] = float("inf")
    x[3, 3, 0] = float("nan")     # the bonus position
    x[4] = x[4] * 1e4             # 1e4-scale logits are a distribution like any other
    x[5, 0, :] = float("-inf")    # greedy row with nothing to take
    u[:, :3] = 0.0                # every test passes where p > 0
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in (x, ids, q, counts, t, ratio, u))
    tok, acc, lp = assert_matches_oracle(args)
    tok, acc, lp = tok.cpu(), acc.cpu(), lp.cpu()
    assert acc[0] == 0 and tok[0, 0] == -1 and lp[0, 0].isnan()
    for r, pos in ((1, 1), (2, 2), (3, 3)):
        assert acc[r] == pos and tok[r, pos] == -1 and lp[r, pos].isnan()
        assert torch.equal(tok[r, :pos], ids[r, :pos])
    assert acc[4] == 3 and (tok[4] >= 0).all()
    assert acc[5] == 0 and tok[5, 0] == -1


def test_greedy_rows_accept_the_argmax_with_ties_to_the_lowest_index(device):
    x = torch.zeros(2, 4, 6)
    x[:, :, 2] = 5.0
    x[:, :, 4] = 5.0                    # tied with index 2: the arg-max is 2
    ids = torch.tensor([[2, 2, 4], [2, 3, 2]])
    out = osm.rejection_sample(x.to(device), ids.to(device), temperature=0.0)
    assert out.num_accepted.tolist() == [2, 1]
    assert out.token_ids.tolist() == [[2, 2, 2, -1], [2, 2, -1, -1]]
    want = torch.log_softmax(x[0, 0], -1)[2]
    torch.testing.assert_close(out.log_probs[0, :3].cpu(), want.expand(3))


def test_all_accepted_rows_draw_a_bonus_token(device):
    x = random_logits((4, 3, 20), seed=3)
    ids = x[:, :2].argmax(-1)
    q = torch.nn.functional.one_hot(ids, 20).float() * 0 + 1e-9   # a draft that never beats p
    q.scatter_(2, ids[..., None], 1e-9)
    out = osm.rejection_sample(x.to(device), ids.to(device), q.to(device), generator=torch.Generator(device).manual_seed(0))
    assert (out.num_accepted == 2).all()
    assert torch.equal(out.token_ids[:, :2].cpu(), ids)
    assert ((out.token_ids[:, 2] >= 0) & (out.token_ids[:, 2] < 20)).all()


# ---- the distribution of the emitted tokens ----

ROWS = 24000
VOCAB = 9


def _target(vocab=VOCAB, seed=0):
    return random_logits((vocab,), torch.float64, scale=1.2, seed=seed)


def _drafts(kind, p_pos, n, rows, g):
    """Draft probabilities (rows, n, V) or None, and draft ids sampled from them; position i's draft
    is built from the target's p at i."""
    vocab = p_pos.shape[-1]
    if kind == "one-hot":  # a deterministic draft: the same token at every position
        return None, torch.full((rows, n), int(p_pos[0].argmax()), dtype=torch.int64)
    qs = []
    for p in p_pos[:n]:
        if kind == "target":
            q = p.clone()
        elif kind == "disjoint":  # its mass where the target's is least
            q = torch.zeros(vocab, dtype=torch.float64)
            q[p.argsort()[:3]] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
        elif kind == "zero-where-target-positive":
            q = torch.zeros(vocab, dtype=torch.float64)
            q[p.argsort()[-2:]] = 0.5
        elif kind == "flatter":
            q = torch.softmax(p.log() / 3, -1)
        elif kind == "sharper":
            q = torch.softmax(p.log() * 3, -1)
        else:
            raise AssertionError(kind)
        qs.append(q)
    q = torch.stack(qs).float()                                                     # (n, V)
    ids = torch.stack([torch.multinomial(q[i].double(), rows, replacement=True, generator=g) for i in range(n)], 1)
    return q.expand(rows, n, vocab).contiguous(), ids


def _check_every_slot(out, probs_of_slot, n, label):
    """Each slot j's emitted tokens (rows that got that far) against the target's distribution there."""
    tok, acc = out.token_ids.cpu(), out.num_accepted.cpu()
    for j in range(n + 1):
        reached = acc >= j
        if j > 0 and int(reached.sum()) < 500:  # a draft the target mostly rejects reaches few late slots
            continue
        ok, stat, limit = chi_square_ok(tok[reached, j], probs_of_slot(j, reached))
        assert ok, (label, j, stat, limit)


@pytest.mark.parametrize("kind", ["target", "disjoint", "zero-where-target-positive", "one-hot", "flatter",
                                  "sharper"])
def test_emitted_tokens_follow_the_target_whatever_the_draft(kind):
    n = 3
    g = torch.Generator().manual_seed(11)
    logits = torch.stack([_target(seed=s) for s in range(n + 1)])          # a different target per position
    p_pos = torch.softmax(logits, -1)
    q, ids = _drafts(kind, p_pos, n, ROWS, g)
    x = logits.float().expand(ROWS, n + 1, VOCAB).contiguous()
    out = osm.rejection_sample(x, ids, q, generator=g)
    _check_every_slot(out, lambda j, rows: p_pos[j], n, kind)
    if kind == "target":   # a draft equal to the target is always accepted
        assert (out.num_accepted == n).all()


@pytest.mark.parametrize("cuts", [dict(top_k=4), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=6, top_p=0.8),
                                  dict(top_k=5, min_p=0.1, temperature=0.7)])
def test_cuts_on_the_target_exclude_draft_tokens(cuts):
    n = 2
    g = torch.Generator().manual_seed(5)
    logits = torch.stack([_target(seed=s + 20) for s in range(n + 1)])
    warped = torch.stack([warped_probs(logits[j:j + 1], cuts.get("temperature", 1.0), cuts.get("top_k"),
                                       cuts.get("top_p"), cuts.get("min_p"))[0] for j in range(n + 1)])
    assert (warped == 0).any()                       # the cut removes tokens the draft proposes
    q, ids = _drafts("flatter", torch.softmax(logits, -1), n, ROWS, g)
    out = osm.rejection_sample(logits.float().expand(ROWS, n + 1, VOCAB).contiguous(), ids, q, generator=g, **cuts)
    tok = out.token_ids
    for j in range(n + 1):
        reached = out.num_accepted >= j
        assert (warped[j][tok[reached, j]] > 0).all()
    _check_every_slot(out, lambda j, rows: warped[j], n, cuts)


def test_top_p_cut_inside_a_tie_at_the_max():
    # top_p_threshold's cut for a tie at the max can be a rounding above 0; it must keep the tie.
    x = torch.tensor([[[2.0, 2.0, 1.0]], [[1.0, 1.0, 1.0]]]).repeat_interleave(3000, 0)
    out = osm.rejection_sample(x, torch.empty(6000, 0, dtype=torch.int64), top_p=torch.full((6000,), 0.5),
                               generator=torch.Generator().manual_seed(0))
    first, second = out.token_ids[:3000, 0], out.token_ids[3000:, 0]
    assert chi_square_ok(first, torch.tensor([0.5, 0.5, 0.0]))[0]     # both tied tokens, nothing else
    assert chi_square_ok(second, torch.full((3,), 1 / 3))[0]
    drawn = osm.sample(torch.tensor([[2.0, 2.0, 1.0]]), top_p=0.5, num_samples=2000)   # sample's own path too
    assert chi_square_ok(drawn.token_ids[0], torch.tensor([0.5, 0.5, 0.0]))[0]


def test_top_k_ties_past_the_candidates_with_top_p():
    # 20 logits tie with the 2nd: more than the candidates hold, so the row is redone over every
    # token before top-p; the tied tokens at the cut are all kept.
    x = torch.tensor([1.0] + [0.0] * 20 + [-5.0] * 10).expand(ROWS, 1, 31).contiguous()
    out = osm.rejection_sample(x, torch.empty(ROWS, 0, dtype=torch.int64), top_k=2, top_p=0.2,
                               generator=torch.Generator().manual_seed(1))
    want = torch.zeros(31, dtype=torch.float64)
    want[0], want[1:21] = math.e, 1.0
    assert chi_square_ok(out.token_ids[:, 0], want / want.sum())[0]


def test_float64_top_k_keeps_the_kth_token():
    # The cut is rebuilt with the kernels' own scale (float64 for float64 logits): the k-th stays.
    x = torch.tensor([0.3, 0.1, -2.0, -3.0], dtype=torch.float64).expand(ROWS, 1, 4).contiguous()
    for t in (0.3, 0.7, 1.3):
        out = osm.rejection_sample(x, torch.empty(ROWS, 0, dtype=torch.int64), temperature=t, top_k=2,
                                   generator=torch.Generator().manual_seed(2))
        assert chi_square_ok(out.token_ids[:, 0], warped_probs(x[0], t, 2)[0])[0], t


def test_per_row_temperatures_and_ragged_drafts():
    n = 3
    g = torch.Generator().manual_seed(9)
    logits = torch.stack([_target(seed=s + 40) for s in range(n + 1)])
    q, ids = _drafts("sharper", torch.softmax(logits, -1), n, ROWS, g)
    temps = torch.tensor([0.6, 1.0, 1.8], dtype=torch.float64).repeat(ROWS // 3)
    counts = torch.tensor([3, 1, 2, 0]).repeat(ROWS // 4)
    out = osm.rejection_sample(logits.float().expand(ROWS, n + 1, VOCAB).contiguous(), ids, q,
                               num_draft_tokens=counts, temperature=temps, generator=g)
    assert (out.num_accepted <= counts).all()
    tok, acc = out.token_ids, out.num_accepted
    for t_value in (0.6, 1.0, 1.8):
        for j in range(n + 1):
            rows = (temps == t_value) & (acc >= j)
            if int(rows.sum()) < 500:
                continue
            probs = torch.softmax(logits[j] / t_value, -1)
            assert chi_square_ok(tok[rows, j], probs)[0], (t_value, j)
    # A row with fewer drafts takes its bonus token from its own last position.
    zero = counts == 0
    assert chi_square_ok(tok[zero & (temps == 1.0), 0], torch.softmax(logits[0], -1))[0]


def test_the_unfused_peer_draws_the_same_distribution():
    n = 2
    g = torch.Generator().manual_seed(3)
    logits = torch.stack([_target(seed=s + 60) for s in range(n + 1)])
    q, ids = _drafts("flatter", torch.softmax(logits, -1), n, ROWS, g)
    tok, acc = unfused_rejection_sample(logits.float().expand(ROWS, n + 1, VOCAB), ids, q, generator=g)
    p_pos = torch.softmax(logits, -1)
    for j in range(n + 1):
        assert chi_square_ok(tok[acc >= j, j], p_pos[j])[0]


# ---- the API ----

def test_seeded_generator_reproduces_and_uses_one_rand_call(device):
    x = random_logits((5, 4, 300), seed=2).to(device)
    ids = torch.randint(0, 300, (5, 3)).to(device)
    q = torch.softmax(random_logits((5, 3, 300), seed=3), -1).to(device)
    a = osm.rejection_sample(x, ids, q, top_k=50, top_p=0.9, generator=torch.Generator(device).manual_seed(4))
    b = osm.rejection_sample(x, ids, q, top_k=50, top_p=0.9, generator=torch.Generator(device).manual_seed(4))
    assert all(torch.equal(s, t) for s, t in zip(a[:2], b[:2]))
    torch.testing.assert_close(a.log_probs, b.log_probs, equal_nan=True)
    # The uniforms are one torch.rand((batch, n + 1), float64) call of that generator.
    u = torch.rand(5, 4, dtype=torch.float64, device=device, generator=torch.Generator(device).manual_seed(4))
    t = torch.ones(5, dtype=torch.float64, device=device)
    direct = ops.rejection_sample(x, ids, q, torch.full((5,), 3, device=device), t, None, u)
    c = osm.rejection_sample(x, ids, q, generator=torch.Generator(device).manual_seed(4))
    assert torch.equal(direct[0], c.token_ids)


def test_log_probs_are_under_the_warped_target(device):
    x = random_logits((4, 3, 64), seed=8).to(device)
    ids = torch.randint(0, 64, (4, 2), generator=torch.Generator().manual_seed(0)).to(device)
    out = osm.rejection_sample(x, ids, temperature=0.8, top_k=20, generator=torch.Generator(device).manual_seed(1))
    for b in range(4):
        for j in range(int(out.num_accepted[b]) + 1):
            probs = warped_probs(x[b, j:j + 1].double().cpu(), 0.8, 20)[0]
            tok = int(out.token_ids[b, j])
            assert probs[tok] > 0
            assert math.isclose(float(out.log_probs[b, j]), math.log(float(probs[tok])), rel_tol=1e-4, abs_tol=1e-4)


def test_empty_batch_and_meta_tensors():
    out = osm.rejection_sample(torch.randn(0, 3, 10), torch.zeros(0, 2, dtype=torch.int64))
    assert out.token_ids.shape == (0, 3) and out.num_accepted.shape == (0,) and out.log_probs.shape == (0, 3)
    m = osm.rejection_sample(torch.randn(2, 5, 10, device="meta", dtype=torch.bfloat16),
                             torch.zeros(2, 4, dtype=torch.int64, device="meta"))
    assert m.token_ids.shape == (2, 5) and m.log_probs.dtype == torch.float32 and m.token_ids.device.type == "meta"
    n0 = osm.rejection_sample(torch.randn(3, 1, 10), torch.zeros(3, 0, dtype=torch.int64))  # no drafts: one draw
    assert (n0.num_accepted == 0).all() and (n0.token_ids[:, 0] >= 0).all()


@pytest.mark.parametrize("call, error, words", [
    (lambda x, i, q: osm.rejection_sample(x[0], i, q), ValueError, "target_logits must be 3-D"),
    (lambda x, i, q: osm.rejection_sample(x.long(), i, q), TypeError, "target_logits"),
    (lambda x, i, q: osm.rejection_sample(x, i.float(), q), TypeError, "draft_token_ids"),
    (lambda x, i, q: osm.rejection_sample(x, i[:, :2], q), ValueError, "draft_token_ids must have shape"),
    (lambda x, i, q: osm.rejection_sample(x, i + 100, q), ValueError, "draft_token_ids must lie in"),
    (lambda x, i, q: osm.rejection_sample(x, i - 1, q), ValueError, "draft_token_ids must lie in"),
    (lambda x, i, q: osm.rejection_sample(x, i, q[:, :, :5]), ValueError, "draft_probs must have shape"),
    (lambda x, i, q: osm.rejection_sample(x, i, -q), ValueError, "draft_probs must lie in"),
    (lambda x, i, q: osm.rejection_sample(x, i, q.masked_fill(q > 0.05, float("nan"))), ValueError, "draft_probs"),
    (lambda x, i, q: osm.rejection_sample(x, i, q.long()), TypeError, "draft_probs"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, num_draft_tokens=torch.tensor([4, 1])), ValueError,
     "num_draft_tokens must lie in"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, num_draft_tokens=torch.tensor([1])), ValueError,
     "num_draft_tokens must have shape"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, num_draft_tokens=torch.tensor([1.0, 2.0])), TypeError,
     "num_draft_tokens"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, temperature=-1.0), ValueError, "temperature"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, temperature=float("nan")), ValueError, "temperature"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, top_p=1.5), ValueError, "top_p"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, top_k=-2), ValueError, "top_k"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, temperature=torch.ones(3)), ValueError, "temperature"),
    (lambda x, i, q: osm.rejection_sample(x, i, q, generator=3), TypeError, "generator"),
    (lambda x, i, q: osm.rejection_sample([1.0], i, q), TypeError, "target_logits"),
])
def test_bad_arguments_name_themselves(call, error, words):
    x = random_logits((2, 4, 10), seed=1)
    ids = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(0))
    q = torch.softmax(random_logits((2, 3, 10), seed=2), -1)
    with pytest.raises(error, match=words):
        call(x, ids, q)


def test_mismatched_devices_are_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: tensors on two devices")
    x = random_logits((2, 4, 10)).cuda()
    with pytest.raises(ValueError, match="draft_token_ids is on"):
        ops.rejection_sample(x, torch.zeros(2, 3, dtype=torch.int64), None, torch.full((2,), 3).cuda(),
                             torch.ones(2, dtype=torch.float64).cuda(), None,
                             torch.rand(2, 4, dtype=torch.float64).cuda())


def test_opcheck(device):
    # Every draft accepted (the arg-max, tested with u = 0) and a bonus token: no -1 / NaN padding,
    # which opcheck's comparisons would take for a difference.
    x = random_logits((3, 4, 33), seed=4).to(device)
    ids = x[:, :3].argmax(-1)
    q = torch.softmax(random_logits((3, 3, 33), seed=5), -1).to(device)
    f64 = dict(dtype=torch.float64, device=device)
    u = torch.rand(3, 4, **f64)
    u[:, :3] = 0.0
    cases = [
        (x, ids, q, torch.full((3,), 3, device=device), torch.tensor([1.0, 0.0, 0.7], **f64), None, u),
        (x.bfloat16(), ids, None, torch.full((3,), 3, device=device), torch.ones(3, **f64),
         torch.full((3, 4), -2.0, **f64), u),
    ]
    for args in cases:
        torch.library.opcheck(ops.rejection_sample, args)


def test_compiles_with_fullgraph(device):
    x = random_logits((3, 4, 40), seed=6).to(device)
    ids = torch.randint(0, 40, (3, 3), generator=torch.Generator().manual_seed(1)).to(device)
    q = torch.softmax(random_logits((3, 3, 40), seed=7), -1).to(device)

    def verify(x, ids, q, temperature):
        return osm.rejection_sample(x, ids, q, temperature=temperature, top_k=10, top_p=0.9)

    torch._dynamo.reset()
    compiled = torch.compile(verify, fullgraph=True)
    temps = torch.tensor([0.8, 0.0, 1.2], dtype=torch.float64, device=device)
    want = verify(x, ids, q, temps)
    got = compiled(x, ids, q, temps)
    # The greedy row is the same; the sampled rows draw from the compiled graph's own random stream.
    assert torch.equal(got.token_ids[1], want.token_ids[1]) and got.num_accepted[1] == want.num_accepted[1]
    for b in (0, 2):
        for j in range(int(got.num_accepted[b]) + 1):
            probs = warped_probs(x[b, j:j + 1].double().cpu(), float(temps[b]), 10, 0.9)[0]
            assert probs[int(got.token_ids[b, j])] > 0
