"""generate()'s speculative modes for :func:`online_softmax.hf.generate`: an assistant model
(``assistant_model=``) or prompt lookup (``prompt_lookup_num_tokens=``), greedy or sampling, at any
batch size, left-padded prompts included.

    out = model.generate(ids, attention_mask=mask, assistant_model=small, do_sample=True,
                         custom_generate=online_softmax.hf.generate)

Each round a draft proposes up to n tokens per row: the assistant's greedy or sampled tokens (its
``num_assistant_tokens`` with the "constant" or "heuristic" schedule, stopping early at EOS or below
its ``assistant_confidence_threshold``, as transformers' ``AssistedCandidateGenerator`` drafts), or
the continuation of the row's latest n-gram found earlier in the row (as transformers'
``PromptLookupCandidateGenerator`` looks it up, row by row). The target scores the n + 1 positions
in one forward, generate()'s processors run densely on each position with that position's prefix,
and :func:`~online_softmax.rejection_sample` keeps each row's longest accepted prefix and draws one
more token: temperature 0 for greedy search (the target's arg-max, so greedy returns what generate()
returns without a draft), the sampling warpers fused into the op otherwise, so every emitted token
follows the target's warped distribution whatever the draft. The assistant's draft probabilities
are its own processed and warped distribution, as transformers computes q; prompt lookup's draft is
deterministic (q one-hot).

How every row keeps its own length
----------------------------------
A transformers cache holds one length for the whole batch, while each row accepts its own number of
drafts. Rejected drafts are therefore not cropped: they stay in the cache as *holes*. Their columns
of the attention mask become 0, so no later query attends to them, and positions are
``cumsum(mask) - 1`` as generate() computes them for left padding, so the next real token of a row
takes the position of its first rejected draft. Each model (the target, the assistant) is a stream
over the batch whose cache holds, for every row, a prefix of that row's sequence: the target every
token but the last (the first input of its next forward), the assistant every one but the last two
(its last draft was never fed, and the target's own token it has not seen). What a model has not
seen of a row is fed at the start of its next forward, right-aligned, with holes on the left for
rows that have less to catch up. A row is thus computed exactly as if decoded alone, up to the
rounding of masked-out keys; holes cost attention width (a cache grows by n + 1 columns a round,
whatever is accepted), never correctness.

The processors and stopping criteria see each row's compacted sequence (its prompt as given, left
padding included, then its tokens): what stock generate() hands them for that row. They are called
once per distinct sequence length with the whole batch (rows of other lengths ride along and their
results are dropped), so a processor that reads the sequence length (min_length) or a row's index in
the batch (``prefix_allowed_tokens_fn``) sees what it expects. Stopping criteria run after every
emitted token, so a row stops at the token where stock generate() would stop it; the output is
right-padded with ``pad_token_id``, as generate() pads rows finished by EOS. Without an EOS criterion
generate() keeps decoding finished rows until all have stopped, and so does this loop.

What differs from transformers' assisted generation: any batch size (transformers refuses more than
one row); the stopping criteria run token by token (transformers cuts a round's tokens at EOS and
max_length only) and receive ``scores=None``; the returned ``past_key_values`` is None (the cache
holds holes that only this loop's mask describes); with a batch the "heuristic" schedule runs per
row, and the value written back to the assistant's generation config is the largest row's; the
confidence threshold stays fixed (transformers adapts it when scikit-learn is installed). Not
supported, each with a ValueError: encoder-decoder targets or assistants, static, sliding-window and
linear-attention caches, ``use_cache=False``, a cache passed in with content, ``inputs_embeds``,
``output_attentions`` / ``output_hidden_states``, a streamer with more than one row,
``assistant_ensemble_weight``, and assistants with another vocabulary.
"""

import inspect
from typing import Optional

import torch

from .._checks import fail
from .sampling import sample
from .speculative import rejection_sample

_OP = "hf.generate"
_CACHE_NAMES = ("past_key_values", "cache_params")


def speculative_generate(model, input_ids, processors, stopping_criteria, config, streamer, assistant,
                         model_kwargs):
    """The loop behind ``hf.generate`` in generate()'s assisted-generation mode (an assistant model or
    prompt lookup): generate()'s return value, as its assisted decoding returns it."""
    _check_supported(model, input_ids, config, streamer, assistant, model_kwargs)
    loop = _Speculation(model, input_ids, processors, stopping_criteria, config, model_kwargs)
    if config.prompt_lookup_num_tokens is not None:  # transformers' order: prompt lookup before an assistant
        loop.source = _PromptLookup(config, processors)
    else:
        loop.source = _Assistant(loop, assistant, model_kwargs, processors)
    return loop.run(streamer)


def _check_supported(model, input_ids, config, streamer, assistant, model_kwargs):
    if model.config.is_encoder_decoder:
        raise fail(_OP, f"speculative decoding runs decoder-only models; {type(model).__name__} is an "
                        "encoder-decoder model: drop custom_generate to use transformers' own loop")
    if config.prompt_lookup_num_tokens is None and assistant is None:
        raise fail(_OP, "speculative decoding needs assistant_model or prompt_lookup_num_tokens")
    if assistant is not None and config.prompt_lookup_num_tokens is None:
        if assistant.config.is_encoder_decoder:
            raise fail(_OP, f"assistant_model: {type(assistant).__name__} is an encoder-decoder model; the "
                            "speculative loop drafts with decoder-only assistants")
        ours, theirs = model.config.get_text_config().vocab_size, assistant.config.get_text_config().vocab_size
        if ours != theirs:
            raise fail(_OP, f"assistant_model has a vocabulary of {theirs} tokens and the model {ours}: assistants "
                            "with another tokenizer are not supported")
    if getattr(config, "assistant_ensemble_weight", None) is not None:
        raise fail(_OP, "assistant_ensemble_weight (a verification that is not exact) is not supported")
    if not model_kwargs.get("use_cache"):
        raise fail(_OP, "speculative decoding needs use_cache=True")
    if model_kwargs.get("inputs_embeds") is not None:
        raise fail(_OP, "speculative decoding takes input_ids, not inputs_embeds")
    if config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states):
        raise fail(_OP, "output_attentions and output_hidden_states are not supported with speculative decoding "
                        "(the speculative loop's attention spans rejected drafts)")
    if streamer is not None and input_ids.shape[0] != 1:
        raise fail(_OP, f"a streamer with speculative decoding takes one row, got a batch of {input_ids.shape[0]}")
    cache = next((model_kwargs[k] for k in _CACHE_NAMES if model_kwargs.get(k) is not None), None)
    _check_cache(cache, "the model's")
    for m, name in ((model, "the model"), (assistant, "assistant_model")):
        if m is not None and "position_ids" not in inspect.signature(m.forward).parameters:
            raise fail(_OP, f"{name} ({type(m).__name__}) takes no position_ids: the speculative loop needs them "
                            "to skip rejected drafts")


def _check_cache(cache, whose):
    from transformers import DynamicCache

    if cache is None:
        raise fail(_OP, "speculative decoding needs a cache (use_cache=True)")
    if not isinstance(cache, DynamicCache):
        raise fail(_OP, f"{whose} cache is a {type(cache).__name__}: speculative decoding needs a dynamic cache "
                        "(static caches are refused, as transformers' assisted generation refuses them)")
    if any(cache.is_sliding) or any(cache.is_linear):
        raise fail(_OP, f"{whose} cache has sliding-window or linear-attention layers, which cannot keep rejected "
                        "drafts as masked holes")
    if cache.get_seq_length() > 0:
        raise fail(_OP, "speculative decoding starts from an empty cache; a cache passed in with content is "
                        "not supported")


def _as_list(processors):
    return list(processors) if processors is not None else []


def _apply(processors, ids, scores):
    for p in processors:
        scores = p(ids, scores)
    return scores


class _Stream:
    """One model's forwards over the batch. Its cache holds a prefix of every row's sequence (positions
    0..cached - 1, left padding as masked columns), and columns of rejected drafts as holes: ``mask``
    is the attention mask of the cache's columns and ``pos`` the sequence position each column holds
    (-1: a hole). ``keep_back`` is how many of a row's last tokens stay out of the cache when a round
    ends (they are the next forward's first inputs)."""

    def __init__(self, model, kwargs, keep_back, batch, device):
        self.model, self.kwargs, self.keep_back = model, kwargs, keep_back
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)
        self.pos = torch.zeros((batch, 0), dtype=torch.long, device=device)
        self.cached = torch.zeros(batch, dtype=torch.long, device=device)
        self.first = True

    def pending(self, seq, real, lens, rows, filler):
        """(ids, pos, mask) of what the rows in ``rows`` have not fed yet, right-aligned."""
        lens = torch.tensor(lens, device=seq.device)
        rows = torch.tensor(rows, dtype=torch.bool, device=seq.device)
        todo = torch.where(rows, lens - self.cached, 0)
        width = int(todo.max()) if todo.numel() else 0
        pos = lens[:, None] + torch.arange(-width, 0, device=seq.device)[None]
        take = rows[:, None] & (pos >= self.cached[:, None])
        at = pos.clamp_min(0)
        ids = torch.where(take, seq.gather(1, at), filler)
        return ids, torch.where(take, pos, -1), (take & real.gather(1, at)).long()

    def feed(self, ids, pos, mask, keep):
        """Run the model over new columns; the float32 logits of the last ``keep`` of them."""
        self.mask = torch.cat([self.mask, mask], 1)
        self.pos = torch.cat([self.pos, pos], 1)
        kw = self.kwargs
        kw["attention_mask"] = self.mask
        kw["position_ids"] = (self.mask.cumsum(-1) - 1).clamp_min(0)
        inputs = self.model.prepare_inputs_for_generation(ids, next_sequence_length=ids.shape[1],
                                                          is_first_iteration=self.first, **kw)
        if "logits_to_keep" in inputs:
            inputs["logits_to_keep"] = keep
        out = self.model(**inputs, return_dict=True)
        self.kwargs = self.model._update_model_kwargs_for_generation(out, kw, num_new_tokens=ids.shape[1])
        self.first = False
        return out.logits[:, -keep:].to(dtype=torch.float32, device=ids.device)

    def settle(self, lens):
        """A round is over and each row's sequence has ``lens[b]`` tokens: every column holding a
        position from ``lens[b] - keep_back`` on (rejected drafts, and the tokens fed again next
        round) becomes a hole."""
        cut = torch.tensor(lens, device=self.pos.device) - self.keep_back
        drop = self.pos >= cut[:, None]
        self.mask = self.mask.masked_fill(drop, 0)
        self.pos = self.pos.masked_fill(drop, -1)
        if self.pos.shape[1]:
            self.cached = self.pos.amax(-1).clamp_min(-1) + 1


class _Speculation:
    """The state of one speculative generate() call: each row's compacted sequence (``seq``, with
    ``lens``), whether it is finished, the target's stream, and the collected outputs."""

    def __init__(self, model, input_ids, processors, stopping_criteria, config, model_kwargs):
        from .hf import _split_warpers

        self.model, self.config = model, config
        self.processors, self.stopping = _as_list(processors), stopping_criteria
        batch, prompt = input_ids.shape
        device = input_ids.device
        self.batch, self.prompt = batch, prompt
        self.max_length = int(config.max_length)
        pad = config._pad_token_tensor
        self.pad_id = int(pad.reshape(-1)[0]) if pad is not None else 0
        self.seq = torch.full((batch, max(self.max_length, prompt)), self.pad_id, dtype=torch.long, device=device)
        self.seq[:, :prompt] = input_ids
        self.real = torch.ones_like(self.seq, dtype=torch.bool)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            self.real[:, :prompt] = mask.to(device).bool()
        self.lens = [prompt] * batch
        self.finished = [False] * batch
        self.finish_len: list = [None] * batch
        self.sampling = bool(config.do_sample)
        want = bool(config.return_dict_in_generate)
        self.want_scores, self.want_logits = want and bool(config.output_scores), want and bool(config.output_logits)
        if self.sampling and not self.want_scores:
            self.dense, self.warpers = _split_warpers(self.processors)
        else:  # greedy, or the processed scores are an output: every processor runs densely
            self.dense, self.warpers = list(self.processors), {}
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        eos = config._eos_token_tensor
        self.eos = set(eos.reshape(-1).tolist()) if eos is not None else set()
        self.target = _Stream(model, model_kwargs, 1, batch, device)
        self.scores = [[] for _ in range(batch)]
        self.logits = [[] for _ in range(batch)]
        self.source = None

    # ---- the loop ----

    def run(self, streamer):
        while True:
            need = self._need()
            if not any(need):
                break
            self._round(need, streamer)
        self._fill_finished_rows()
        self.source.finish()
        if streamer is not None:
            streamer.end()
        return self._result()

    def _need(self):
        """The rows this round decodes: the unfinished ones, and, without an EOS criterion (generate()
        then decodes finished rows on until every row stops), finished rows short of the final length."""
        if self.has_eos:
            return [not f for f in self.finished]
        final_at_least = max([n for n in self.finish_len if n is not None] +
                             [n + 1 for n, f in zip(self.lens, self.finished) if not f])
        return [not f or n < final_at_least for n, f in zip(self.lens, self.finished)]

    def _round(self, need, streamer):
        batch, device = self.batch, self.seq.device
        drafts, counts, draft_probs = self.source.propose(self, need)
        n = drafts.shape[1]
        ids, pos, mask = self.target.pending(self.seq, self.real, self.lens, need, self.pad_id)
        j = torch.arange(n, device=device)[None]
        lens = torch.tensor(self.lens, device=device)[:, None]
        has = j < torch.tensor(counts, device=device)[:, None]
        draft_pos = torch.where(has, lens + j, -1)
        draft_ids = torch.where(has, drafts, self.pad_id)
        logits = self.target.feed(torch.cat([ids, draft_ids], 1), torch.cat([pos, draft_pos], 1),
                                  torch.cat([mask, has.long()], 1), keep=n + 1)
        for b in range(batch):  # the drafts, as the prefixes of the positions after them
            self.seq[b, self.lens[b]:self.lens[b] + counts[b]] = drafts[b, :counts[b]]
        starts = [n0 if need_b else None for n0, need_b in zip(self.lens, need)]
        processed = self._process(self.dense, logits, starts, [c + 1 for c in counts])
        if self.sampling:
            verified = rejection_sample(processed, draft_ids, draft_probs,
                                        num_draft_tokens=torch.tensor(counts, device=device), **self.warpers)
        else:
            verified = rejection_sample(processed, draft_ids, None, num_draft_tokens=torch.tensor(counts, device=device),
                                        temperature=0.0)
        tokens, accepted = verified.token_ids.tolist(), verified.num_accepted.tolist()
        kept = [0] * batch
        for b in range(batch):
            if not need[b]:
                continue
            emitted = tokens[b][:accepted[b] + 1]
            if min(emitted) < 0:
                raise fail(_OP, "a row's processed scores hold no distribution (NaN, +inf, or every token -inf)")
            self.seq[b, self.lens[b]:self.lens[b] + len(emitted)] = torch.tensor(emitted, device=device)
            kept[b] = len(emitted)
        self._stop(need, kept)
        for b in range(batch):
            for i in range(kept[b]):
                if self.want_scores:
                    self.scores[b].append(processed[b, i].clone())
                if self.want_logits:
                    self.logits[b].append(logits[b, i].clone())
        if streamer is not None:
            streamer.put(self.seq[:, self.lens[0]:self.lens[0] + kept[0]].cpu())
        self.lens = [n0 + k for n0, k in zip(self.lens, kept)]
        self.target.settle(self.lens)
        self.source.settle(self, need, counts, kept)

    def _process(self, processors, raw, starts, counts):
        """The processors on raw (batch, k, vocab): position i of row b with the prefix of length
        starts[b] + i (rows whose start is None are left as they are). One call per prefix length."""
        out = raw.clone()
        if not processors:
            return out
        batch = raw.shape[0]
        by_length: dict = {}
        for b in range(batch):
            if starts[b] is not None:
                for i in range(counts[b]):
                    by_length.setdefault(starts[b] + i, []).append((b, i))
        rows_all = torch.arange(batch, device=raw.device)
        for length in sorted(by_length):
            rows, cols = (torch.tensor(v, device=raw.device) for v in zip(*by_length[length]))
            at = torch.zeros(batch, dtype=torch.long, device=raw.device)
            at[rows] = cols
            done = _apply(processors, self.seq[:, :length], raw[rows_all, at])
            out[rows, cols] = done[rows].to(out.dtype)
        return out

    def _stop(self, need, kept):
        """The stopping criteria after each emitted token of the unfinished rows: a row that stops
        keeps its tokens up to that one."""
        by_length: dict = {}
        for b in range(self.batch):
            if need[b] and not self.finished[b]:
                for k in range(1, kept[b] + 1):
                    by_length.setdefault(self.lens[b] + k, []).append(b)
        for length in sorted(by_length):
            rows = [b for b in by_length[length] if not self.finished[b]]
            if not rows:
                continue
            hit = self.stopping(self.seq[:, :length], None).tolist()
            for b in rows:
                if hit[b]:
                    self.finished[b], self.finish_len[b] = True, length
                    kept[b] = length - self.lens[b]

    def _fill_finished_rows(self):
        """generate() keeps scoring rows finished by EOS (their tokens are padding) until every row
        stops: their scores and logits from the finish on, in one forward with padding as input."""
        if not (self.has_eos and (self.want_scores or self.want_logits)):
            return
        final = max(self.finish_len)
        rows = [n < final for n in self.lens]
        if not any(rows):
            return
        device = self.seq.device
        for b in range(self.batch):
            self.seq[b, self.lens[b]:final] = self.pad_id
        counts = [final - n - 1 if r else 0 for n, r in zip(self.lens, rows)]
        width = max(counts)
        ids, pos, mask = self.target.pending(self.seq, self.real, self.lens, rows, self.pad_id)
        j = torch.arange(width, device=device)[None]
        has = j < torch.tensor(counts, device=device)[:, None]
        pad_pos = torch.where(has, torch.tensor(self.lens, device=device)[:, None] + j, -1)
        logits = self.target.feed(torch.cat([ids, torch.full_like(pad_pos, self.pad_id)], 1),
                                  torch.cat([pos, pad_pos], 1), torch.cat([mask, has.long()], 1), keep=width + 1)
        starts = [n if r else None for n, r in zip(self.lens, rows)]
        processed = self._process(self.dense, logits, starts, [c + 1 for c in counts]) if self.want_scores else None
        for b in range(self.batch):
            for i in range(counts[b] + 1 if rows[b] else 0):
                if self.want_scores:
                    self.scores[b].append(processed[b, i].clone())
                if self.want_logits:
                    self.logits[b].append(logits[b, i].clone())

    def _result(self):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        final = max(self.finish_len)
        sequences = self.seq[:, :final].clone()
        if self.has_eos:  # rows finished by EOS are padded, as generate() pads them
            for b, n in enumerate(self.finish_len):
                sequences[b, n:] = self.pad_id
        if not self.config.return_dict_in_generate:
            return sequences
        steps = final - self.prompt

        def per_step(records):
            return tuple(torch.stack([records[b][t] for b in range(self.batch)]) for t in range(steps))

        return GenerateDecoderOnlyOutput(sequences=sequences, scores=per_step(self.scores) if self.want_scores else None,
                                         logits=per_step(self.logits) if self.want_logits else None,
                                         attentions=None, hidden_states=None, past_key_values=None)


class _Assistant:
    """Drafts from an assistant model, as transformers' AssistedCandidateGenerator drafts: its greedy
    or sampled tokens under generate()'s processors (warpers included), up to each row's
    ``num_assistant_tokens`` (and the room left before max_length), stopping after EOS or a token the
    assistant gives less than ``assistant_confidence_threshold``."""

    def __init__(self, loop: _Speculation, assistant, model_kwargs, processors):
        from transformers import DynamicCache

        self.assistant = assistant
        gc = assistant.generation_config
        tokens = gc.num_assistant_tokens if gc.num_assistant_tokens is not None else 20  # transformers' defaults
        self.tokens = [int(tokens)] * loop.batch
        self.schedule = gc.num_assistant_tokens_schedule or "constant"
        threshold = gc.assistant_confidence_threshold
        self.threshold = 0.4 if threshold is None else float(threshold)
        self.processors = _as_list(processors)
        kwargs = {k: v for k, v in model_kwargs.items() if k not in _CACHE_NAMES + ("encoder_outputs",)}
        if "logits_to_keep" in kwargs and not assistant._supports_logits_to_keep():
            del kwargs["logits_to_keep"]
        kwargs["past_key_values"] = DynamicCache(config=assistant.config)
        _check_cache(kwargs["past_key_values"], "assistant_model's")
        kwargs["use_cache"] = True
        self.stream = _Stream(assistant, kwargs, 2, loop.batch, loop.seq.device)

    def propose(self, loop: _Speculation, need):
        """(drafts (batch, n), each row's count, draft probabilities (batch, n, vocab) or None)."""
        batch, device = loop.batch, loop.seq.device
        budget = [max(0, min(t, loop.max_length - n - 1)) if r else 0 for t, n, r in zip(self.tokens, loop.lens, need)]
        n = max(budget)
        drafts = torch.full((batch, n), loop.pad_id, dtype=torch.long, device=device)
        counts = [0] * batch
        if n == 0:
            return drafts, counts, None
        drafting = [m > 0 for m in budget]
        ids, pos, mask = self.stream.pending(loop.seq, loop.real, loop.lens, drafting, loop.pad_id)
        logits = self.stream.feed(ids, pos, mask, keep=1)
        probs_out = None
        for j in range(n):
            rows = [b for b in range(batch) if drafting[b] and j < budget[b]]
            if not rows:
                break
            starts = [loop.lens[b] + j if b in rows else None for b in range(batch)]
            scores = loop._process(self.processors, logits, starts, [1] * batch)[:, 0]
            probs = torch.softmax(scores, -1)
            token = sample(scores).token_ids[:, 0] if loop.sampling else scores.argmax(-1)
            chosen = token.tolist()
            confidence = probs.gather(1, token.clamp_min(0)[:, None])[:, 0].tolist()
            if loop.sampling:
                if probs_out is None:
                    probs_out = torch.zeros((batch, n, probs.shape[-1]), dtype=torch.float32, device=device)
                at = torch.tensor(rows, device=device)
                probs_out[at, j] = probs[at]
            for b in rows:
                if chosen[b] < 0:
                    raise fail(_OP, "the assistant's processed scores hold no distribution in a row")
                drafts[b, j] = chosen[b]
                loop.seq[b, loop.lens[b] + j] = chosen[b]
                counts[b] += 1
                if chosen[b] in loop.eos or (self.threshold > 0 and confidence[b] < self.threshold):
                    drafting[b] = False
            feed = [b for b in rows if drafting[b] and j + 1 < budget[b]]
            if not feed:
                break
            ids = torch.full((batch, 1), loop.pad_id, dtype=torch.long, device=device)
            pos = torch.full((batch, 1), -1, dtype=torch.long, device=device)
            for b in feed:
                ids[b, 0], pos[b, 0] = chosen[b], loop.lens[b] + j
            logits = self.stream.feed(ids, pos, (pos >= 0).long(), keep=1)
        # Rows stop early (EOS, low confidence): the target verifies only the columns some row drafted.
        width = max(counts)
        return drafts[:, :width], counts, None if probs_out is None else probs_out[:, :width]

    def settle(self, loop: _Speculation, need, counts, kept):
        self.stream.settle(loop.lens)
        if self.schedule in ("heuristic", "heuristic_transient"):
            # transformers' rule: two more drafts after a round that accepted all, one fewer otherwise
            for b in range(loop.batch):
                if need[b]:
                    self.tokens[b] = self.tokens[b] + 2 if kept[b] - 1 == counts[b] else max(1, self.tokens[b] - 1)

    def finish(self):
        if self.schedule == "heuristic":  # the next generate() call starts from it, as in transformers
            self.assistant.generation_config.num_assistant_tokens = max(self.tokens)


class _PromptLookup:
    """Drafts looked up in each row's own tokens, as transformers' PromptLookupCandidateGenerator
    looks them up for one row: the continuation of the first earlier occurrence of the row's last
    n-gram (the longest n first, up to ``max_matching_ngram_size``), cut before a token the
    processors forbid and before EOS."""

    def __init__(self, config, processors):
        self.num_tokens = int(config.prompt_lookup_num_tokens)
        self.ngram = int(config.max_matching_ngram_size or 2)
        if self.num_tokens <= 0 or self.ngram <= 0:
            raise fail(_OP, f"prompt_lookup_num_tokens ({self.num_tokens}) and max_matching_ngram_size "
                            f"({self.ngram}) must be positive")
        self.processors = _as_list(processors)

    def propose(self, loop: _Speculation, need):
        batch, device = loop.batch, loop.seq.device
        room = [loop.max_length - n - 1 if r else 0 for n, r in zip(loop.lens, need)]  # the target's token last
        first_real = loop.real.int().argmax(-1).tolist()
        size = [n - f for n, f in zip(loop.lens, first_real)]
        found: dict = {}
        todo = [b for b in range(batch) if room[b] > 0]
        for ngram in range(self.ngram, 0, -1):
            rows = [b for b in todo if ngram <= size[b] - 1]
            if not rows:
                continue
            starts = self._matches(loop, rows, first_real, ngram)
            tried = {b: 0 for b in rows}
            while tried:
                # Each row's next match: the continuation after it, up to the room before max_length
                # (drafts past it would be cut after verification; the filter keeps a prefix, so
                # cutting first finds the same drafts).
                chosen = {}
                for b in list(tried):
                    if tried[b] == len(starts[b]):
                        del tried[b]
                        continue
                    at = starts[b][tried[b]]
                    chosen[b] = loop.seq[b, at:min(at + self.num_tokens, loop.lens[b])].tolist()[:room[b]]
                    tried[b] += 1
                for b, allowed in self._allowed(loop, chosen).items():
                    if allowed:  # found: cut before EOS (even if that leaves nothing, as transformers)
                        eos_at = next((i for i, t in enumerate(allowed) if t in loop.eos), len(allowed))
                        found[b] = allowed[:eos_at]
                        del tried[b]
            todo = [b for b in todo if b not in found]
        counts = [len(found.get(b, ())) for b in range(batch)]
        drafts = torch.full((batch, max(counts)), loop.pad_id, dtype=torch.long, device=device)
        for b, f in found.items():
            if f:
                drafts[b, :len(f)] = torch.tensor(f, device=device)
        return drafts, counts, None

    def _matches(self, loop, rows, first_real, ngram):
        """For each row: the starts of the continuations of the earlier occurrences of its last
        ``ngram`` tokens (within its own tokens), in order."""
        device = loop.seq.device
        at = torch.tensor(rows, device=device)
        seq = loop.seq[at]
        lens = torch.tensor([loop.lens[b] for b in rows], device=device)
        first = torch.tensor([first_real[b] for b in rows], device=device)
        last = seq.gather(1, lens[:, None] - ngram + torch.arange(ngram, device=device)[None])
        windows = seq.unfold(1, ngram, 1)
        where = torch.arange(windows.shape[1], device=device)[None]
        hit = (windows == last[:, None]).all(-1) & (where >= first[:, None]) & (where + ngram < lens[:, None])
        return {b: (row.nonzero()[:, 0] + ngram).tolist() for b, row in zip(rows, hit)}

    def _allowed(self, loop, chosen):
        """Each row's candidates up to the first one the processors ban after the ones before it
        (the processors run on rows of ones, as transformers checks a candidate). The whole batch goes
        through the processors once per sequence length (a processor may hold per-row state of the
        batch's size), and each row reads its own."""
        if not self.processors or not chosen:
            return chosen
        device = loop.seq.device
        vocab_size = loop.model.config.get_text_config().vocab_size
        ones = torch.ones((loop.batch, vocab_size), device=device)
        kept = {b: len(c) for b, c in chosen.items()}
        for i in range(max(kept.values())):
            by_length: dict = {}
            for b, c in chosen.items():
                if i < kept[b]:
                    if i:  # the candidates before it, in the drafts' places (written over by the round)
                        loop.seq[b, loop.lens[b] + i - 1] = c[i - 1]
                    by_length.setdefault(loop.lens[b] + i, []).append(b)
            for length, rows in by_length.items():
                scores = _apply(self.processors, loop.seq[:, :length], ones)
                values = scores[torch.tensor(rows, device=device),
                                torch.tensor([chosen[b][i] for b in rows], device=device)].tolist()
                banned = (float("-inf"), torch.finfo(scores.dtype).min)
                for b, value in zip(rows, values):
                    if value in banned:
                        kept[b] = i
        return {b: c[:kept[b]] for b, c in chosen.items()}

    def settle(self, loop, need, counts, kept):
        pass

    def finish(self):
        pass
