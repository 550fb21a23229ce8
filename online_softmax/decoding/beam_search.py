"""The fused beam-search decode step.

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

from .. import _checks as checks

_ops = torch.ops.online_softmax


class BeamStep(NamedTuple):
    """What :func:`beam_search_step` returns: each batch entry's best continuations, best first."""

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
    op = "beam_search_step"
    checks.tensor(logits, "logits", op)
    checks.tensor(beam_scores, "beam_scores", op)
    checks.tensor(banned_tokens, "banned_tokens", op, optional=True)
    checks.tensor(penalized_tokens, "penalized_tokens", op, optional=True)
    checks.positive_int(num_beams, "num_beams", op)
    if num_candidates is None:
        num_candidates = 2 * num_beams
    checks.positive_int(num_candidates, "num_candidates", op)
    # The ranges of the numbers: the op's own checks.
    temperature = checks.real(temperature, "temperature", op)
    repetition_penalty = checks.real(repetition_penalty, "repetition_penalty", op)
    return BeamStep(*_ops.beam_search_step(logits, beam_scores, num_beams, num_candidates, temperature,
                                           banned_tokens, penalized_tokens, repetition_penalty))
