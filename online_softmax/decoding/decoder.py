"""Beam search (and greedy search) over any next-token model, built on the fused decode step."""

from typing import NamedTuple, Optional

import torch

from .. import _checks as checks
from .beam_search import BeamStep, beam_search_step
from .rules import DecodingRules

_ops = torch.ops.online_softmax


class BeamSearchOutput(NamedTuple):
    """What :meth:`BeamSearchDecoder.generate` returns: the best ``num_return_sequences`` sequences
    of each batch entry (best first) and their scores."""

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
    do_sample=False)`` with the same settings (see tests/decoding/test_beam_search_decoder.py).
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
        op = "BeamSearchDecoder"
        checks.positive_int(num_beams, "num_beams", op)
        checks.positive_int(max_new_tokens, "max_new_tokens", op)
        checks.positive_int(num_return_sequences, "num_return_sequences", op)
        if num_return_sequences > num_beams:
            raise checks.fail(op, f"num_return_sequences must be in [1, num_beams], got {num_return_sequences}")
        if early_stopping not in (True, False, "never"):
            raise checks.fail(op, f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        length_penalty = checks.real(length_penalty, "length_penalty", op)
        temperature = checks.temperature(temperature, op)
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.eos_token_id, self.length_penalty, self.early_stopping = eos_token_id, length_penalty, early_stopping
        # What finished beams are padded with, exactly as transformers computes it: a pad id of 0 (or
        # None) falls back to EOS, and without an EOS id the fill is -1.
        self.fill_token_id = (pad_token_id or eos_token_id) if eos_token_id is not None else -1
        # Greedy search (num_beams == 1) pads with the pad id itself, or EOS when there is none.
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.num_return_sequences, self.temperature = num_return_sequences, temperature
        self.rules = DecodingRules(eos_token_id=eos_token_id, no_repeat_ngram_size=no_repeat_ngram_size,
                                   repetition_penalty=repetition_penalty, min_length=min_length,
                                   min_new_tokens=min_new_tokens, bad_words_ids=bad_words_ids,
                                   suppress_tokens=suppress_tokens, begin_suppress_tokens=begin_suppress_tokens,
                                   forced_eos_token_id=forced_eos_token_id, logits_processor=logits_processor)

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
        _check_prompts(input_ids, attention_mask)
        nb = self.num_beams
        step_fn = self._with_mask(step_fn, attention_mask, nb)
        # Left padding of every row (beam-major copies), which the repetition penalty skips.
        pad_lengths = None if attention_mask is None else \
            (attention_mask != 0).int().argmax(1).repeat_interleave(nb)
        if nb == 1:
            return self._greedy(step_fn, input_ids, pad_lengths)
        beams = Beams(input_ids, nb, input_ids.shape[1] + self.max_new_tokens, self.fill_token_id,
                      self.length_penalty, self.early_stopping)
        cache, beam_idx = None, None
        while True:
            flat = beams.running_sequences()
            logits, cache = step_fn(flat, cache, beam_idx)
            if beams.cur_len == beams.prompt:
                self.rules.check_vocab(logits.shape[-1])
            step = self._step(flat, logits.float(), beams.running_scores, beams.keep, beams.prompt, beams.max_length,
                              pad_lengths)
            candidates = beams.candidates(step)
            hits = torch.zeros_like(step.token_ids, dtype=torch.bool)
            if self.eos_token_id is not None:
                hits |= step.token_ids == self.eos_token_id
            if beams.cur_len + 1 >= beams.max_length:
                hits[:] = True
            beam_idx = beams.advance(step, candidates, hits)
            if not beams.keep_going():
                break
        return beams.best(self.num_return_sequences)[0]


def _check_prompts(input_ids, attention_mask) -> None:
    op = "BeamSearchDecoder.generate"
    checks.tensor(input_ids, "input_ids", op)
    if input_ids.dtype != torch.int64:
        raise checks.fail(op, f"input_ids must be an int64 tensor, got {input_ids.dtype}", TypeError)
    if input_ids.dim() != 2:
        raise checks.fail(op, f"input_ids must have shape (batch, prompt_len), got {list(input_ids.shape)}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise checks.fail(op, f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}")
    if attention_mask.device != input_ids.device or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise checks.fail(op, "attention_mask must hold only 0 and 1, on input_ids' device")


def _gather_beams(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


class Beams:
    """The running and finished hypotheses of every batch entry, kept as transformers' vectorized
    beam search keeps them: fixed-size tensors, with -1e9 scores on the slots that take no part.
    Each step takes ``keep`` candidates per entry (2 * num_beams, or more with several EOS ids)."""

    NEG = -1.0e9

    def __init__(self, input_ids: torch.Tensor, nb: int, max_length: int, fill_token_id: int,
                 length_penalty: float, early_stopping, keep: Optional[int] = None):
        dev = input_ids.device
        self.batch, self.prompt = input_ids.shape[0], input_ids.shape[1]
        self.nb, self.max_length, self.cur_len = nb, max_length, self.prompt
        self.keep = 2 * nb if keep is None else keep
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.running = torch.full((self.batch, nb, max_length), fill_token_id, dtype=torch.int64, device=dev)
        self.running[:, :, :self.prompt] = input_ids[:, None, :]
        self.finished = self.running.clone()
        # The flat (batch * num_beams) beam each generated token continued, -1 past the end: transformers'
        # beam_indices, and the generated lengths.
        self.running_idx = torch.full((self.batch, nb, max_length - self.prompt), -1, dtype=torch.int32, device=dev)
        self.finished_idx = self.running_idx.clone()
        self.running_scores = torch.zeros(self.batch, nb, dtype=torch.float32, device=dev)
        self.running_scores[:, 1:] = self.NEG  # the first step expands one beam per entry
        self.finished_scores = torch.full((self.batch, nb), self.NEG, dtype=torch.float32, device=dev)
        self.is_finished = torch.zeros(self.batch, nb, dtype=torch.bool, device=dev)
        self.improvable = torch.ones(self.batch, 1, dtype=torch.bool, device=dev)
        self._keep_going = True
        # early_stopping as beam_search_advance takes it: False, True, "never" -> 0, 1, 2.
        self._early_stopping_code = {False: 0, True: 1, "never": 2}[early_stopping]

    def running_sequences(self) -> torch.Tensor:
        return self.running[:, :, :self.cur_len].reshape(self.batch * self.nb, self.cur_len)

    def candidates(self, step: BeamStep) -> torch.Tensor:
        """The step's candidate sequences (batch, keep, max_length), their new token in place: what the
        caller's stopping rules judge."""
        cand = _gather_beams(self.running, step.beam_ids)
        cand[:, :, self.cur_len] = step.token_ids
        return cand

    def advance(self, step: BeamStep, cand_seqs: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        """Take one step's candidates, given which of them stop (``hits``, (batch, keep)): the best
        that did not stop run on, those among the top num_beams that stopped join the finished
        hypotheses (one :func:`beam_search_advance` op). Returns the flat indices of the beams the new
        running rows continue (for the caller's cache)."""
        (self.running, self.running_scores, self.running_idx, self.finished, self.finished_scores,
         self.finished_idx, self.is_finished, self.improvable, beam_idx, keep_going) = _ops.beam_search_advance(
            self.running, self.running_scores, self.running_idx, self.finished, self.finished_scores,
            self.finished_idx, self.is_finished, self.improvable, cand_seqs, step.scores, step.beam_ids, hits,
            self.cur_len, self.prompt, self.length_penalty, self._early_stopping_code)
        self._keep_going = keep_going
        self.cur_len += 1
        return beam_idx

    def keep_going(self) -> bool:
        """Whether any entry can still change: a running beam that can beat the worst finished
        hypothesis (at the current length, or the best possible one with early_stopping="never"),
        as the last :meth:`advance` found."""
        return bool(self._keep_going)

    def best(self, r: int) -> BeamSearchOutput:
        """The best ``r`` finished hypotheses of each entry, cut to the longest one generated, with
        their scores and beam indices (flat, ``r`` rows per entry)."""
        seqs = self.finished[:, :r].reshape(self.batch * r, self.max_length)
        scores = self.finished_scores[:, :r].reshape(self.batch * r)
        idx = self.finished_idx[:, :r].reshape(self.batch * r, -1)
        generated = int((idx >= 0).sum(1).max().item())
        return BeamSearchOutput(seqs[:, :self.prompt + generated], scores), idx[:, :generated]
