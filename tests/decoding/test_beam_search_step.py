"""The fused beam-search step equals the unfused torch sequence decoders run today."""

import pytest
import torch

import online_softmax as osm
from testlib import FLOAT_DTYPES, LOW_PRECISION, random_logits
from online_softmax.reference import unfused_beam_search_step


def inputs(batch, beams, vocab, dtype, device, seed=0):
    logits = random_logits((batch * beams, vocab), dtype, device, scale=4.0, seed=seed)
    scores = -random_logits((batch, beams), torch.float64, device, scale=1.0, seed=seed + 1).abs() * 10
    return logits, scores.to(torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("batch,beams,vocab", [(1, 1, 7), (2, 4, 50257), (3, 8, 1000), (1, 64, 4096),
                                               (2, 3, 300001), (4, 5, 5)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_equals_unfused(device, dtype, batch, beams, vocab, temperature):
    logits, scores = inputs(batch, beams, vocab, dtype, device)
    got = osm.beam_search_step(logits, scores, beams, temperature=temperature)
    want = unfused_beam_search_step(logits, scores, beams, temperature=temperature)
    assert got.scores.shape == (batch, min(2 * beams, beams * vocab)) == want.scores.shape
    assert got.scores.dtype == want.scores.dtype
    full = torch.log_softmax(logits.double() / temperature, -1).view(batch, beams, vocab) + scores.double()[..., None]
    exact = full.view(batch, -1).topk(got.scores.shape[1]).values
    if dtype in LOW_PRECISION:
        # The unfused sequence rounds logits / T to the half type before the log-softmax; the fused
        # step scales in float32. Its error must be no worse than twice the unfused one.
        err_ours = (got.scores.double() - exact).abs().max().item()
        err_torch = (want.scores.double() - exact).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)
        tol = 2e-2 * max(1.0, exact.abs().max().item())
    else:
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got.scores, want.scores, rtol=tol, atol=tol)
        assert torch.equal(got.token_ids, want.token_ids)  # no near-ties in random float32 data
        assert torch.equal(got.beam_ids, want.beam_ids)
    # Whatever the ties, every returned (beam, token) scores what it claims.
    picked = full[torch.arange(batch, device=device)[:, None], got.beam_ids, got.token_ids]
    torch.testing.assert_close(got.scores.double(), picked, rtol=tol, atol=tol)


def test_banned_tokens_and_ties_across_beams(device):
    logits, scores = inputs(2, 3, 10, torch.float32, device)
    logits[:, 4] = float("-inf")                 # banned in every beam
    logits[1] = float("-inf")                    # batch 0, beam 1: all banned but tokens 2 and 7
    logits[1, 2] = 0.0
    logits[0:3, 7] = 50.0                        # token 7 has log-prob 0 in all three beams of batch 0
    scores[0] = -1.0
    got = osm.beam_search_step(logits, scores, 3, num_candidates=30)
    assert got.beam_ids[0, :3].tolist() == [0, 1, 2]   # the tie goes to the lower beam
    assert got.token_ids[0, :3].tolist() == [7, 7, 7]
    assert torch.isinf(got.scores[0, -10:]).all() and torch.isfinite(got.scores[0, :-10]).all()
    assert not (got.token_ids[0, :-10] == 4).any()
    want = unfused_beam_search_step(logits, scores, 3, num_candidates=30)
    torch.testing.assert_close(got.scores, want.scores)


def test_ties_go_to_the_lower_flat_index(device):
    logits = torch.zeros(4, 6, device=device)
    scores = torch.zeros(2, 2, device=device)
    got = osm.beam_search_step(logits, scores, 2, num_candidates=5)
    assert got.beam_ids.tolist() == [[0, 0, 0, 0, 0]] * 2
    assert got.token_ids.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_empty_batch_and_bad_arguments(device):
    logits, scores = inputs(0, 4, 10, torch.float32, device)
    got = osm.beam_search_step(logits, scores, 4)
    assert got.scores.shape == (0, 8)
    logits, scores = inputs(2, 4, 10, torch.float32, device)
    with pytest.raises(ValueError, match="rows but batch"):
        osm.beam_search_step(logits[:-1], scores, 4)
    with pytest.raises(ValueError, match="columns but num_beams"):
        osm.beam_search_step(logits, scores, 3)
    with pytest.raises(ValueError, match="num_candidates"):
        osm.beam_search_step(logits, scores, 4, num_candidates=41)
    with pytest.raises(TypeError, match="logits"):
        osm.beam_search_step(logits.long(), scores, 4)
    with pytest.raises(ValueError, match="temperature"):
        osm.beam_search_step(logits, scores, 4, temperature=0.0)


def test_opcheck_and_compile():
    from torch.library import opcheck
    logits, scores = inputs(2, 4, 33, torch.float32, "cpu")
    opcheck(torch.ops.online_softmax.beam_search_step.default, (logits, scores, 4, 8, 1.0))
    f = torch.compile(lambda a, b: osm.beam_search_step(a, b, 4), fullgraph=True)
    got, want = f(logits, scores), osm.beam_search_step(logits, scores, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def random_edits(rows, vocab, n, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (rows, n), generator=g)
    if pad:  # padding entries and repeated ids, as decoders build them
        t[torch.rand(rows, n, generator=g) < 0.25] = -1
        t[:, -1] = t[:, 0]
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,beams,vocab,n_banned,n_pen", [(2, 4, 1000, 6, 20), (3, 2, 50, 10, 30),
                                                              (1, 3, 7, 4, 5), (2, 5, 4096, 0, 64),
                                                              (2, 2, 300, 40, 0)])
@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_edits_equal_processors_on_log_probs(device, dtype, batch, beams, vocab, n_banned, n_pen, penalty):
    """Bans and the repetition penalty, applied after normalization, equal transformers' processors
    on materialized log-probabilities (apply_row_edits), for penalties that lower and raise scores."""
    logits, scores = inputs(batch, beams, vocab, dtype, device, seed=vocab)
    rows = batch * beams
    banned = random_edits(rows, vocab, n_banned, 1).to(device) if n_banned else None
    pen = random_edits(rows, vocab, n_pen, 2).to(device) if n_pen else None
    if pen is not None:
        logits.view(-1)[:: 7] += 3.0  # penalized tokens among each row's best
        pen[:, 1] = logits.argmax(-1)
    kw = dict(banned_tokens=banned, penalized_tokens=pen, repetition_penalty=penalty)
    for nc in (2 * beams, min(beams * vocab, 3 * beams + 5)):
        got = osm.beam_search_step(logits, scores, beams, num_candidates=nc, **kw)
        want = unfused_beam_search_step(logits.double(), scores.double(), beams, num_candidates=nc, **kw)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got.scores.double(), want.scores, rtol=tol, atol=tol)
        finite = torch.isfinite(want.scores)
        assert torch.equal(got.token_ids[finite], want.token_ids[finite])
        assert torch.equal(got.beam_ids[finite], want.beam_ids[finite])
        if banned is not None:  # nothing banned is returned with a finite score
            hit = (got.token_ids[..., None] == banned.view(batch, beams, -1)[
                torch.arange(batch, device=device)[:, None], got.beam_ids]).any(-1)
            assert torch.isinf(got.scores[hit]).all()


def test_edits_that_ban_a_whole_row_and_more_than_the_vocabulary(device):
    logits, scores = inputs(2, 2, 6, torch.float32, device)
    banned = torch.tensor([[0, 1, 2, 3, 4, 5, 5, -1], [-1] * 8, [2] * 8, [0, 1, 2, 3, 4, 5, -1, -1]], device=device)
    pen = torch.arange(6, device=device).repeat(4, 2)
    got = osm.beam_search_step(logits, scores, 2, num_candidates=12, banned_tokens=banned, penalized_tokens=pen,
                               repetition_penalty=2.0)
    want = unfused_beam_search_step(logits, scores, 2, num_candidates=12, banned_tokens=banned,
                                    penalized_tokens=pen, repetition_penalty=2.0)
    torch.testing.assert_close(got.scores, want.scores)
    assert torch.isinf(got.scores[0, 6:]).all() and torch.isinf(got.scores[1, 5:]).all()
    assert got.beam_ids[0, :6].eq(1).all() and got.beam_ids[1, :5].eq(0).all()
    empty = torch.empty(4, 0, dtype=torch.int64, device=device)
    same = osm.beam_search_step(logits, scores, 2, banned_tokens=empty, penalized_tokens=empty, repetition_penalty=3.0)
    plain = osm.beam_search_step(logits, scores, 2)
    for a, b in zip(same, plain):
        assert torch.equal(a, b)


def test_bad_edit_arguments(device):
    logits, scores = inputs(2, 2, 10, torch.float32, device)
    ok = torch.zeros(4, 3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"banned_tokens entries must be token ids in \[0, vocab = 10\)"):
        osm.beam_search_step(logits, scores, 2, banned_tokens=ok + 10)
    with pytest.raises(ValueError, match="penalized_tokens entries"):
        osm.beam_search_step(logits, scores, 2, penalized_tokens=ok - 2)
    with pytest.raises(TypeError, match="banned_tokens must be an int64 tensor"):
        osm.beam_search_step(logits, scores, 2, banned_tokens=ok.int())
    with pytest.raises(ValueError, match="penalized_tokens must be 2-D with one row per logits row"):
        osm.beam_search_step(logits, scores, 2, penalized_tokens=ok[:3])
    with pytest.raises(ValueError, match="repetition_penalty"):
        osm.beam_search_step(logits, scores, 2, penalized_tokens=ok, repetition_penalty=0.0)
    with pytest.raises(TypeError, match="banned_tokens must be a torch.Tensor"):
        osm.beam_search_step(logits, scores, 2, banned_tokens=[1, 2])


def test_opcheck_with_edits():
    from torch.library import opcheck
    logits, scores = inputs(2, 4, 33, torch.float32, "cpu")
    banned, pen = random_edits(8, 33, 5, 3), random_edits(8, 33, 9, 4)
    opcheck(torch.ops.online_softmax.beam_search_step.default, (logits, scores, 4, 8, 1.0, banned, pen, 1.2))
    f = torch.compile(lambda a, b, c, d: osm.beam_search_step(a, b, 4, banned_tokens=c, penalized_tokens=d,
                                                              repetition_penalty=1.2), fullgraph=True)
    for a, b in zip(f(logits, scores, banned, pen), osm.beam_search_step(logits, scores, 4, banned_tokens=banned,
                                                                        penalized_tokens=pen, repetition_penalty=1.2)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_cpu_kernel_agrees_with_the_composite(penalty):
    """The CPU's own step (float32/float64 logits with beam scores of their dtype) and the
    composite every other backend runs (reached on the CPU by mixing dtypes) pick the same
    candidates with the same scores."""
    batch, beams, vocab = 3, 4, 2000
    logits, scores = (t.double() for t in inputs(batch, beams, vocab, torch.float64, "cpu", seed=5))
    banned, pen = random_edits(batch * beams, vocab, 12, 6), random_edits(batch * beams, vocab, 40, 7)
    pen[:, 0] = logits.argmax(-1)
    kw = dict(num_candidates=11, banned_tokens=banned, penalized_tokens=pen, repetition_penalty=penalty)
    fused = osm.beam_search_step(logits, scores, beams, **kw)
    composite = osm.beam_search_step(logits.float(), scores, beams, **kw)  # float32 + float64: the composite
    assert composite.scores.dtype == torch.float64
    assert torch.equal(fused.token_ids, composite.token_ids) and torch.equal(fused.beam_ids, composite.beam_ids)
    torch.testing.assert_close(fused.scores, composite.scores, rtol=1e-5, atol=1e-5)
