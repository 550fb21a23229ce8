"""BeamSearchDecoder against Hugging Face transformers' generate(num_beams=..., do_sample=False) on a
small GPT-2 built from a config with random weights (nothing downloaded): same sequences, same
scores, on each device (the `device` fixture; the cuda cases for one seed)."""

import pytest
import torch

import online_softmax as osm
from online_softmax import BeamSearchDecoder

transformers = pytest.importorskip("transformers")

from testlib import EOS, tiny_gpt2  # noqa: E402


def hf_generate(model, input_ids, **kw):
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, use_cache=False,
                          eos_token_id=EOS, pad_token_id=EOS, return_dict_in_generate=True, output_scores=True, **kw)


def step_fn(model):
    def step(ids, cache, beam_idx):
        return model(ids).logits[:, -1, :], None
    return step


CASES = [
    dict(num_beams=4, max_new_tokens=8, length_penalty=1.0, early_stopping=False, num_return_sequences=1),
    dict(num_beams=3, max_new_tokens=10, length_penalty=0.0, early_stopping=True, num_return_sequences=3),
    dict(num_beams=5, max_new_tokens=7, length_penalty=2.0, early_stopping="never", num_return_sequences=2),
    dict(num_beams=2, max_new_tokens=6, length_penalty=1.0, early_stopping=True, num_return_sequences=2),
    dict(num_beams=8, max_new_tokens=12, length_penalty=-0.5, early_stopping=False, num_return_sequences=4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c['num_beams']}-lp{c['length_penalty']}-es{c['early_stopping']}")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.cuda_params(seed=[0])
def test_same_sequences_and_scores_as_transformers(device, case, seed):
    model = tiny_gpt2(seed).to(device)
    g = torch.Generator().manual_seed(100 + seed)
    input_ids = torch.randint(4, 48, (3, 5), generator=g).to(device)
    want = hf_generate(model, input_ids, **case)
    decoder = BeamSearchDecoder(case["num_beams"], case["max_new_tokens"], eos_token_id=EOS, pad_token_id=EOS,
                                length_penalty=case["length_penalty"], early_stopping=case["early_stopping"],
                                num_return_sequences=case["num_return_sequences"])
    got = decoder.generate(step_fn(model), input_ids)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)


def test_eos_paths_are_exercised():
    """The cases above must include hypotheses that end in EOS before max_new_tokens."""
    ended_early = 0
    for seed in (0, 1, 2):
        model = tiny_gpt2(seed)
        input_ids = torch.randint(4, 48, (3, 5), generator=torch.Generator().manual_seed(100 + seed))
        out = hf_generate(model, input_ids, num_beams=4, max_new_tokens=8)
        ended_early += int((out.sequences[:, 5:-1] == EOS).any())
    assert ended_early > 0


def test_cache_protocol_reorders_beams():
    """A step function with a cache sees beam_idx (the parent row of every new row) to reorder it."""
    model = tiny_gpt2(0)
    input_ids = torch.randint(4, 48, (2, 4), generator=torch.Generator().manual_seed(5))

    def cached_step(ids, cache, beam_idx):
        # The cache is the sequence so far; reordering it by beam_idx must reproduce ids[:, :-1].
        if cache is not None:
            assert torch.equal(cache.index_select(0, beam_idx), ids[:, :-1])
        return model(ids).logits[:, -1, :], ids.clone()

    decoder = BeamSearchDecoder(3, 6, eos_token_id=EOS)
    got = decoder.generate(cached_step, input_ids)
    want = decoder.generate(step_fn(model), input_ids)
    assert torch.equal(got.sequences, want.sequences)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_beams"):
        BeamSearchDecoder(0, 5)
    with pytest.raises(ValueError, match="num_return_sequences"):
        BeamSearchDecoder(2, 5, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchDecoder(2, 5, early_stopping="sometimes")
    with pytest.raises(TypeError, match="num_beams must be an int"):
        BeamSearchDecoder(2.0, 5)
    with pytest.raises(TypeError, match="input_ids must be an int64"):
        BeamSearchDecoder(2, 5).generate(lambda *a: None, torch.zeros(3))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        BeamSearchDecoder(2, 5).generate(lambda *a: None, torch.zeros(3, dtype=torch.int64))


def test_one_beam_is_greedy_search():
    """With num_beams=1, generate() runs greedy search: same tokens (it returns no beam scores)."""
    model = tiny_gpt2(1)
    input_ids = torch.randint(4, 48, (3, 5), generator=torch.Generator().manual_seed(9))
    want = hf_generate(model, input_ids, num_beams=1, max_new_tokens=6)
    got = BeamSearchDecoder(1, 6, eos_token_id=EOS).generate(step_fn(model), input_ids)
    # Greedy pads a finished row with pad_token_id (= EOS here); beam search does the same.
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("early_stopping,length_penalty", [("never", 2.0), (True, 1.0), ("never", 1.0)])
def test_one_beam_ignores_early_stopping_like_transformers(early_stopping, length_penalty):
    for seed in (0, 1, 2):
        model = tiny_gpt2(seed)
        input_ids = torch.randint(4, 48, (3, 5), generator=torch.Generator().manual_seed(seed))
        want = hf_generate(model, input_ids, num_beams=1, max_new_tokens=8, early_stopping=early_stopping,
                           length_penalty=length_penalty)
        got = BeamSearchDecoder(1, 8, eos_token_id=EOS, early_stopping=early_stopping,
                                length_penalty=length_penalty).generate(step_fn(model), input_ids)
        assert torch.equal(got.sequences, want.sequences)


def test_pad_zero_falls_back_to_eos_like_transformers():
    model = tiny_gpt2(0)
    input_ids = torch.randint(4, 48, (3, 5), generator=torch.Generator().manual_seed(100))
    want = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, use_cache=False,
                          num_beams=4, num_return_sequences=2, max_new_tokens=8, eos_token_id=EOS, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True)
    got = BeamSearchDecoder(4, 8, eos_token_id=EOS, pad_token_id=0, num_return_sequences=2).generate(
        step_fn(model), input_ids)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
