"""The fused beam-search step equals the unfused torch sequence decoders run today."""

import pytest
import torch

import online_softmax as osm
from conftest import FLOAT_DTYPES, LOW_PRECISION
from online_softmax.beam_search import unfused_beam_search_step


def inputs(batch, beams, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch * beams, vocab, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    scores = (-torch.rand(batch, beams, generator=g, dtype=torch.float64) * 10).to(torch.float32).to(device)
    return logits, scores


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
