"""The unfused torch sequences the fused ops replace: test oracles and benchmark peers.

Production code never calls this module.
"""

from typing import Optional

import torch

from ..decoding.beam_search import BeamStep
from ..decoding.rules import apply_row_edits
from ..decoding.warpers import warped_probs


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


def unfused_sample(logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   num_samples: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The torch sequence transformers runs (warpers, softmax, multinomial): the benchmark peer."""
    x = logits.reshape(-1, logits.shape[-1])
    probs = warped_probs(x, temperature, top_k, top_p, min_p)
    # generate() draws one token per row: torch.multinomial(probs, num_samples=1).
    return torch.multinomial(probs, num_samples, replacement=num_samples > 1, generator=generator)
