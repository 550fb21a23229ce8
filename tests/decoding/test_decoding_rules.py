"""BeamSearchDecoder with generate()'s logits processors, left-padded batches and a KV cache, against
Hugging Face transformers' generate(num_beams=..., do_sample=False) on small random GPT-2s: same
sequences, scores within 1e-5. Every option is also checked to change transformers' own output, so
that no comparison passes by doing nothing. The option and cache tests run on each device (the
`device` fixture: the model and the prompts moved to the device; the cuda cases for one search)."""

import pytest
import torch

from online_softmax import BeamSearchDecoder

transformers = pytest.importorskip("transformers")

from testlib import EOS, VOCAB, tiny_gpt2  # noqa: E402


def left_padded(seed, lengths):
    """A batch of prompts of the given lengths, left-padded with EOS, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), EOS, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(4, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def masked_step(model, use_cache):
    """The step function of the README and examples/beam_search_gpt2.py (with or without a cache)."""
    def step(ids, cache, beam_idx, mask):
        if cache is not None:
            cache.reorder_cache(beam_idx)
        new = ids if cache is None else ids[:, -1:]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1]:]
        out = model(new, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=use_cache)
        return out.logits[:, -1, :], (out.past_key_values if use_cache else None)
    return step


def plain_step(model):
    def step(ids, cache, beam_idx):
        return model(ids).logits[:, -1, :], None
    return step


def hf(model, ids, mask, use_cache=False, **kw):
    return model.generate(ids, attention_mask=mask, do_sample=False, use_cache=use_cache, eos_token_id=EOS,
                          pad_token_id=EOS, return_dict_in_generate=True, output_scores=True, **kw)


class BoostToken:
    """A caller's processor generate() would append after its own: adds 2 to one token's score."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] += 2.0
        return scores


def options(ids, plain):
    """Each option, aimed at what the search without it returns (``plain``: its sequences), so
    that it has something to change."""
    last, width = ids[0, -1].item(), ids.shape[1]
    first = plain[:, width].tolist()                       # every returned hypothesis' first token
    a, b, c = plain[0, width:width + 3].tolist()
    return {
        "ngram2": dict(no_repeat_ngram_size=2),
        "ngram1": dict(no_repeat_ngram_size=1),
        "penalty_up": dict(repetition_penalty=1.8),
        "penalty_down": dict(repetition_penalty=0.6),
        "min_new": dict(min_new_tokens=5),
        "min_length": dict(min_length=width + 7),
        "bad_words": dict(bad_words_ids=[[first[-1]], [a, b], [last, 7], [a, b, c], [EOS]]),
        "suppress": dict(suppress_tokens=[EOS, 6, 20]),
        "begin_suppress": dict(begin_suppress_tokens=[EOS] + first[:2]),
        "forced_eos": dict(forced_eos_token_id=EOS, max_new_tokens=3),
        "custom": dict(logits_processor=[BoostToken(17)]),
        "combined": dict(no_repeat_ngram_size=3, repetition_penalty=1.3, min_new_tokens=2,
                         bad_words_ids=[[last, 7], [a, b], [21]], suppress_tokens=[22], begin_suppress_tokens=[EOS],
                         forced_eos_token_id=EOS, logits_processor=[BoostToken(23)]),
    }


def hf_kwargs(opts):
    kw = dict(opts)
    if "logits_processor" in kw:
        kw["logits_processor"] = transformers.LogitsProcessorList(kw["logits_processor"])
    return kw


NAMES = list(options(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64)))
BEAMS = [dict(num_beams=4, max_new_tokens=8, num_return_sequences=2, length_penalty=1.0, early_stopping=False),
         dict(num_beams=3, max_new_tokens=9, num_return_sequences=3, length_penalty=0.5, early_stopping=True)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beams", range(len(BEAMS)))
@pytest.mark.cuda_params(beams=[1])
def test_each_option_matches_transformers_on_padded_batches(device, name, beams):
    search = BEAMS[beams]
    model = tiny_gpt2(beams).to(device)
    ids, mask = (t.to(device) for t in left_padded(10 + beams, [5, 3, 7]))
    opts = options(ids, hf(model, ids, mask, **search).sequences)[name]
    search = {**search, **opts}
    want = hf(model, ids, mask, **hf_kwargs(search))
    plain = hf(model, ids, mask, **{k: v for k, v in search.items() if k in BEAMS[beams] or k == "max_new_tokens"})
    changed = want.sequences.shape != plain.sequences.shape or not torch.equal(want.sequences, plain.sequences) \
        or not torch.allclose(want.sequences_scores, plain.sequences_scores)
    assert changed, f"{name} does not change transformers' output here: the comparison would prove nothing"
    decoder = BeamSearchDecoder(eos_token_id=EOS, pad_token_id=EOS, **search)
    got = decoder.generate(masked_step(model, use_cache=False), ids, attention_mask=mask)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "combined", "penalty_up", "ngram2"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.cuda_params(seed=[0])
def test_kv_cache_and_padding_match_transformers(device, name, seed):
    model = tiny_gpt2(seed).to(device)
    ids, mask = (t.to(device) for t in left_padded(20 + seed, [6, 2, 4, 6]))
    search = dict(num_beams=5, max_new_tokens=10, num_return_sequences=2)
    opts = {} if name == "plain" else options(ids, hf(model, ids, mask, **search).sequences)[name]
    want = hf(model, ids, mask, use_cache=True, **search, **hf_kwargs(opts))
    decoder = BeamSearchDecoder(eos_token_id=EOS, pad_token_id=EOS, **search, **opts)
    got = decoder.generate(masked_step(model, use_cache=True), ids, attention_mask=mask)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
    # The same search without the cache gives the same answer.
    uncached = decoder.generate(masked_step(model, use_cache=False), ids, attention_mask=mask)
    assert torch.equal(uncached.sequences, got.sequences)


@pytest.mark.parametrize("name", ["ngram2", "penalty_up", "bad_words", "min_new", "forced_eos", "custom", "combined"])
def test_greedy_search_with_processors_matches_transformers(name):
    model = tiny_gpt2(3)
    ids, mask = left_padded(30, [4, 6, 5])
    search = dict(num_beams=1, max_new_tokens=8)
    search.update(options(ids, hf(model, ids, mask, **search).sequences)[name])
    want = hf(model, ids, mask, **hf_kwargs(search))
    got = BeamSearchDecoder(eos_token_id=EOS, pad_token_id=EOS, **search).generate(
        masked_step(model, use_cache=False), ids, attention_mask=mask)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)


def test_without_a_mask_the_three_argument_step_still_works():
    model = tiny_gpt2(0)
    ids = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    opts = dict(no_repeat_ngram_size=2, repetition_penalty=1.4)
    want = hf(model, ids, torch.ones_like(ids), num_beams=3, max_new_tokens=6, **opts)
    got = BeamSearchDecoder(3, 6, eos_token_id=EOS, pad_token_id=EOS, **opts).generate(plain_step(model), ids)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)


def test_bad_processor_arguments():
    for kw, match in [(dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
                      (dict(repetition_penalty=0.0), "repetition_penalty"),
                      (dict(min_new_tokens=1.5), "min_new_tokens"),
                      (dict(bad_words_ids=[]), "bad_words_ids"),
                      (dict(bad_words_ids=[[1, -2]]), "bad_words_ids"),
                      (dict(suppress_tokens=["a"]), "suppress_tokens"),
                      (dict(logits_processor=3), "logits_processor")]:
        with pytest.raises((ValueError, TypeError), match=match):
            BeamSearchDecoder(2, 4, eos_token_id=EOS, **kw)
    model = tiny_gpt2(0)
    ids, mask = left_padded(1, [3, 2])
    with pytest.raises(ValueError, match="vocabulary size"):
        BeamSearchDecoder(2, 3, eos_token_id=EOS, suppress_tokens=[VOCAB]).generate(
            masked_step(model, False), ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        BeamSearchDecoder(2, 3, eos_token_id=EOS).generate(masked_step(model, False), ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="only 0 and 1"):
        BeamSearchDecoder(2, 3, eos_token_id=EOS).generate(masked_step(model, False), ids, attention_mask=mask * 2)
