"""generate()'s speculative modes through model.generate(..., custom_generate=online_softmax.hf.generate):
an assistant model and prompt lookup, greedy and sampling, at batch 1 and 8 with left-padded prompts.
Tiny random GPT-2 and Llama targets built from configs, each with a 1-layer assistant of the same
vocabulary (the target's first layer, so that it guesses right often enough for drafts to be
accepted); nothing is downloaded.

Greedy search must give what generate() gives without a draft; sampling must emit tokens that follow
the target's warped distribution whatever the draft (chi-square over many rows of one batch)."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import online_softmax as osm  # noqa: E402
from online_softmax.decoding import hf as hf_module  # noqa: E402
from online_softmax.decoding import hf_speculative  # noqa: E402
from testlib import EOS, VOCAB, chi_square_counts_ok, next_token_probs, tiny_gpt2  # noqa: E402


def _one_layer_copy(target, config):
    """The target's first layer alone, with its embeddings and head: a cheap assistant that agrees
    with the target often."""
    assistant = type(target)(config).eval()
    assistant.load_state_dict(target.state_dict(), strict=False)  # the other layers' weights are left out
    return assistant


def gpt2_pair(seed):
    target = tiny_gpt2(seed)
    config = copy.deepcopy(target.config)
    config.n_layer = 1
    return target, _one_layer_copy(target, config)


def llama_pair(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True)
    target = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # EOS likely enough that some rows finish early
        target.model.embed_tokens.weight[EOS] *= 3
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    return target, _one_layer_copy(target, small)


PAIRS = {"gpt2": gpt2_pair, "llama": llama_pair}


def prompts(batch, seed=0, device="cpu"):
    """Left-padded prompts (lengths 2 to 8), each a short random motif repeated (so that prompt
    lookup finds n-grams), and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 3, 8, 5, 2, 7, 4, 6][:batch] if batch > 1 else [6]
    width = max(lengths)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        motif = torch.randint(4, VOCAB, (3,), generator=g)
        ids[row, width - n:] = motif.repeat(3)[:n]
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def drafting(kind, assistant):
    return dict(assistant_model=assistant) if kind == "assistant" else dict(prompt_lookup_num_tokens=3)


class CountCalls:
    """Counts a model's forward calls (a forward pre-hook)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def remove(self):
        self.handle.remove()


PROCESSORS = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[5], [7, 8]], min_new_tokens=4)


@pytest.mark.parametrize("family", list(PAIRS))
@pytest.mark.parametrize("kind", ["assistant", "lookup"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("processors", [False, True])
def test_greedy_gives_what_generate_gives_without_a_draft(family, kind, batch, processors):
    target, assistant = PAIRS[family](0)
    ids, mask = prompts(batch, seed=batch)
    kw = dict(attention_mask=mask, max_new_tokens=12, **(PROCESSORS if processors else {}))
    want = target.generate(ids, **kw)
    if processors:
        assert not torch.equal(want, target.generate(ids, attention_mask=mask, max_new_tokens=12)), "no effect"
    forwards = CountCalls(target)
    got = target.generate(ids, custom_generate=osm.hf.generate, **drafting(kind, assistant), **kw)
    forwards.remove()
    assert torch.equal(got, want), (got, want)
    if kind == "assistant" and not processors:
        # drafts were accepted: fewer target forwards than tokens
        assert forwards.calls < got.shape[1] - ids.shape[1]


def test_greedy_matches_transformers_assisted_generation_with_scores_and_logits():
    target, assistant = gpt2_pair(1)
    ids, _ = prompts(1, seed=3)
    kw = dict(max_new_tokens=10, return_dict_in_generate=True, output_scores=True, output_logits=True,
              repetition_penalty=1.2)
    want = target.generate(ids, assistant_model=assistant, **kw)
    got = target.generate(ids, assistant_model=assistant, custom_generate=osm.hf.generate, **kw)
    assert type(got) is type(want) is transformers.generation.utils.GenerateDecoderOnlyOutput
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        a, b = getattr(want, name), getattr(got, name)
        assert len(a) == len(b) == got.sequences.shape[1] - ids.shape[1]
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


def test_at_batch_1_each_model_reads_as_many_tokens_as_in_transformers():
    """The same work as transformers' assisted generation: as many forwards, over as many new
    tokens, for the target and for the assistant (which stops drafting early below its confidence
    threshold: the target verifies only what was drafted)."""
    target, assistant = gpt2_pair(13)
    ids, _ = prompts(1, seed=14)
    fed = []

    def record(name):
        def hook(module, args, kwargs):
            fed.append((name, kwargs["input_ids"].shape[1]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True)
             for name, m in (("target", target), ("assistant", assistant))]
    runs = []
    for custom in ({}, dict(custom_generate=osm.hf.generate)):
        fed.clear()
        out = target.generate(ids, assistant_model=assistant, max_new_tokens=16, **custom)
        runs.append((out, [n for name, n in fed if name == "target"], sum(n for name, n in fed if name == "assistant")))
    for h in hooks:
        h.remove()
    (want, target_theirs, assistant_theirs), (got, target_ours, assistant_ours) = runs
    assert torch.equal(got, want)
    assert target_ours == target_theirs and assistant_ours == assistant_theirs
    assert len(target_ours) < want.shape[1] - ids.shape[1]  # and drafts were accepted


@pytest.mark.parametrize("kind", ["assistant", "lookup"])
def test_a_batch_with_rows_finishing_at_different_steps_scores_as_generate(kind):
    target, assistant = llama_pair(2)
    ids, mask = prompts(8, seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=14, return_dict_in_generate=True, output_scores=True,
              output_logits=True, no_repeat_ngram_size=2)
    want = target.generate(ids, **kw)
    finished = (want.sequences[:, ids.shape[1]:] == EOS).any(1)
    assert 0 < int(finished.sum()) < 8, "the rows should finish at different steps"
    got = target.generate(ids, custom_generate=osm.hf.generate, **drafting(kind, assistant), **kw)
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):  # finished rows are scored on padding, as generate() scores them
        a, b = getattr(want, name), getattr(got, name)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-4)


def test_a_batch_row_equals_the_row_decoded_alone():
    target, assistant = gpt2_pair(3)
    ids, mask = prompts(8, seed=5)
    kw = dict(max_new_tokens=12, assistant_model=assistant, custom_generate=osm.hf.generate)
    batch = target.generate(ids, attention_mask=mask, **kw)
    for row in range(ids.shape[0]):
        alone = target.generate(ids[row:row + 1, mask[row].bool()], **kw)[0]
        new = batch[row, ids.shape[1]:]
        n = alone.shape[0] - int(mask[row].sum())
        assert torch.equal(new[:n], alone[-n:]) and bool((new[n:] == EOS).all()), (row, new, alone)


class StopOnRepeat(transformers.StoppingCriteria):
    """Stops a row once it repeats its last new token (no eos_token_id attribute: generate() goes on
    decoding the rows it stops, without padding)."""

    def __init__(self, prompt_length):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        repeat = input_ids[:, -1] == input_ids[:, -2]
        return repeat & (input_ids.shape[1] >= self.prompt_length + 2)


def test_stopping_criteria_token_by_token_and_rows_decoded_on_without_eos():
    torch.manual_seed(4)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    target = transformers.GPT2LMHeadModel(config).eval()
    small = copy.deepcopy(config)
    small.n_layer = 1
    assistant = _one_layer_copy(target, small)
    ids, mask = prompts(8, seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=16)
    plain = target.generate(ids, **kw)
    new = plain[:, ids.shape[1]:]
    stops = [next((i for i in range(1, new.shape[1]) if new[r, i] == new[r, i - 1]), None) for r in range(8)]
    assert None not in stops and len(set(stops)) > 1, "every row should stop, at different steps"
    sc = transformers.StoppingCriteriaList([StopOnRepeat(ids.shape[1])])
    want = target.generate(ids, stopping_criteria=sc, **kw)
    assert want.shape[1] == ids.shape[1] + max(stops) + 1  # the rows that stopped first went on
    for kind in ("assistant", "lookup"):
        got = target.generate(ids, stopping_criteria=sc, custom_generate=osm.hf.generate, **drafting(kind, assistant),
                              **kw)
        assert torch.equal(got, want), (kind, got, want)


@pytest.mark.parametrize("schedule", ["heuristic", "constant"])
def test_num_assistant_tokens_schedule_as_transformers(schedule):
    target, assistant = gpt2_pair(5)
    ids, _ = prompts(1, seed=7)
    finals = []
    for custom in ({}, dict(custom_generate=osm.hf.generate)):
        helper = copy.deepcopy(assistant)
        helper.generation_config.num_assistant_tokens = 3
        helper.generation_config.num_assistant_tokens_schedule = schedule
        target.generate(ids, assistant_model=helper, max_new_tokens=16, **custom)
        finals.append(helper.generation_config.num_assistant_tokens)
    assert finals[0] == finals[1]
    assert (finals[0] == 3) == (schedule == "constant")


def test_streamer_receives_the_same_tokens():
    target, assistant = gpt2_pair(6)
    ids, _ = prompts(1, seed=8)

    class Collect(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, value):
            self.got.append(value.reshape(-1).clone())

        def end(self):
            self.ended = True

    a, b = Collect(), Collect()
    want = target.generate(ids, max_new_tokens=8, streamer=a, assistant_model=assistant)
    got = target.generate(ids, max_new_tokens=8, streamer=b, assistant_model=assistant, custom_generate=osm.hf.generate)
    assert torch.equal(got, want) and a.ended and b.ended
    assert torch.cat(b.got).tolist() == torch.cat(a.got).tolist()  # the prompt, then the new tokens


# ---- sampling: the first new token's distribution, against the target's warped probabilities ----

SAMPLING = [dict(), dict(temperature=0.7, top_k=10), dict(top_p=0.8), dict(min_p=0.05, repetition_penalty=1.4)]
DRAWS = 3000


@pytest.mark.parametrize("kind", ["assistant", "lookup"])
@pytest.mark.parametrize("setting", range(len(SAMPLING)))
def test_sampling_follows_the_target_distribution_whatever_the_draft(monkeypatch, kind, setting):
    kw = SAMPLING[setting]
    target, assistant = gpt2_pair(7)
    assistant.generation_config.assistant_confidence_threshold = 0.0  # always draft num_assistant_tokens
    assistant.generation_config.num_assistant_tokens = 3
    # Prompt lookup drafts "40 19" for the first tokens. (transformers' lookup drops a candidate its
    # processors ban on a row of ones: top-p on equal scores bans the lowest token ids.)
    prompt = torch.tensor([[19, 27, 40, 19, 27]])
    probs = next_token_probs(target, prompt, kw)
    torch.manual_seed(setting)
    rounds = []

    def verify(*args, **kwargs):  # the loop's calls of the op, recorded
        out = osm.rejection_sample(*args, **kwargs)
        rounds.append((kwargs["num_draft_tokens"], out.num_accepted))
        return out

    monkeypatch.setattr(hf_speculative, "rejection_sample", verify)
    rows = prompt.expand(DRAWS, -1)
    out = target.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, max_new_tokens=3,
                          custom_generate=osm.hf.generate, **drafting(kind, assistant), **kw)
    drafts, accepted = rounds[0]
    assert bool((drafts >= 1).all()), "every row's first token was drafted"
    if kind == "lookup":  # a one-hot draft x is accepted with probability p(x)
        p, hits = float(probs[40]), int(accepted.gt(0).sum())
        assert abs(hits - DRAWS * p) <= 5 * math.sqrt(DRAWS * p * (1 - p)) + 1, (hits, DRAWS * p)
    tokens = out[:, prompt.shape[1]]
    assert bool((probs[tokens] > 0).all()), "emitted a token outside the target's warped distribution"
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    ok, stat, limit = chi_square_counts_ok(counts, probs, DRAWS)
    assert ok, (stat, limit)


def test_seeded_speculative_sampling_reproduces():
    target, assistant = gpt2_pair(8)
    ids, mask = prompts(8, seed=9)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(target.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=8,
                                    assistant_model=assistant, custom_generate=osm.hf.generate))
    assert torch.equal(runs[0], runs[1])


# ---- reading generate()'s frame ----

def test_generate_keeps_assistant_model_in_its_frame_and_does_not_forward_it():
    """Pins what hf.generate relies on: a callable custom_generate is not handed assistant_model, and
    generate() holds it in a local of that name while calling it. Fails the day transformers changes
    either (then hf.generate must take the assistant from where transformers puts it)."""
    target, assistant = gpt2_pair(9)
    seen = {}

    def probe(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        seen["forwarded"] = "assistant_model" in kwargs
        seen["assistant"] = hf_module._given_to_generate("assistant_model")
        seen["streamer"] = hf_module._given_to_generate("streamer")
        return input_ids

    ids, _ = prompts(1)
    target.generate(ids, assistant_model=assistant, max_new_tokens=2, custom_generate=probe)
    assert seen == {"forwarded": False, "assistant": assistant, "streamer": None}


# ---- the compiled forward ----

def test_the_model_itself_as_transformers_assisted_generation_calls_it(monkeypatch):
    """transformers 5.23's assisted generation never runs the compiled forward: it calls the target
    itself, drafts with a dynamic cache, and refuses the static caches that make generate() compile.
    The speculative loop does the same, with a compile_config given as well."""
    target, assistant = gpt2_pair(12)
    ids, _ = prompts(1, seed=13)
    config = transformers.CompileConfig(backend="eager", mode="default")
    config._compile_all_devices = True  # what makes generate() compile on a CPU, given a static cache
    asked = []
    for m in (target, assistant):
        monkeypatch.setattr(m, "get_compiled_call", lambda compile_config, m=m: asked.append(m) or m.__call__)
    kw = dict(assistant_model=assistant, max_new_tokens=6, compile_config=config)
    want = target.generate(ids, **kw)
    got = target.generate(ids, custom_generate=osm.hf.generate, **kw)
    assert torch.equal(got, want) and asked == []
    for custom in ({}, dict(custom_generate=osm.hf.generate)):
        with pytest.raises(ValueError, match="[Ss]tatic"):
            target.generate(ids, cache_implementation="static", **kw, **custom)


# ---- what is refused ----

def test_refusals_name_the_argument():
    target, assistant = gpt2_pair(10)
    ids, mask = prompts(2)
    kw = dict(attention_mask=mask, max_new_tokens=4, custom_generate=osm.hf.generate)
    with pytest.raises(ValueError, match="static"):
        target.generate(ids, assistant_model=assistant, cache_implementation="static", **kw)
    with pytest.raises(ValueError, match="output_attentions"):
        target.generate(ids, assistant_model=assistant, return_dict_in_generate=True, output_attentions=True, **kw)
    class Ignore(transformers.generation.streamers.BaseStreamer):
        def put(self, value):
            pass

    with pytest.raises(ValueError, match="streamer"):
        target.generate(ids, assistant_model=assistant, streamer=Ignore(), **kw)
    with pytest.raises(ValueError, match="use_cache"):
        target.generate(ids, assistant_model=assistant, use_cache=False, **kw)
    other = copy.deepcopy(assistant.config)
    other.vocab_size = VOCAB + 16
    with pytest.raises(ValueError, match="vocabulary"):
        target.generate(ids, assistant_model=transformers.GPT2LMHeadModel(other).eval(), **kw)
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0,
        eos_token_id=EOS, pad_token_id=0)).eval()
    with pytest.raises(ValueError, match="encoder-decoder"):
        t5.generate(ids, prompt_lookup_num_tokens=2, **kw)


# ---- on each device ----

def test_greedy_and_sampling_on_each_device(device):
    target, assistant = gpt2_pair(11)
    target, assistant = target.to(device), assistant.to(device)
    ids, mask = prompts(8, seed=12, device=device)
    want = target.generate(ids, attention_mask=mask, max_new_tokens=10)
    got = target.generate(ids, attention_mask=mask, max_new_tokens=10, assistant_model=assistant,
                          custom_generate=osm.hf.generate)
    assert torch.equal(got, want)
    torch.manual_seed(0)
    drawn = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9,
                            prompt_lookup_num_tokens=3, custom_generate=osm.hf.generate)
    assert drawn.shape[0] == ids.shape[0] and torch.equal(drawn[:, :ids.shape[1]], ids)
