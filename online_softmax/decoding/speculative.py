"""Speculative decoding's verification step on the fused op: :func:`rejection_sample`.

A draft (a small model, or n-grams looked up in the prompt) proposes n tokens per row; the target
model scores the n + 1 positions in one forward; this step keeps the longest prefix the target
accepts and emits one more token, so the emitted tokens follow the target's distribution exactly
(Leviathan et al. 2023, Chen et al. 2023), whatever the draft.

The target distribution is the one :func:`~online_softmax.sample` draws from (temperature, then
top-k, top-p and min-p as transformers' warpers apply them). Each cut becomes one number per target
position, the log-ratio ``(x - max) / t`` of the smallest token kept (found by the fused top-k or
the top-p threshold op, never by a softmax of the row), and the ``rejection_sample`` op computes each
position's (max, normalizer) over the tokens above it in one read.
"""

import math
from typing import NamedTuple, Optional

import torch

from .. import _checks as checks
from .sampling import TIE_SLACK, Param, _check_range, _keep_min_p, _keep_top_p, _per_row

_ops = torch.ops.online_softmax
_OP = "rejection_sample"


class RejectionSample(NamedTuple):
    """What :func:`rejection_sample` returns."""

    token_ids: torch.Tensor     # (batch, n + 1) int64: the accepted drafts, then the one drawn token; -1 after
    num_accepted: torch.Tensor  # (batch,) int64: drafts accepted (row b emits num_accepted[b] + 1 tokens)
    log_probs: torch.Tensor     # (batch, n + 1) each emitted token's log-probability under the target; NaN after


def rejection_sample(target_logits: torch.Tensor, draft_token_ids: torch.Tensor,
                     draft_probs: Optional[torch.Tensor] = None, *, num_draft_tokens: Optional[torch.Tensor] = None,
                     temperature: Param = 1.0, top_k: Param = None, top_p: Param = None, min_p: Param = None,
                     generator: Optional[torch.Generator] = None) -> RejectionSample:
    """Verify a chain of draft tokens against the target model's logits.

    - ``target_logits`` (batch, n + 1, vocab): the target's logits at the n draft positions and one
      more; ``draft_token_ids`` (batch, n) the drafts; ``draft_probs`` (batch, n, vocab) the draft's
      probabilities of every token at each position (float32 or ``target_logits``' dtype), or None
      for a deterministic draft (prompt lookup, n-grams: q is one-hot at the draft token).
    - ``num_draft_tokens`` (batch,): row b verifies only its first ``num_draft_tokens[b]`` drafts
      (ragged batches) and takes its bonus token from that position; None means n for every row.
    - ``temperature``, ``top_k``, ``top_p``, ``min_p``: the target distribution, as
      :func:`~online_softmax.sample` takes them (a number or one value per batch row); a row with
      temperature 0 is greedy.

    Sampled rows accept draft x_i when ``u_i * q(x_i) < p(x_i)`` (probability min(1, p / q)); at the
    first rejection they draw from max(p - q, 0) normalized; when every draft is accepted they draw
    a bonus token from the next position. If the residual's mass rounds to zero (p and q agree to
    rounding, so the rejection was a rounding event itself), the token is drawn from p. Greedy rows
    accept while the draft is the target's arg-max (ties to the lowest index, as ``torch.argmax``)
    and then emit the arg-max; their log-probabilities are ``log_softmax`` of the logits as given.
    Tokens tied at a top-k or top-p cut are all kept.

    A position with no distribution (NaN, +inf, or every token -inf) emits -1 with log-probability
    NaN and ends its row; the other rows are unaffected. The uniforms come from one
    ``torch.rand((batch, n + 1), dtype=torch.float64, generator=generator)``, so a seeded generator
    reproduces the result: column i < n tests draft i, column n draws the final token.
    """
    x, ids, q = _check_inputs(target_logits, draft_token_ids, draft_probs, generator)
    batch, n1, vocab = x.shape
    n, dev = n1 - 1, x.device
    counts = _num_drafts(num_draft_tokens, batch, n, dev)
    shape = (batch,)
    t = _per_row(temperature, "temperature", batch, shape, dev, torch.float64)
    k = _per_row(top_k, "top_k", batch, shape, dev, torch.int64)
    p = _per_row(top_p, "top_p", batch, shape, dev, torch.float64)
    mp = _per_row(min_p, "min_p", batch, shape, dev, torch.float64)
    _check_range(t, "temperature", 0.0, float("inf"), hi_open=True)
    _check_range(k, "top_k", 0, float("inf"))
    _check_range(p, "top_p", 0.0, 1.0)
    _check_range(mp, "min_p", 0.0, 1.0)
    u = torch.rand(batch, n1, dtype=torch.float64, device=dev, generator=generator)
    ratio = None
    if dev.type != "meta" and batch > 0 and vocab > 0:
        ratio = _cut(x, t, k, p, mp)
    return RejectionSample(*_ops.rejection_sample(x, ids, q, counts, t, ratio, u))


def _check_inputs(target_logits, draft_token_ids, draft_probs, generator):
    checks.tensor(target_logits, "target_logits", _OP)
    checks.floating(target_logits, "target_logits", _OP)
    if target_logits.dim() != 3 or target_logits.shape[1] < 1:
        raise checks.fail(_OP, "target_logits must be 3-D (batch, n + 1, vocab) with n + 1 >= 1, got shape "
                               f"{list(target_logits.shape)}")
    checks.tensor(draft_token_ids, "draft_token_ids", _OP)
    if draft_token_ids.dtype.is_floating_point or draft_token_ids.dtype.is_complex or \
            draft_token_ids.dtype == torch.bool:
        raise checks.fail(_OP, f"draft_token_ids must be an integer tensor, got {draft_token_ids.dtype}", TypeError)
    if draft_probs is not None:
        checks.tensor(draft_probs, "draft_probs", _OP)
        if not draft_probs.dtype.is_floating_point:
            raise checks.fail(_OP, f"draft_probs must be a floating-point tensor, got {draft_probs.dtype}", TypeError)
        if draft_probs.dtype not in (torch.float32, target_logits.dtype):
            draft_probs = draft_probs.float()
    checks.generator(generator, _OP)
    return target_logits, draft_token_ids.long(), draft_probs


def _num_drafts(num_draft_tokens, batch, n, dev):
    if num_draft_tokens is None:
        return torch.full((batch,), n, dtype=torch.int64, device=dev)
    checks.tensor(num_draft_tokens, "num_draft_tokens", _OP)
    if num_draft_tokens.dtype.is_floating_point or num_draft_tokens.dtype.is_complex or \
            num_draft_tokens.dtype == torch.bool:
        raise checks.fail(_OP, f"num_draft_tokens must be an integer tensor, got {num_draft_tokens.dtype}",
                          TypeError)
    return num_draft_tokens.long()


def _cut(x, t, k, top_p, min_p) -> Optional[torch.Tensor]:
    """The (batch, n + 1) log-ratio of the smallest token each target position keeps (-inf: all),
    or None when no row has a cut. Greedy rows (t = 0) get none (the op ignores their cut)."""
    batch, n1, vocab = x.shape
    compiling = torch.compiler.is_compiling()
    if not compiling:  # cuts that keep every token are dropped
        k = k if k is not None and bool(((k > 0) & (k < vocab)).any()) else None
        top_p = top_p if top_p is not None and bool((top_p < 1).any()) else None
        min_p = min_p if min_p is not None and bool((min_p > 0).any()) else None
    if k is None and top_p is None and min_p is None:
        return None
    rows = x.reshape(batch * n1, vocab)
    per_pos = (lambda v: None if v is None else v.repeat_interleave(n1))
    t_rows = per_pos(torch.where(t > 0, t, torch.ones_like(t)))
    if k is not None:
        ratio = _cut_top_k(rows, t_rows, per_pos(k), per_pos(top_p), per_pos(min_p), compiling)
    else:
        ratio = torch.full((batch * n1,), -math.inf, dtype=torch.float64, device=x.device)
        if top_p is not None:
            r, _status = _ops.top_p_threshold(rows, t_rows, per_pos(top_p))
            # status 1 (tokens tied at the cut): r is the tie's value, so every tied token is kept. A
            # tie at the max can leave r a rounding above 0 (it still rounds to the max).
            ratio = r.nan_to_num(nan=-math.inf).clamp_max(0.0)
        if min_p is not None:
            ratio = torch.maximum(ratio, per_pos(min_p).log())
    return ratio.reshape(batch, n1)


def _cut_top_k(rows, t, k, top_p, min_p, compiling):
    """The cut of rows with top-k (and top-p / min-p after it, over the top-k's renormalized
    distribution, as transformers applies them): the candidates come from the fused top-k, with
    TIE_SLACK more so that ties with the k-th stay; rows whose ties overflow that are redone over
    every token (the fused top-k with k = vocab is a sort)."""
    vocab = rows.shape[1]
    k = torch.where((k > 0) & (k < vocab), k, vocab)
    sel = vocab if compiling else min(vocab, int(k.max()) + TIE_SLACK)
    ratio = _cut_of_candidates(rows, t, k, top_p, min_p, sel)
    if sel < vocab and not compiling:
        # More ties with a finite k-th logit than the slack holds: those rows again on every token.
        over = (ratio[1] & torch.isfinite(ratio[0])).nonzero()[:, 0]
        r = ratio[0]
        if over.numel():
            pick = (lambda v: None if v is None else v[over])
            r[over] = _cut_of_candidates(rows[over], t[over], k[over], pick(top_p), pick(min_p), vocab)[0]
        return r
    return ratio[0]


def _cut_of_candidates(rows, t, k, top_p, min_p, sel):
    """(log-ratio of the smallest kept candidate, whether the top-k still kept the last candidate, so
    that ties with the k-th may lie beyond them): the warpers over the ``sel`` largest logits of each
    row, sorted."""
    values_idx = _ops.softmax_topk(rows, sel, -1, False, 1.0)
    idx, m = values_idx[1], values_idx[2]
    s = 1.0 / t                                     # the kernels' scale: 1 / t in the accumulation dtype
    if rows.dtype != torch.float64:
        s = s.float().double()
    xs = rows.gather(1, idx).double()
    z = (xs - m.double()[:, None]) * s[:, None]     # (x - max) / t, sorted descending
    kth = z.gather(1, (k - 1).clamp_max(sel - 1)[:, None])
    keep = z >= kth
    overflow = keep[:, -1]  # the top-k's own keep: ties with the k-th may go on past the candidates
    if top_p is not None:
        keep = keep & _keep_top_p(torch.softmax(z.masked_fill(~keep, -math.inf), -1), top_p)
    if min_p is not None:
        keep = keep & _keep_min_p(torch.softmax(z.masked_fill(~keep, -math.inf), -1), min_p)
    last = keep.sum(1, keepdim=True).clamp_min(1) - 1   # the kept candidates are a prefix
    ratio = z.gather(1, last)[:, 0].clamp_max(0.0)
    ratio = torch.where(torch.isfinite(m.double()), ratio, torch.full_like(ratio, -math.inf))
    return ratio.nan_to_num(nan=-math.inf), overflow
