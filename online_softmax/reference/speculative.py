"""Speculative decoding's verification step, written out plainly: the oracle of the
``rejection_sample`` op's kernels (CPU and CUDA) and the torch sequence its benchmark compares with.

- :func:`rejection_sample_reference` is the op's algorithm, row by row, in float64 after the same
  roundings the kernels make (the scaled logit ``(x - max) * (1 / t)`` in the accumulation dtype,
  the cut's threshold rounded to it), so its tokens are the kernels' tokens except where a
  cumulative sum lands within rounding of a uniform.
- :func:`unfused_rejection_sample` is the same algorithm as a serving engine writes it in torch
  ops: a softmax of every target and draft row, gathers, the residual, ``torch.multinomial``.
"""

import math
from typing import Optional

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _position(x: torch.Tensor, t: float, ratio: float):
    """(p, log p) over one target row as float64 vectors, or None when the row has no distribution.
    t == 0 (greedy) gives log_softmax of the logits themselves, without a cut."""
    acc = _acc(x.dtype)
    x = x.to(acc)
    if x.numel() == 0 or bool(torch.isnan(x).any()):
        return None
    m = x.max()
    if not bool(torch.isfinite(m)):
        return None
    s = torch.tensor(1.0 if t == 0 else 1.0 / t, dtype=torch.float64).to(acc)
    z = ((x - m) * s).double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if t != 0 and ratio > -math.inf:
        threshold = torch.tensor(float(m) + ratio / float(s), dtype=torch.float64).to(acc)
        keep = x >= threshold
    e = torch.where(keep, z.exp(), torch.zeros_like(z))
    total = e.sum()
    if not (float(total) > 0.0 and math.isfinite(float(total))):
        return None
    return e / total, torch.where(keep, z - total.log(), torch.full_like(z, -math.inf))


def _draw(w: torch.Tensor, u: float) -> int:
    """The first index whose cumulative weight exceeds u * sum(w); past the end by rounding, the
    last index with weight."""
    c = w.cumsum(0)
    hit = (c > u * float(c[-1])).nonzero()
    if hit.numel():
        return int(hit[0, 0])
    return int((w > 0).nonzero()[-1, 0])


def rejection_sample_reference(target_logits, draft_token_ids, draft_probs, num_draft_tokens, temperature,
                               min_log_ratio, uniforms):
    """The op ``torch.ops.online_softmax.rejection_sample`` with the same arguments (all given as
    tensors; see csrc/ops.cpp), computed one row at a time in float64. Returns (token_ids,
    num_accepted, log_probs)."""
    batch, n1, vocab = target_logits.shape
    n = n1 - 1
    tokens = torch.full((batch, n1), -1, dtype=torch.int64)
    log_probs = torch.full((batch, n1), math.nan, dtype=torch.float64)
    accepted = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        t = float(temperature[b])
        nb = int(num_draft_tokens[b])
        for i in range(nb + 1):
            ratio = -math.inf if min_log_ratio is None else float(min_log_ratio[b, i])
            st = _position(target_logits[b, i].cpu(), t, ratio)
            accepted[b] = i
            if st is None:
                break
            p, lp = st
            if i == nb:  # every draft accepted: the bonus token
                tok = int(lp.argmax()) if t == 0 else _draw(p, float(uniforms[b, n]))
                tokens[b, i], log_probs[b, i] = tok, lp[tok]
                break
            v = int(draft_token_ids[b, i])
            if t == 0:
                best = int(lp.argmax())  # the first of the largest
                if v != best:
                    tokens[b, i], log_probs[b, i] = best, lp[best]
                    break
            else:
                if draft_probs is None:
                    q = torch.zeros(vocab, dtype=torch.float64)
                    q[v] = 1.0
                else:
                    q = draft_probs[b, i].cpu().double()
                if not float(uniforms[b, i]) * float(q[v]) < float(p[v]):
                    w = (p - q).clamp_min(0.0)
                    tok = _draw(w if float(w.sum()) > 0.0 else p, float(uniforms[b, n]))
                    tokens[b, i], log_probs[b, i] = tok, lp[tok]
                    break
            tokens[b, i], log_probs[b, i] = v, lp[v]
    return tokens, accepted, log_probs.to(_acc(target_logits.dtype))


def unfused_rejection_sample(target_logits: torch.Tensor, draft_token_ids: torch.Tensor,
                             draft_probs: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                             generator: Optional[torch.Generator] = None):
    """Chain speculative sampling in torch ops, batched, as serving engines write it: softmax of
    the target (and draft) rows, the acceptance test by gather, the residual max(p - q, 0) at each
    row's first rejection and a bonus draw from the last position, ``torch.multinomial`` for the
    draws. temperature > 0. Returns (token_ids (B, n + 1) padded with -1, num_accepted (B,))."""
    batch, n1, vocab = target_logits.shape
    n = n1 - 1
    p = torch.softmax(target_logits.float() / temperature, -1)                       # (B, n + 1, V)
    ids = draft_token_ids
    p_draft = p[:, :n].gather(2, ids[..., None])[..., 0]                            # (B, n)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.float().gather(2, ids[..., None])[..., 0]
    u = torch.rand(batch, n, device=p.device, generator=generator)
    accept = u * q_draft < p_draft
    rejected = (~accept).int()
    num_accepted = torch.where(rejected.any(1), rejected.argmax(1), torch.full_like(rejected[:, 0], n)).long()
    rows = torch.arange(batch, device=p.device)
    p_last = p[rows, num_accepted]                                                   # (B, V)
    if draft_probs is None:
        q_last = torch.zeros_like(p_last)
        has_draft = num_accepted < n
        q_last[rows[has_draft], ids[rows[has_draft], num_accepted[has_draft]]] = 1.0
    else:
        q_last = torch.cat([draft_probs.float(), torch.zeros_like(p[:, :1])], 1)[rows, num_accepted]
    residual = (p_last - q_last).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_last)
    last = torch.multinomial(residual, 1, generator=generator)[:, 0]
    cols = torch.arange(n1, device=p.device)
    padded_ids = torch.cat([ids, torch.full_like(ids[:, :1], -1)], 1)
    tokens = torch.where(cols[None] < num_accepted[:, None], padded_ids, torch.full_like(padded_ids, -1))
    tokens[rows, num_accepted] = last
    return tokens, num_accepted
