"""online_softmax.sample as a serving engine's sampler: vLLM's edits (allowed tokens, bad words,
min_tokens, logit bias, presence / frequency / repetition penalties) as sparse per-row edits, the
log-probability fields (raw and processed), and per-row generators, against the dense float64
oracle of online_softmax.reference.serving (vLLM's formulas over the whole vocabulary)."""

import pytest
import torch

import online_softmax as osm
from online_softmax.decoding import serving_edits
from online_softmax.reference.serving import edited_logits, sample_fields_reference
from testlib import chi_square_ok, random_logits

ROWS, VOCAB = 6, 1500
OUTPUTS = [[1, 2, 2, 3], [5], [], [7, 7, 7, 900], [40, 41, 42], [3]]
PROMPTS = [[4, 5], [6], [], [8, 8], [1499], [0]]

EDITS = {
    "bias": dict(logit_bias=[{10: 5.0}, None, {3: -2.0, 1499: 8.0}, {0: 40.0}, None, {7: 1.5}]),
    "repetition": dict(repetition_penalty=[1.2, 1.0, 1.5, 2.0, 0.7, 1.1], output_token_ids=OUTPUTS,
                       prompt_token_ids=PROMPTS),
    "frequency_presence": dict(frequency_penalty=0.3, presence_penalty=[0.1, 0.2, 0.0, 0.5, -0.4, 2.0],
                               output_token_ids=OUTPUTS),
    "bad_words": dict(bad_words=[[[2, 3, 9]], [[11]], None, [[7, 12], [900, 13]], [[41, 42, 43], [42, 44]], None],
                      output_token_ids=OUTPUTS),
    "min_tokens": dict(min_tokens=[5, 0, 1, 2, 3, 9], stop_token_ids=[[0], [0], [1], [2, 3], [4], [5, 6]],
                       output_token_ids=OUTPUTS),
    "allowed": dict(allowed_token_ids=[[1, 5, 9, 300, 301, 2], None, [7], list(range(3, 60)), None, None]),
}
EDITS["all"] = {k: v for e in EDITS.values() for k, v in e.items()}
CUTS = [dict(top_k=20), dict(top_k=50, top_p=0.9), dict(top_p=0.8), dict(min_p=0.1), dict(temperature=0.7),
        dict(top_k=5, min_p=0.2, temperature=1.3)]


def logits(dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    return random_logits((ROWS, VOCAB), dtype, device=device, scale=scale, seed=seed)


def gen(device, seed):
    return torch.Generator(device).manual_seed(seed)


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edited_logits_are_vllms_float32_formulas_exactly(name):
    x = logits()
    edits, restriction = serving_edits.build(x, **EDITS[name])
    got = serving_edits.dense_rows(x, edits)
    if restriction is not None:  # the dense oracle writes -inf outside the allowed tokens
        masked = torch.full_like(got, float("-inf"))
        kept = restriction.ids >= 0
        r = restriction.rows[:, None].expand_as(restriction.ids)[kept]
        masked[r, restriction.ids[kept]] = got[r, restriction.ids[kept]]
        free = torch.ones(ROWS, dtype=torch.bool)
        free[restriction.rows] = False
        masked[free] = got[free]
        got = masked
    assert torch.equal(got, edited_logits(x, dtype=torch.float32, **EDITS[name]))


def check_fields(out, ref, mode):
    p = ref["probs"].gather(1, out.token_ids.clamp_min(0))
    assert (p > 0).all(), "drew a token the distribution does not hold"
    torch.testing.assert_close(out.log_probs.double(), p.log(), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.token_log_probs.double(), ref["token_log_probs"], atol=2e-4, rtol=1e-4)
    assert torch.equal(out.rank.cpu(), ref["rank"].cpu())
    finite = ref["top_log_probs"] > float("-inf")  # past the kept tokens any -inf token may stand
    assert torch.equal(out.top_token_ids[finite].cpu(), ref["top_token_ids"][finite].cpu())
    if mode == "processed":
        assert torch.equal(out.top_log_probs.isinf(), ~finite.to(out.top_log_probs.device))
    torch.testing.assert_close(out.top_log_probs.double().masked_fill(~finite, 0), ref["top_log_probs"].masked_fill(~finite, 0),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("cut", CUTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("name", sorted(EDITS))
@pytest.mark.cuda_params(name=["all"])
def test_fields_match_the_float64_oracle(device, name, cut, mode):
    x = logits(device=device)
    out = osm.sample(x, num_samples=3, logprobs=5, logprobs_mode=mode, generator=gen(device, 1), **cut, **EDITS[name])
    ref = sample_fields_reference(x.cpu(), out.token_ids.cpu(), logprobs=5, logprobs_mode=mode, **cut, **EDITS[name])
    check_fields(out, {k: v.to(device) for k, v in ref.items()}, mode)


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fields_in_every_dtype(device, dtype, mode):
    x = logits(dtype, device=device)
    for cut in (dict(top_k=30), dict(top_p=0.9), dict()):
        out = osm.sample(x, logprobs=4, logprobs_mode=mode, generator=gen(device, 2), **cut, **EDITS["all"])
        assert out.token_log_probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        ref = sample_fields_reference(x.cpu(), out.token_ids.cpu(), logprobs=4, logprobs_mode=mode, **cut,
                                      **EDITS["all"])
        check_fields(out, {k: v.to(device) for k, v in ref.items()}, mode)


def test_no_fields_unless_asked_and_shapes(device):
    x = logits(device=device).view(2, 3, VOCAB)
    plain = osm.sample(x, top_k=10, generator=gen(device, 0))
    assert plain.token_log_probs is None and plain.rank is None and plain.top_token_ids is None
    out = osm.sample(x, top_k=10, num_samples=2, logprobs=7, generator=gen(device, 0))
    assert out.token_ids.shape == (2, 3, 2)
    assert out.token_log_probs.shape == (2, 3, 2) and out.rank.shape == (2, 3, 2)
    assert out.top_token_ids.shape == (2, 3, 7) and out.top_log_probs.shape == (2, 3, 7)
    zero = osm.sample(x, logprobs=0, generator=gen(device, 0))
    assert zero.top_token_ids.shape == (2, 3, 0) and zero.rank.shape == (2, 3, 1)
    empty = osm.sample(x[:0], logprobs=3)
    assert empty.top_token_ids.shape == (0, 3, 3)


def test_raw_fields_equal_token_logprobs_of_the_drawn_tokens(device):
    x = logits(device=device, scale=8.0)
    for cut in (dict(top_k=40), dict(top_p=0.5), dict()):
        out = osm.sample(x, logprobs=6, generator=gen(device, 3), **cut)
        tl = osm.token_logprobs(x, out.token_ids[:, 0], top_n=6)
        torch.testing.assert_close(out.token_log_probs[:, 0], tl.log_probs)
        assert torch.equal(out.rank[:, 0], tl.rank)
        assert torch.equal(out.top_token_ids, tl.top_token_ids)
        torch.testing.assert_close(out.top_log_probs, tl.top_log_probs)


@pytest.mark.parametrize("cut", [dict(top_k=8), dict(top_p=0.95), dict()], ids=["top_k", "top_p", "whole"])
def test_draws_follow_the_edited_distribution(device, cut):
    x = logits(device=device, scale=1.0)[:1].repeat(4000, 1)
    row = {k: [v[3]] * 4000 for k, v in EDITS["all"].items() if isinstance(v, list)}
    row.update({k: v for k, v in EDITS["all"].items() if not isinstance(v, list)})
    out = osm.sample(x, generator=gen(device, 5), **cut, **row)
    probs = sample_fields_reference(x[:1].cpu(), out.token_ids[:1].cpu(), **cut,
                                    **{k: (v[:1] if isinstance(v, list) else v) for k, v in row.items()})["probs"][0]
    ok, stat, limit = chi_square_ok(out.token_ids[:, 0], probs)
    assert ok, (stat, limit)


def test_banned_and_disallowed_tokens_are_never_drawn(device):
    x = torch.zeros(3, 64, device=device)
    x[:, 7] = 30.0  # the row's overwhelming favourite, then banned
    kw = dict(bad_words=[[[7]], None, None], min_tokens=[0, 4, 0], stop_token_ids=[None, [7], None],
              allowed_token_ids=[None, None, [1, 2, 3]], output_token_ids=[[], [1], []])
    for cut in (dict(top_k=3), dict(top_p=0.99), dict(min_p=0.5), dict()):
        out = osm.sample(x, num_samples=300, generator=gen(device, 6), **cut, **kw)
        assert not (out.token_ids[:2] == 7).any()
        assert set(out.token_ids[2].tolist()) <= {1, 2, 3}


def test_a_row_with_every_token_banned_draws_minus_one(device):
    x = logits(device=device)[:2, :5].contiguous()
    out = osm.sample(x, logprobs=2, allowed_token_ids=[[1], None], logit_bias=[{1: float("-inf")}, None],
                     generator=gen(device, 0))
    assert out.token_ids[0, 0] == -1 and out.log_probs[0, 0].isnan() and out.rank[0, 0] == -1
    assert out.token_ids[1, 0] >= 0


def test_seeded_rows_draw_the_same_tokens_anywhere_in_any_batch(device):
    x = logits(device=device)
    for cut in (dict(top_k=50), dict(top_p=0.9), dict()):
        a = osm.sample(x, num_samples=5, generator=[gen(device, 1), None, gen(device, 2), None, None, gen(device, 3)],
                       **cut)
        b = osm.sample(x[[5, 2, 0]], num_samples=5, generator=[gen(device, 3), gen(device, 2), gen(device, 1)], **cut)
        c = osm.sample(torch.cat([x[2:3], logits(device=device, seed=9)]), num_samples=5,
                       generator=[gen(device, 2)] + [None] * ROWS, **cut)
        assert torch.equal(a.token_ids[[5, 2, 0]], b.token_ids)
        assert torch.equal(a.token_ids[2], c.token_ids[0])


def test_bad_arguments():
    x = logits()
    cases = [
        (dict(logprobs=VOCAB + 1), ValueError, "logprobs"),
        (dict(logprobs=-1), ValueError, "logprobs"),
        (dict(logprobs=2, logprobs_mode="final"), ValueError, "logprobs_mode"),
        (dict(generator=[None] * (ROWS - 1)), ValueError, "generator"),
        (dict(generator=[1] * ROWS), TypeError, "generator"),
        (dict(logit_bias=[{VOCAB: 1.0}] + [None] * (ROWS - 1)), ValueError, "logit_bias"),
        (dict(logit_bias=[{1: 1.0}]), ValueError, "logit_bias"),
        (dict(allowed_token_ids=[[-1]] + [None] * (ROWS - 1)), ValueError, "allowed_token_ids"),
        (dict(allowed_token_ids=[[]] + [None] * (ROWS - 1)), ValueError, "allowed_token_ids"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(repetition_penalty=[1.0] * (ROWS + 1)), ValueError, "repetition_penalty"),
        (dict(frequency_penalty=float("nan")), ValueError, "frequency_penalty"),
        (dict(frequency_penalty=0.5, output_token_ids=[[VOCAB]] + [[]] * (ROWS - 1)), ValueError, "output_token_ids"),
        (dict(repetition_penalty=1.5, prompt_token_ids=torch.full((ROWS, 2), -5)), ValueError, "prompt_token_ids"),
        (dict(min_tokens=[-1] * ROWS, stop_token_ids=[[0]] * ROWS), ValueError, "min_tokens"),
        (dict(min_tokens=3), ValueError, "stop_token_ids"),
        (dict(bad_words=[[[]]] + [None] * (ROWS - 1)), ValueError, "bad_words"),
        (dict(bad_words=[[[VOCAB]]] + [None] * (ROWS - 1)), ValueError, "bad_words"),
    ]
    for kw, kind, name in cases:
        with pytest.raises(kind, match=name):
            osm.sample(x, **kw)


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_more_edited_tokens_among_the_top_than_the_selection_slack(device, mode):
    """A repetition penalty on a row's 150 most likely tokens: the fused selection's slack for
    edits (64) does not hold them, so those rows select again; the result is still exact."""
    x = logits(device=device)[:3]
    top = x.topk(200).indices.cpu()
    kw = dict(repetition_penalty=[1.3, 1.0, 2.0], presence_penalty=0.5,
              output_token_ids=[top[0, :150].tolist(), [], top[2, :100].tolist()])
    out = osm.sample(x, top_k=40, num_samples=20, logprobs=30, logprobs_mode=mode, generator=gen(device, 4), **kw)
    ref = sample_fields_reference(x.cpu(), out.token_ids.cpu(), top_k=40, logprobs=30, logprobs_mode=mode, **kw)
    check_fields(out, {k: v.to(device) for k, v in ref.items()}, mode)


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("cut", [dict(top_k=10), dict(top_p=0.9), dict()], ids=["top_k", "top_p", "whole"])
def test_hostile_rows(device, cut, mode):
    x = logits(device=device)[:5].clone()
    x[0, 3] = float("nan")
    x[1] = float("-inf")
    x[2] *= 1e4 / 3
    x[3, 9] = float("inf")
    kw = dict(logit_bias=[{1: 1.0}] * 5, repetition_penalty=1.3, output_token_ids=[[2, 3]] * 5)
    out = osm.sample(x, num_samples=2, logprobs=3, logprobs_mode=mode, generator=gen(device, 8), **cut, **kw)
    for r in (0, 1, 3):  # no distribution: -1, rank -1, NaN
        assert (out.token_ids[r] == -1).all() and out.log_probs[r].isnan().all()
        assert (out.rank[r] == -1).all() and out.token_log_probs[r].isnan().all()
    good = [2, 4]
    ref = sample_fields_reference(x[good].cpu(), out.token_ids[good].cpu(), logprobs=3, logprobs_mode=mode, **cut,
                                  **{k: (v[:2] if isinstance(v, list) else v) for k, v in kw.items()})
    check_fields(osm.Sample(*(f[good] for f in out)), {k: v.to(device) for k, v in ref.items()}, mode)
