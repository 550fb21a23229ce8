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

_ops = torch.ops.online_softmax


class BeamStep(NamedTuple):
    scores: torch.Tensor     # (batch, num_candidates): beam score + token log-probability, descending
    token_ids: torch.Tensor  # (batch, num_candidates) int64
    beam_ids: torch.Tensor   # (batch, num_candidates) int64, in [0, num_beams)


def beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, *,
                     num_candidates: Optional[int] = None, temperature: float = 1.0) -> BeamStep:
    """One fused beam-search step. ``logits``: (batch * num_beams, vocab), beam-major within a
    batch entry; ``beam_scores``: (batch, num_beams). Returns the best ``num_candidates`` (default
    2 * num_beams) continuations per batch entry, sorted descending, ties to the lower
    ``beam * vocab + token``. Banned tokens are -inf logits; they score -inf."""
    for name, t in (("logits", logits), ("beam_scores", beam_scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"online_softmax.beam_search_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, v in (("num_beams", num_beams), ("num_candidates", num_candidates)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"online_softmax.beam_search_step: {name} must be an int, got {type(v).__name__}")
    if num_candidates is None:
        num_candidates = 2 * num_beams
    return BeamStep(*_ops.beam_search_step(logits, beam_scores, num_beams, num_candidates, float(temperature)))


def unfused_beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, *,
                             num_candidates: Optional[int] = None, temperature: float = 1.0) -> BeamStep:
    """The unfused torch sequence the fused step replaces (the reference and the benchmark peer)."""
    if num_candidates is None:
        num_candidates = 2 * num_beams
    batch, vocab = beam_scores.shape[0], logits.shape[-1]
    scores = torch.log_softmax(logits / temperature, dim=-1).view(batch, num_beams, vocab) + beam_scores[..., None]
    top, flat = scores.view(batch, num_beams * vocab).topk(num_candidates, dim=-1)
    return BeamStep(top, flat % vocab, flat // vocab)
