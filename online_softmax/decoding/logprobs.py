"""Prompt log-probabilities: the log-probability of given tokens, their rank and the top-N
alternatives, per position, as serving stacks report them for a prompt (``prompt_logprobs``) or a
scored continuation.

``token_logprobs`` reads each row of the logits once and writes nothing of the size (positions,
vocab): where ``torch.log_softmax(logits).gather(...)`` writes a whole log-softmax of the prompt
(a 4k-token prompt over a 128k vocabulary is 2 GB in float32) and reads it back, the fused op keeps
only the online state (max, sumexp), a rank count and the top-N candidates per row.
"""

from typing import NamedTuple

import torch

from .. import _checks as checks

_ops = torch.ops.online_softmax


class TokenLogprobs(NamedTuple):
    """What :func:`token_logprobs` returns, for logits (*batch, vocab) and token ids (*batch)."""

    log_probs: torch.Tensor      # (*batch,) log softmax(logits / t) at the token (float32; float64 for float64)
    rank: torch.Tensor           # (*batch,) int64: the token's 1-based position in the descending order
    top_token_ids: torch.Tensor  # (*batch, top_n) int64, most probable first (ties to the lower id)
    top_log_probs: torch.Tensor  # (*batch, top_n) their log-probabilities


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, top_n: int = 0,
                   temperature: float = 1.0) -> TokenLogprobs:
    """The log-probability under softmax(logits / temperature) of ``token_ids`` (*batch) in
    ``logits`` (*batch, vocab), the token's rank (1 for the most probable; equal logits rank the
    lower id first; NaN above every number, as torch.topk orders them) and the ``top_n`` most
    probable tokens with their log-probabilities (torch.topk's order).

    One read of each row of ``logits``; nothing of the size (positions, vocab) is written, so the
    log-probabilities of a long prompt cost no more memory than its token ids. A row with no
    distribution (a NaN or +inf logit, or every logit -inf) gives NaN log-probabilities. Any float
    dtype and layout; results in float32 (float64 for float64 logits)."""
    op = "token_logprobs"
    checks.tensor(logits, "logits", op)
    checks.tensor(token_ids, "token_ids", op)
    checks.floating(logits, "logits", op)
    if logits.dim() < 1:
        raise checks.fail(op, "logits must have a vocabulary dim (*batch, vocab), got a 0-d tensor")
    batch_shape = logits.shape[:-1]
    if tuple(token_ids.shape) != tuple(batch_shape):
        raise checks.fail(op, f"token_ids must have logits' batch shape {list(batch_shape)}, got "
                              f"{list(token_ids.shape)}")
    top_n = checks.nonnegative_int(top_n, "top_n", op)
    temperature = checks.temperature(temperature, op)
    x = logits.reshape(-1, logits.shape[-1])
    log_probs, rank, top_ids, top_lp, _, _, _ = _ops.token_logprobs(x, token_ids.reshape(-1), top_n, temperature)
    return TokenLogprobs(log_probs.reshape(batch_shape), rank.reshape(batch_shape),
                         top_ids.reshape(*batch_shape, top_n), top_lp.reshape(*batch_shape, top_n))
