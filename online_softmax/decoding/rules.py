"""transformers' generate() options for beam and greedy search, as per-step edits of the scores.

transformers runs its logits processors on the *normalized* log-probabilities in beam search, in a
fixed order: repetition penalty, n-gram blocking, bad words, min_length, min_new_tokens,
forced_eos_token_id, suppress_tokens, begin_suppress_tokens, then the caller's own processors.
Every option here but ``forced_eos_token_id`` is a sparse edit of some rows: a few tokens banned
(-inf), or the repetition penalty on the tokens a row has already seen. Those edits commute with one
another once the penalty goes first, so the fused step (:func:`beam_search_step`) applies them after
(m, d) are known and still reads the logits once. ``forced_eos_token_id`` (on its one step) and any
caller processor make the decoder take the dense path: the log-probabilities are materialized and
every processor runs in transformers' order, exactly.
"""

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch

from .. import _checks as checks

_OP = "BeamSearchDecoder"


def apply_row_edits(log_probs: torch.Tensor, banned_tokens: Optional[torch.Tensor] = None,
                    penalized_tokens: Optional[torch.Tensor] = None, repetition_penalty: float = 1.0) -> torch.Tensor:
    """The edits of :func:`beam_search_step` on materialized log-probabilities (rows, vocab), the way
    transformers' processors write them: gather, change, scatter. -1 entries are padding."""
    vocab = log_probs.shape[-1]
    # Padding scatters into an extra column that is dropped afterwards.
    out = torch.cat([log_probs, log_probs.new_zeros(log_probs.shape[0], 1)], 1)
    if penalized_tokens is not None and repetition_penalty != 1.0:
        idx = torch.where(penalized_tokens < 0, vocab, penalized_tokens)
        lp = out.gather(1, idx)
        out.scatter_(1, idx, torch.where(lp < 0, lp * repetition_penalty, lp / repetition_penalty))
    if banned_tokens is not None:
        out.scatter_(1, torch.where(banned_tokens < 0, vocab, banned_tokens), float("-inf"))
    return out[:, :vocab]


class StepEdits(NamedTuple):
    """One step's edits: bans before and after forced EOS (transformers' order), the penalty."""
    banned_early: Optional[torch.Tensor]   # n-grams, bad words, min lengths: (rows, n) with -1 padding
    banned_late: Optional[torch.Tensor]    # suppress_tokens, begin_suppress_tokens
    penalized: Optional[torch.Tensor]      # every token of the row's sequence so far
    force_eos: bool                        # the step before max_length with forced_eos_token_id

    def banned(self) -> Optional[torch.Tensor]:
        parts = [t for t in (self.banned_early, self.banned_late) if t is not None]
        return _joined(parts)


def _joined(parts: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """The token lists side by side (None for none; one list as it is: a cat costs an op a step)."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _token_list(value, name: str) -> List[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                    for t in value):
        raise checks.fail(_OP, f"{name} must be a list of non-negative token ids, got {value!r}")
    return list(value)


class DecodingRules:
    """The processors generate() would build from the same keyword arguments."""

    def __init__(self, *, eos_token_id: Optional[int], no_repeat_ngram_size: int = 0,
                 repetition_penalty: float = 1.0, min_length: int = 0, min_new_tokens: int = 0,
                 bad_words_ids: Optional[Sequence[Sequence[int]]] = None, suppress_tokens=None,
                 begin_suppress_tokens=None, forced_eos_token_id=None,
                 logits_processor: Union[None, Callable, Sequence[Callable]] = None):
        for name, v in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_length", min_length),
                        ("min_new_tokens", min_new_tokens)):
            checks.nonnegative_int(v, name, _OP)
        self.ngram = no_repeat_ngram_size
        self.penalty = checks.positive_finite(repetition_penalty, "repetition_penalty", _OP)
        # transformers drops the length rules when there is no EOS id to ban.
        self.eos = [] if eos_token_id is None else [eos_token_id]
        # Where a rule counts from, when it is not the prompt's length (rules read from transformers'
        # processor instances carry their own): the new tokens of min_new_tokens, the step of
        # begin_suppress_tokens, and the positions the repetition penalty skips (int or (rows,)).
        self.new_tokens_from: Optional[int] = None
        self.begin_index: Optional[int] = None
        self.penalty_skip = None
        self._columns = {}
        self.min_length = min_length if eos_token_id is not None else 0
        self.min_new_tokens = min_new_tokens if eos_token_id is not None else 0
        self.single_bad, self.multi_bad = [], []
        if bad_words_ids is not None:
            if not isinstance(bad_words_ids, (list, tuple)) or len(bad_words_ids) == 0 or \
                    any(not isinstance(w, (list, tuple)) or len(w) == 0 for w in bad_words_ids):
                raise checks.fail(_OP, f"bad_words_ids must be a non-empty list of non-empty lists of token ids, "
                                       f"got {bad_words_ids!r}")
            for w in bad_words_ids:
                w = _token_list(list(w), "each bad_words_ids entry")
                if w == [eos_token_id]:
                    continue  # transformers never bans EOS through bad_words_ids
                (self.single_bad if len(w) == 1 else self.multi_bad).append(w)
        self.suppress = _token_list(suppress_tokens, "suppress_tokens") if suppress_tokens is not None else []
        self.begin_suppress = (_token_list(begin_suppress_tokens, "begin_suppress_tokens")
                               if begin_suppress_tokens is not None else [])
        self.forced_eos = (_token_list(forced_eos_token_id, "forced_eos_token_id")
                           if forced_eos_token_id is not None else [])
        if logits_processor is None:
            self.custom = []
        elif callable(logits_processor):
            self.custom = [logits_processor]
        elif isinstance(logits_processor, (list, tuple)) and all(callable(p) for p in logits_processor):
            self.custom = list(logits_processor)
        else:
            raise checks.fail(_OP, "logits_processor must be a callable (input_ids, scores) -> scores or a list of "
                                   f"them, got {type(logits_processor).__name__}", TypeError)

    def any(self) -> bool:
        return bool(self.ngram or self.penalty != 1.0 or self.min_length or self.min_new_tokens or self.single_bad
                    or self.multi_bad or self.suppress or self.begin_suppress or self.forced_eos or self.custom)

    def check_vocab(self, vocab: int) -> None:
        named = [("bad_words_ids", w) for w in self.single_bad + self.multi_bad] + [
            ("suppress_tokens", self.suppress), ("begin_suppress_tokens", self.begin_suppress),
            ("forced_eos_token_id", self.forced_eos)]
        for name, w in named:
            if any(t >= vocab for t in w):
                raise checks.fail(_OP, f"{name} holds token ids >= the vocabulary size {vocab}: {w}")

    def edits(self, seqs: torch.Tensor, prompt_len: int, max_length: int,
              pad_lengths: Optional[torch.Tensor] = None) -> StepEdits:
        """The edits for the next token of every row of ``seqs`` (rows, cur_len). ``pad_lengths``
        (rows,): each row's left padding, which the repetition penalty skips as generate() does."""
        rows, cur_len = seqs.shape
        dev = seqs.device

        def column(tokens):
            key = (tuple(tokens), dev, rows)
            if key not in self._columns:  # built once: a tensor from a list costs as much as an op
                self._columns[key] = torch.tensor(tokens, dtype=torch.int64, device=dev).expand(rows, len(tokens))
            return self._columns[key]

        early, late = [], []
        n = self.ngram
        if n and cur_len >= n:
            # Every n-gram seen so far whose first n - 1 tokens are the row's last n - 1 bans its last.
            early.append(torch.ops.online_softmax.ngram_banned_tokens(seqs, n))
        if self.single_bad:
            early.append(column([w[0] for w in self.single_bad]))
        for w in self.multi_bad:
            prefix = w[:-1]
            if len(prefix) <= cur_len:
                hit = (seqs[:, cur_len - len(prefix):] == column(prefix)).all(-1, keepdim=True)
                early.append(torch.where(hit, w[-1], -1))
        new_from = prompt_len if self.new_tokens_from is None else self.new_tokens_from
        if self.eos and (cur_len < self.min_length or cur_len - new_from < self.min_new_tokens):
            early.append(column(self.eos))
        if self.suppress:
            late.append(column(self.suppress))
        if self.begin_suppress and cur_len == (prompt_len if self.begin_index is None else self.begin_index):
            late.append(column(self.begin_suppress))
        penalized = None
        if self.penalty_skip is not None:
            pad_lengths = self.penalty_skip
            if isinstance(pad_lengths, int):
                pad_lengths = torch.full((rows,), pad_lengths, dtype=torch.int64, device=dev)
        if self.penalty != 1.0:
            penalized = seqs
            if pad_lengths is not None:
                positions = torch.arange(cur_len, device=dev)
                penalized = seqs.masked_fill(positions[None, :] < pad_lengths[:, None], -1)
        return StepEdits(_joined(early), _joined(late), penalized,
                         bool(self.forced_eos) and cur_len == max_length - 1)

    def dense(self, seqs: torch.Tensor, scores: torch.Tensor, edits: StepEdits) -> torch.Tensor:
        """Every processor on materialized scores (rows, vocab), in transformers' order."""
        scores = apply_row_edits(scores, edits.banned_early, edits.penalized, self.penalty)
        if edits.force_eos:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.forced_eos] = 0.0
        if edits.banned_late is not None:
            scores = apply_row_edits(scores, edits.banned_late)
        for p in self.custom:
            scores = p(seqs, scores)
        return scores

    def fusable(self, edits: StepEdits) -> bool:
        return not self.custom and not edits.force_eos

    @classmethod
    def from_processors(cls, processors: Sequence) -> Optional["DecodingRules"]:
        """The rules of a transformers ``LogitsProcessorList``, read from its instances' own fields,
        when every processor in it is one the fused step expresses as an edit (in any order: bans
        commute with one another and with the penalty, since -inf * penalty is -inf). None when any
        is not: the caller then runs the list itself, densely."""
        from transformers.generation import logits_process as lp

        rules = cls(eos_token_id=None)
        seen = set()
        for p in processors:
            kind = type(p)
            if kind in seen:
                return None
            seen.add(kind)
            if kind is lp.RepetitionPenaltyLogitsProcessor and getattr(p, "logits_indices", None) is None:
                rules.penalty, rules.penalty_skip = float(p.penalty), p.prompt_ignore_length
            elif kind is lp.NoRepeatNGramLogitsProcessor:
                rules.ngram = int(p.ngram_size)
            elif kind is lp.NoBadWordsLogitsProcessor and all(v == float("-inf") for v in p.sequence_bias.values()):
                for w in p.sequence_bias:
                    (rules.single_bad if len(w) == 1 else rules.multi_bad).append(list(w))
            elif kind in (lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor):
                eos = [int(t) for t in torch.as_tensor(p.eos_token_id).reshape(-1).tolist()]
                if rules.eos and eos != rules.eos:
                    return None
                rules.eos = eos
                if kind is lp.MinLengthLogitsProcessor:
                    rules.min_length = int(p.min_length)
                else:
                    rules.min_new_tokens, rules.new_tokens_from = int(p.min_new_tokens), int(p.prompt_length_to_skip)
            elif kind is lp.SuppressTokensLogitsProcessor:
                rules.suppress = [int(t) for t in p.suppress_tokens.reshape(-1).tolist()]
            elif kind is lp.SuppressTokensAtBeginLogitsProcessor:
                rules.begin_suppress = [int(t) for t in p.begin_suppress_tokens.reshape(-1).tolist()]
                rules.begin_index = int(p.begin_index)
            else:
                return None
        return rules
