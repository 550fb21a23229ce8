"""model.generate(..., custom_generate=online_softmax.hf.generate) against transformers' own
generate() with the same arguments: tiny random GPT-2, Llama, T5 and BART built from configs, on each
device (the `device` fixture: the model and the prompts moved to the device, both generate() calls
there; the cuda cases of the longest products for two families)."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import online_softmax as osm  # noqa: E402
from online_softmax.decoding import hf as decoding_hf  # noqa: E402
from testlib import EOS, chi_square_counts_ok, next_token_probs, tiny_gpt2  # noqa: E402

VOCAB = 64
# Per family, what makes EOS likely enough that some hypotheses finish within 8 tokens (and
# min_new_tokens has something to ban) without ending every one at once.
EOS_BOOST = {"llama": 10.0, "t5": 4.0, "bart": 6.5}


def tiny_llama(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= EOS_BOOST["llama"]
    return model


def tiny_t5(seed):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                decoder_start_token_id=0, eos_token_id=EOS, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= EOS_BOOST["t5"]
    return model


def tiny_bart(seed):
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS,
                                  pad_token_id=0, decoder_start_token_id=2, forced_bos_token_id=None,
                                  forced_eos_token_id=None)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= EOS_BOOST["bart"]
    return model


MODELS = {"gpt2": lambda s: tiny_gpt2(s), "llama": tiny_llama, "t5": tiny_t5, "bart": tiny_bart}


def prompts(seed, lengths=(5, 3, 6), device="cpu"):
    """Left-padded prompts of different lengths and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 0, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(4, 40, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def both(model, ids, mask, **kw):
    kw.setdefault("max_new_tokens", 8)
    want = model.generate(ids, attention_mask=mask, **kw)
    got = model.generate(ids, attention_mask=mask, custom_generate=osm.hf.generate, **kw)
    return want, got


def assert_same(want, got):
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), (got, want)
        return
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    for name in ("sequences_scores", "beam_indices"):
        a, b = getattr(want, name, None), getattr(got, name, None)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for name in ("scores", "logits"):
        a, b = getattr(want, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert len(a) == len(b)
            for x, y in zip(a, b):
                torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


# Each setting must change transformers' own beam-search output on these prompts (checked below).
PROCESSORS = {
    "repetition_penalty": dict(repetition_penalty=4.0),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
    "bad_words_ids": None,            # aimed at the tokens the plain search picks (see _aimed)
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": dict(min_new_tokens=6),
    "min_length": None,               # the decoder prompt's length + 6 (see _aimed)
    "combined": None,
}


def _aimed(name, plain, prompt_len, pad_id):
    """Settings aimed at what the plain search generated, so that they change it."""
    gen = plain[:, prompt_len:]
    real = gen[(gen != EOS) & (gen != pad_id)]
    common = int(real.mode().values) if real.numel() else 5
    first = [int(t) for t in gen[:, 0] if int(t) not in (EOS, pad_id)] or [common]
    pair = next(([int(a), int(b)] for row in gen for a, b in zip(row[:-1], row[1:])
                 if int(a) not in (EOS, pad_id) and int(b) not in (EOS, pad_id)), [common, common])
    if name == "bad_words_ids":
        return dict(bad_words_ids=[[common], pair])
    if name == "suppress_tokens":
        return dict(suppress_tokens=[common])
    if name == "begin_suppress_tokens":
        return dict(begin_suppress_tokens=sorted(set(first)))
    if name == "min_length":
        return dict(min_length=prompt_len + 6)
    if name == "combined":
        return dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3, suppress_tokens=[common],
                    bad_words_ids=[pair])
    return PROCESSORS[name]


def _decoder_prompt_len(model, ids):
    return 1 if model.config.is_encoder_decoder else ids.shape[1]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.cuda_params(family=["gpt2", "t5"])
def test_each_processor_matches_transformers(device, family, num_beams, name):
    model = MODELS[family](0).to(device)
    ids, mask = prompts(1, device=device)
    plain = model.generate(ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=8)
    setting = _aimed(name, plain, _decoder_prompt_len(model, ids), model.generation_config.pad_token_id)
    want, got = both(model, ids, mask, num_beams=num_beams, **setting)
    assert want.shape != plain.shape or not torch.equal(want, plain), f"{name} changes nothing here"
    assert_same(want, got)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.cuda_params(family=["llama", "bart"])
def test_beam_search_outputs_and_stopping(device, family, early_stopping):
    model = MODELS[family](1).to(device)
    ids, mask = prompts(2, device=device)
    want, got = both(model, ids, mask, num_beams=4, num_return_sequences=2, early_stopping=early_stopping,
                     length_penalty=0.7, max_new_tokens=10, return_dict_in_generate=True, output_scores=True,
                     output_logits=True)
    assert_same(want, got)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_without_cache_and_with_the_fused_path_and_logits(device, family, num_beams):
    model = MODELS[family](2).to(device)
    ids, mask = prompts(3, device=device)
    want, got = both(model, ids, mask, num_beams=num_beams, use_cache=False, repetition_penalty=1.2,
                     return_dict_in_generate=True, output_logits=True)
    assert_same(want, got)


def test_attentions_and_hidden_states_as_transformers_returns_them(device):
    model = tiny_gpt2(3).to(device)
    ids, mask = prompts(4, device=device)
    want, got = both(model, ids, mask, num_beams=2, return_dict_in_generate=True, output_attentions=True,
                     output_hidden_states=True, max_new_tokens=4)
    assert len(got.attentions) == len(want.attentions) and len(got.hidden_states) == len(want.hidden_states)
    for a, b in zip(want.hidden_states, got.hidden_states):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x)


class BanToken(transformers.LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


class StopAfter(transformers.StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool,
                          device=input_ids.device)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_user_processor_and_stopping_criteria(device, num_beams):
    model = tiny_gpt2(4).to(device)
    ids, mask = prompts(5, device=device)
    plain = model.generate(ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=8)
    ban = int(plain[0, ids.shape[1]])
    lp = transformers.LogitsProcessorList([BanToken(ban)])
    sc = transformers.StoppingCriteriaList([StopAfter(ids.shape[1] + 5)])
    want, got = both(model, ids, mask, num_beams=num_beams, logits_processor=lp, stopping_criteria=sc,
                     repetition_penalty=1.2)
    assert want.shape[1] <= ids.shape[1] + 5 and not torch.equal(want[:, :plain.shape[1]], plain[:, :want.shape[1]])
    assert_same(want, got)


def test_greedy_streamer_receives_the_same_tokens(device):
    model = tiny_gpt2(5).to(device)
    ids = torch.randint(4, 40, (1, 4), generator=torch.Generator().manual_seed(6)).to(device)

    class Collect(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, value):
            self.got.append(value.clone())

        def end(self):
            self.ended = True

    a, b = Collect(), Collect()
    want = model.generate(ids, max_new_tokens=6, streamer=a)
    got = model.generate(ids, max_new_tokens=6, streamer=b, custom_generate=osm.hf.generate)
    assert torch.equal(got, want) and a.ended and b.ended
    assert [t.tolist() for t in b.got] == [t.tolist() for t in a.got]


def test_unsupported_modes_raise_naming_the_mode():
    model = tiny_gpt2(6)
    ids, mask = prompts(7)
    # Speculative decoding runs (tests/decoding/test_hf_speculative.py) with an assistant model or
    # prompt lookup; the drafts from the model itself do not.
    with pytest.raises(ValueError, match="assistant_early_exit.*drop custom_generate"):
        model.generate(ids, attention_mask=mask, assistant_early_exit=1, max_new_tokens=4,
                       custom_generate=osm.hf.generate)
    with pytest.raises(ValueError, match="drop custom_generate"):
        model.generate(ids, attention_mask=mask, num_beams=4, num_beam_groups=2, diversity_penalty=1.0,
                       max_new_tokens=4, custom_generate=osm.hf.generate)


# ---- sampling: the first new token's distribution, against transformers' warped probabilities ----

SAMPLING = [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
            dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02), dict(repetition_penalty=1.5, top_k=10)]
DRAWS = 4000


@pytest.mark.parametrize("setting", range(len(SAMPLING)))
def test_sampling_follows_transformers_warped_distribution(device, setting):
    kw = SAMPLING[setting]
    model = tiny_llama(7).to(device)  # vocabulary 64 > generate()'s default top_k of 50, which therefore applies
    ids = torch.tensor([[1, 9, 17, 9, 30]], device=device)
    probs = next_token_probs(model, ids, kw)
    torch.manual_seed(setting)
    out = model.generate(ids.expand(DRAWS, -1), do_sample=True, max_new_tokens=1, custom_generate=osm.hf.generate,
                         **kw)
    tokens = out[:, -1]
    assert bool((probs[tokens] > 0).all()), "drew a token outside the warped distribution's support"
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    ok, stat, limit = chi_square_counts_ok(counts, probs, DRAWS)
    assert ok, (stat, limit)


def test_seeded_sampling_reproduces(device):
    model = tiny_gpt2(8).to(device)
    ids, mask = prompts(9, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=6,
                                   custom_generate=osm.hf.generate))
    assert torch.equal(runs[0], runs[1])


def test_beam_sampling_runs_with_transformers_bookkeeping(device):
    model = tiny_gpt2(10).to(device)
    ids, mask = prompts(11, device=device)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, do_sample=True, num_beams=3, max_new_tokens=6,
                         return_dict_in_generate=True, output_scores=True, custom_generate=osm.hf.generate)
    assert out.sequences.shape[0] == ids.shape[0] and out.beam_indices is not None
    # Each sequence's score is the length-penalized sum of its steps' processed log-probabilities.
    assert bool(torch.isfinite(out.sequences_scores).all())


def test_import_does_not_need_transformers():
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] == 'transformers': raise ImportError('no transformers')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import online_softmax, online_softmax.hf\n"
            "assert 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _forbid(monkeypatch, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was not expected to run")
    monkeypatch.setattr(decoding_hf, name, fail)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_sparse_processors_take_the_fused_step(device, monkeypatch, family):
    model = MODELS[family](0).to(device)
    ids, mask = prompts(1, device=device)
    kw = dict(num_beams=3, max_new_tokens=8, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3,
              min_length=9, suppress_tokens=[5], bad_words_ids=[[7], [8, 9]], begin_suppress_tokens=[6])
    want = model.generate(ids, attention_mask=mask, **kw)
    _forbid(monkeypatch, "_dense_step")
    got = model.generate(ids, attention_mask=mask, custom_generate=osm.hf.generate, **kw)
    assert torch.equal(got, want)


def test_other_processors_and_output_scores_take_the_dense_step(device, monkeypatch):
    model = tiny_gpt2(0).to(device)
    ids, mask = prompts(1, device=device)
    _forbid(monkeypatch, "_fused_step")
    lp = transformers.LogitsProcessorList([BanToken(5)])
    for kw in (dict(logits_processor=lp), dict(forced_eos_token_id=EOS),
               dict(return_dict_in_generate=True, output_scores=True)):
        want, got = both(model, ids, mask, num_beams=3, **kw)
        assert_same(want, got)


# ---- the compiled forward, where generate() uses it ----

def compile_setting():
    """What makes generate() compile on a CPU: a static cache, and a compile_config told to compile
    on any device. The eager backend traces with dynamo but generates no code, which keeps it fast."""
    config = transformers.CompileConfig(backend="eager", mode="default")
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


class CompiledCalls:
    """Counts the calls of the compiled forward that model.get_compiled_call hands out."""

    def __init__(self, monkeypatch, model):
        self.calls = 0
        real = model.get_compiled_call

        def get_compiled_call(compile_config):
            compiled = real(compile_config)

            def counted(*args, **kwargs):
                self.calls += 1
                return compiled(*args, **kwargs)
            return counted

        monkeypatch.setattr(model, "get_compiled_call", get_compiled_call)


COMPILE_MODES = {"greedy search": dict(repetition_penalty=1.2), "sampling": dict(do_sample=True, top_k=10),
                 "beam search": dict(num_beams=3)}


@pytest.mark.parametrize("mode", list(COMPILE_MODES))
def test_the_compiled_forward_exactly_where_generate_uses_it(monkeypatch, mode):
    """transformers 5.23 runs _sample's decode steps (greedy search and sampling) through the model's
    compiled forward when its criteria hold; its beam search always calls the model itself."""
    model = tiny_gpt2(12)
    ids, mask = prompts(13)
    kw = dict(attention_mask=mask, max_new_tokens=5, **COMPILE_MODES[mode])
    ours = CompiledCalls(monkeypatch, model)
    torch.manual_seed(0)
    got = model.generate(ids, custom_generate=osm.hf.generate, **compile_setting(), **kw)
    assert (ours.calls > 0) == (mode != "beam search") == hasattr(model, "_compiled_call"), ours.calls
    theirs = CompiledCalls(monkeypatch, model)
    want = model.generate(ids, **compile_setting(), **kw)
    assert (theirs.calls > 0) == (ours.calls > 0)
    if mode == "sampling":  # our draws, with and without the compiled forward
        torch.manual_seed(0)
        want = model.generate(ids, custom_generate=osm.hf.generate, cache_implementation="static", **kw)
    assert torch.equal(got, want)
