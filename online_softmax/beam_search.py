"""Beam search on the online softmax: the fused decode step, and a decoder built on it.

The step every beam-search decoder runs is

    scores = log_softmax(logits / T) + beam_scores[..., None]      # (batch, num_beams, vocab)
    scores, flat = scores.view(batch, -1).topk(num_candidates)
    beam_ids, token_ids = flat // vocab, flat % vocab

which writes and re-reads a (batch * num_beams, vocab) tensor of log-probabilities. The fused
step reads the logits once: each beam's online (max, sumexp) and its own top num_candidates come
out of one pass (a beam's score shifts all of its tokens equally, so the batch's best candidates
are among each beam's best), then the batch merges num_beams * num_candidates candidates.
"""

from typing import NamedTuple, Optional

import torch

from .decoding_rules import DecodingRules, apply_row_edits

_ops = torch.ops.online_softmax


class BeamStep(NamedTuple):
    scores: torch.Tensor     # (batch, num_candidates): beam score + token log-probability, descending
    token_ids: torch.Tensor  # (batch, num_candidates) int64
    beam_ids: torch.Tensor   # (batch, num_candidates) int64, in [0, num_beams)


def beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, *,
                     num_candidates: Optional[int] = None, temperature: float = 1.0,
                     banned_tokens: Optional[torch.Tensor] = None, penalized_tokens: Optional[torch.Tensor] = None,
                     repetition_penalty: float = 1.0) -> BeamStep:
    """One fused beam-search step. ``logits``: (batch * num_beams, vocab), beam-major within a
    batch entry; ``beam_scores``: (batch, num_beams). Returns the best ``num_candidates`` (default
    2 * num_beams) continuations per batch entry, sorted descending. Equal scores go to the lower
    ``beam * vocab + token`` among each beam's own best ``num_candidates`` log-probabilities (when
    adding the beam score rounds distinct log-probabilities to equal scores, a token that lost
    within its beam is not brought back). -inf logits score -inf.

    Edits after normalization, per row, as transformers' logits processors make them to the
    log-probabilities (so the normalizer still counts the edited tokens): ``penalized_tokens``
    (rows, n) int64 get ``lp * repetition_penalty`` where ``lp < 0``, else ``lp /
    repetition_penalty`` (``RepetitionPenaltyLogitsProcessor``); then ``banned_tokens`` (rows, n)
    int64 get -inf (n-gram blocking, bad words, minimum lengths, suppressed tokens). -1 pads a list;
    repeated ids count once. The logits are still read once: each row's top ``num_candidates + n``
    plus the edited tokens themselves hold its best ``num_candidates`` after the edits."""
    for name, t in (("logits", logits), ("beam_scores", beam_scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"online_softmax.beam_search_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("banned_tokens", banned_tokens), ("penalized_tokens", penalized_tokens)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"online_softmax.beam_search_step: {name} must be a torch.Tensor or None, got "
                            f"{type(t).__name__}")
    for name, v in (("num_beams", num_beams), ("num_candidates", num_candidates)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"online_softmax.beam_search_step: {name} must be an int, got {type(v).__name__}")
    if num_candidates is None:
        num_candidates = 2 * num_beams
    return BeamStep(*_ops.beam_search_step(logits, beam_scores, num_beams, num_candidates, float(temperature),
                                           banned_tokens, penalized_tokens, float(repetition_penalty)))


def unfused_beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, *,
                             num_candidates: Optional[int] = None, temperature: float = 1.0,
                             banned_tokens: Optional[torch.Tensor] = None,
                             penalized_tokens: Optional[torch.Tensor] = None,
                             repetition_penalty: float = 1.0) -> BeamStep:
    """The unfused torch sequence the fused step replaces (the reference and the benchmark peer)."""
    if num_candidates is None:
        num_candidates = 2 * num_beams
    batch, vocab = beam_scores.shape[0], logits.shape[-1]
    lp = torch.log_softmax(logits / temperature, dim=-1)
    if banned_tokens is not None or penalized_tokens is not None:
        lp = apply_row_edits(lp, banned_tokens, penalized_tokens, repetition_penalty)
    scores = lp.view(batch, num_beams, vocab) + beam_scores[..., None]
    top, flat = scores.view(batch, num_beams * vocab).topk(num_candidates, dim=-1)
    return BeamStep(top, flat % vocab, flat // vocab)


class BeamSearchOutput(NamedTuple):
    sequences: torch.Tensor        # (batch * num_return_sequences, prompt + generated), padded with pad_token_id
    sequences_scores: torch.Tensor  # (batch * num_return_sequences,) length-penalized sum of log-probs


class BeamSearchDecoder:
    """Beam search over any next-token model, with the fused :func:`beam_search_step` at its core.

    ``step_fn(input_ids, cache, beam_idx) -> (logits, cache)`` maps the running sequences
    (batch * num_beams, cur_len) to next-token logits (batch * num_beams, vocab). ``beam_idx`` is
    None on the first call, then the flat indices of the beams each new row continues, so a callable
    that keeps a cache can reorder it (``cache.reorder_cache(beam_idx)`` for a transformers cache,
    ``cache.index_select(0, beam_idx)`` for tensors). A callable without a cache can ignore both and
    return ``(logits, None)``. When :meth:`generate` is given an ``attention_mask`` (left-padded
    prompts), ``step_fn`` gets it as a fourth argument, extended by ones for the generated tokens:
    ``step_fn(input_ids, cache, beam_idx, attention_mask)``; position ids are
    ``(attention_mask.cumsum(-1) - 1).clamp_min(0)``, as generate() computes them
    (examples/beam_search_gpt2.py).

    The bookkeeping follows Hugging Face transformers' beam search (its vectorized form, 5.x):
    2 * num_beams candidates per step (so that num_beams stay open when some end in EOS); a
    candidate that ends in EOS among the top num_beams becomes a finished hypothesis with score
    sum_logprobs / generated_length ** length_penalty; ``early_stopping`` is True (stop a batch
    entry when num_beams hypotheses are finished), False (stop when no running beam can beat the
    worst finished one at the current length) or "never" (the same with the best possible length).
    ``generate`` returns the same sequences and scores as ``model.generate(num_beams=...,
    do_sample=False)`` with the same settings (see tests/test_beam_search_decoder.py).
    transformers ignores ``temperature`` without sampling, where this decoder applies it (leave it
    at 1.0 to match). With ``num_beams=1`` it runs greedy search, as transformers does.

    The processors take generate()'s keyword names and act where transformers' do, on the
    normalized log-probabilities in beam search (on the logits in greedy search):

    - fused (the logits are still read once per step, :func:`beam_search_step` edits):
      ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids`` (single- and multi-token),
      ``min_length``, ``min_new_tokens``, ``suppress_tokens``, ``begin_suppress_tokens``;
    - dense (the step's log-probabilities are materialized and every processor runs in
      transformers' order): ``forced_eos_token_id`` on its one step (the last), and every step
      when ``logits_processor`` is given: any callable ``(input_ids, scores) -> scores`` or a list
      of them (a transformers ``LogitsProcessorList`` works), run after the built-in ones as
      generate() runs a caller's processors;
    - greedy search (``num_beams=1``) with any processor runs the dense path on the logits.
    """

    def __init__(self, num_beams: int, max_new_tokens: int, *, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, length_penalty: float = 1.0,
                 early_stopping=False, num_return_sequences: int = 1, temperature: float = 1.0,
                 no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, min_length: int = 0,
                 min_new_tokens: int = 0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                 forced_eos_token_id=None, logits_processor=None):
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"BeamSearchDecoder: num_beams must be a positive int, got {num_beams!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"BeamSearchDecoder: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"BeamSearchDecoder: num_return_sequences must be in [1, num_beams], got "
                             f"{num_return_sequences}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"BeamSearchDecoder: early_stopping must be True, False or 'never', got {early_stopping!r}")
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.eos_token_id, self.length_penalty, self.early_stopping = eos_token_id, float(length_penalty), early_stopping
        # What finished beams are padded with, exactly as transformers computes it: a pad id of 0 (or
        # None) falls back to EOS, and without an EOS id the fill is -1.
        self.fill_token_id = (pad_token_id or eos_token_id) if eos_token_id is not None else -1
        # Greedy search (num_beams == 1) pads with the pad id itself, or EOS when there is none.
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.num_return_sequences, self.temperature = num_return_sequences, float(temperature)
        self.rules = DecodingRules(eos_token_id=eos_token_id, no_repeat_ngram_size=no_repeat_ngram_size,
                                   repetition_penalty=repetition_penalty, min_length=min_length,
                                   min_new_tokens=min_new_tokens, bad_words_ids=bad_words_ids,
                                   suppress_tokens=suppress_tokens, begin_suppress_tokens=begin_suppress_tokens,
                                   forced_eos_token_id=forced_eos_token_id, logits_processor=logits_processor)

    @staticmethod
    def _gather_beams(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        while idx.dim() < t.dim():
            idx = idx.unsqueeze(-1)
        return torch.take_along_dim(t, idx, dim=1)

    @staticmethod
    def _with_mask(step_fn, attention_mask: Optional[torch.Tensor], copies: int):
        """step_fn as (ids, cache, beam_idx) -> (logits, cache), extending the prompts' mask (one
        copy per beam) by ones for the generated tokens when there is one."""
        if attention_mask is None:
            return step_fn
        mask = attention_mask.to(torch.int64).repeat_interleave(copies, dim=0)

        def call(ids, cache, beam_idx):
            nonlocal mask
            if ids.shape[1] > mask.shape[1]:  # every beam of an entry shares its prompt's mask
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], ids.shape[1] - mask.shape[1])], 1)
            return step_fn(ids, cache, beam_idx, mask)
        return call

    def _greedy(self, step_fn, input_ids: torch.Tensor, pad_lengths: Optional[torch.Tensor]) -> BeamSearchOutput:
        """One beam is greedy search, as in transformers (early_stopping and length_penalty play no
        part): each row takes its best token until it emits EOS, then pads. The processors act on
        the logits, as transformers' greedy search runs them. The score is the sum of the generated
        tokens' log-probabilities after the processors (transformers reports none for greedy)."""
        batch, dev = input_ids.shape[0], input_ids.device
        prompt, max_length = input_ids.shape[1], input_ids.shape[1] + self.max_new_tokens
        seqs, cache, beam_idx = input_ids, None, None
        unfinished = torch.ones(batch, dtype=torch.bool, device=dev)
        score = torch.zeros(batch, device=dev)
        zeros = torch.zeros(batch, 1, device=dev)
        for _ in range(self.max_new_tokens):
            logits, cache = step_fn(seqs, cache, beam_idx)
            if seqs.shape[1] == prompt:
                self.rules.check_vocab(logits.shape[-1])
            if self.rules.any():
                edits = self.rules.edits(seqs, prompt, max_length, pad_lengths)
                scores = self.rules.dense(seqs, logits.float(), edits)
                tok = scores.argmax(-1)  # the first of equal maxima, as transformers takes
                lp = torch.log_softmax(scores / self.temperature, -1).gather(1, tok[:, None])[:, 0]
            else:
                step = beam_search_step(logits.float(), zeros, 1, num_candidates=1, temperature=self.temperature)
                tok, lp = step.token_ids[:, 0], step.scores[:, 0]
            if self.pad_token_id is not None:
                tok = torch.where(unfinished, tok, torch.full_like(tok, self.pad_token_id))
            score = score + torch.where(unfinished, lp, torch.zeros_like(lp))
            seqs = torch.cat([seqs, tok[:, None]], 1)
            beam_idx = torch.arange(batch, device=dev)
            if self.eos_token_id is not None:
                unfinished &= tok != self.eos_token_id
            if not bool(unfinished.any()):
                break
        return BeamSearchOutput(seqs, score)

    def _step(self, seqs: torch.Tensor, logits: torch.Tensor, running_scores: torch.Tensor, keep: int,
              prompt: int, max_length: int, pad_lengths: Optional[torch.Tensor]) -> BeamStep:
        """One step's candidates: fused when the processors allow it, else on materialized scores."""
        nb, rules = self.num_beams, self.rules
        if not rules.any():
            return beam_search_step(logits, running_scores, nb, num_candidates=keep, temperature=self.temperature)
        edits = rules.edits(seqs, prompt, max_length, pad_lengths)
        if rules.fusable(edits):
            return beam_search_step(logits, running_scores, nb, num_candidates=keep, temperature=self.temperature,
                                    banned_tokens=edits.banned(), penalized_tokens=edits.penalized,
                                    repetition_penalty=rules.penalty)
        batch, vocab = running_scores.shape[0], logits.shape[-1]
        processed = rules.dense(seqs, torch.log_softmax(logits / self.temperature, -1), edits)
        scores = (processed.view(batch, nb, vocab) + running_scores[..., None]).view(batch, nb * vocab)
        # The fused top-k's order (ties to the lower flat index) on the processed scores: the
        # log-softmax of a row keeps its order.
        flat = _ops.softmax_topk(scores, keep, -1, True, 1.0)[1]
        return BeamStep(scores.gather(1, flat), flat % vocab, flat // vocab)

    @torch.no_grad()
    def generate(self, step_fn, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> BeamSearchOutput:
        """Beam search from prompts ``input_ids`` (batch, prompt_len). Prompts of different lengths
        are left-padded, with ``attention_mask`` (batch, prompt_len) 1 on real tokens and 0 on
        padding; ``step_fn`` then receives the extended mask (see the class docstring)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError("BeamSearchDecoder.generate: input_ids must be an int64 tensor of shape (batch, prompt_len)")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError("BeamSearchDecoder.generate: attention_mask must be a tensor of input_ids' shape "
                                 f"{list(input_ids.shape)}")
            if attention_mask.device != input_ids.device or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("BeamSearchDecoder.generate: attention_mask must hold only 0 and 1, on input_ids' device")
        nb, dev = self.num_beams, input_ids.device
        batch, prompt = input_ids.shape
        max_length = prompt + self.max_new_tokens
        keep = 2 * nb  # max(2, 1 + number of EOS ids) * num_beams, with at most one EOS id
        top_mask = torch.arange(keep, device=dev) < nb
        NEG = -1.0e9
        step_fn = self._with_mask(step_fn, attention_mask, nb)
        # Left padding of every row (beam-major copies), which the repetition penalty skips.
        pad_lengths = None if attention_mask is None else \
            (attention_mask != 0).int().argmax(1).repeat_interleave(nb)

        if nb == 1:
            return self._greedy(step_fn, input_ids, pad_lengths)
        running = torch.full((batch, nb, max_length), self.fill_token_id, dtype=torch.int64, device=dev)
        running[:, :, :prompt] = input_ids[:, None, :]
        finished = running.clone()
        running_scores = torch.zeros(batch, nb, device=dev)
        running_scores[:, 1:] = NEG
        finished_scores = torch.full((batch, nb), NEG, device=dev)
        is_finished = torch.zeros(batch, nb, dtype=torch.bool, device=dev)
        improvable = torch.ones(batch, 1, dtype=torch.bool, device=dev)
        gen_len = torch.zeros(batch, nb, dtype=torch.int64, device=dev)          # finished hypotheses' lengths
        cache, beam_idx, cur_len = None, None, prompt
        while True:
            flat = running[:, :, :cur_len].reshape(batch * nb, cur_len)
            logits, cache = step_fn(flat, cache, beam_idx)
            if cur_len == prompt:
                self.rules.check_vocab(logits.shape[-1])
            step = self._step(flat, logits.float(), running_scores, keep, prompt, max_length, pad_lengths)
            cand_scores, cand_beams = step.scores, step.beam_ids
            cand_seqs = self._gather_beams(running, cand_beams)
            cand_seqs[:, :, cur_len] = step.token_ids
            hits = torch.zeros(batch, keep, dtype=torch.bool, device=dev)
            if self.eos_token_id is not None:
                hits |= step.token_ids == self.eos_token_id
            if cur_len + 1 >= max_length:
                hits[:] = True
            # Running beams for the next step: the best num_beams candidates that did not stop.
            open_scores = cand_scores + hits.float() * NEG
            next_idx = torch.topk(open_scores, k=nb)[1]
            new_running = self._gather_beams(cand_seqs, next_idx)
            new_running_scores = self._gather_beams(open_scores, next_idx)
            beam_idx = (self._gather_beams(cand_beams, next_idx) + torch.arange(batch, device=dev)[:, None] * nb).reshape(-1)
            # Finished hypotheses: candidates among the top num_beams that stopped, length-penalized.
            just_done = hits & top_mask[None, :]
            done_scores = cand_scores / float(cur_len + 1 - prompt) ** self.length_penalty
            full = is_finished.all(-1, keepdim=True) & (self.early_stopping is True)
            done_scores = done_scores + full.float() * NEG + (~improvable).float() * NEG + (~just_done).float() * NEG
            merged_seqs = torch.cat([finished, cand_seqs], 1)
            merged_scores = torch.cat([finished_scores, done_scores], 1)
            merged_done = torch.cat([is_finished, just_done], 1)
            merged_len = torch.cat([gen_len, torch.full_like(cand_beams, cur_len + 1 - prompt)], 1)
            best = torch.topk(merged_scores, k=nb)[1]
            finished, finished_scores = self._gather_beams(merged_seqs, best), self._gather_beams(merged_scores, best)
            is_finished, gen_len = self._gather_beams(merged_done, best), self._gather_beams(merged_len, best)
            running, running_scores = new_running, new_running_scores
            cur_len += 1
            # Can a running beam still beat the worst finished hypothesis?
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_len = max_length - prompt
            else:
                best_len = cur_len - prompt
            best_possible = running_scores[:, :1] / float(best_len) ** self.length_penalty
            worst_done = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], torch.full_like(best_possible, NEG))
            improvable = improvable & (best_possible > worst_done).any(-1, keepdim=True)
            keep_going = improvable.any() & ~(is_finished.all() & (self.early_stopping is True)) & ~hits.all()
            if not bool(keep_going):
                break
        r = self.num_return_sequences
        seqs = finished[:, :r].reshape(batch * r, max_length)
        scores = finished_scores[:, :r].reshape(batch * r)
        out_len = prompt + int(gen_len[:, :r].max().item())
        return BeamSearchOutput(seqs[:, :out_len], scores)
