"""The log-probability of given tokens under ``softmax((hidden @ weight.T + bias) / t)``, and the
distribution's entropy, without ever holding the whole logits: what policy-gradient training
(PPO, GRPO) reads from a language model's head.

The tokens are cut into chunks as :func:`online_softmax.linear_cross_entropy` cuts them; each
chunk's logits (chunk x vocabulary, in the inputs' dtype) go through the token_logprobs op (one
read: the token's log-probability, the row's online state and the entropy). The backward
recomputes each chunk's logits, writes their gradient over them with token_logprobs_backward_
(one read and write, from the saved state) and folds it into ``grad_hidden``, ``grad_weight`` and
``grad_bias`` with two matmuls. With grad mode off nothing is saved.

Where the chunked loop cannot run or cannot be differentiated again (torch.func's transforms,
tracers, meta or fake tensors, dual tensors) the result is the plain composition over the whole
logits, with the same values and every derivative; a double backward of the chunked form
differentiates that composition over the saved inputs.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks as checks
from .._checks import state_dtype
from .cross_entropy import _physical, _symbolic
from .linear_cross_entropy import _chunk_logits, _chunks, _composed, check_head, token_chunk

_OP = "linear_token_logprobs"
_ops = torch.ops.online_softmax


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False,
                          chunk_size: Optional[int] = None):
    """``log_softmax(linear(hidden, weight, bias) / temperature).gather(-1, token_ids)`` for
    ``hidden`` (..., H), ``weight`` (V, H), ``bias`` (V,) and int64 ``token_ids`` (...) in [0, V),
    computed ``chunk_size`` tokens at a time (default as linear_cross_entropy's: 1/28 of the tokens,
    at least 128 and at least 2**20 logits) so that no (tokens, V) tensor exists.

    Returns the log-probabilities (...) in float32 (float64 for float64 inputs), and with
    ``return_entropy`` the tuple (log_probs, entropy), entropy = -sum p log p of each token's
    distribution. Differentiable with respect to ``hidden``, ``weight`` and ``bias``."""
    op = _OP
    for name, t in (("hidden", hidden), ("weight", weight), ("token_ids", token_ids)):
        checks.tensor(t, name, op)
    checks.tensor(bias, "bias", op, optional=True)
    vocab = check_head(op, hidden, weight, bias)
    if token_ids.dtype != torch.int64:
        raise checks.fail(op, f"token_ids must be int64, got {token_ids.dtype}", TypeError)
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise checks.fail(op, f"token_ids must have hidden's shape without its last dim, "
                              f"{list(hidden.shape[:-1])}, got {list(token_ids.shape)}")
    for name, t in (("weight", weight), ("token_ids", token_ids), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise checks.fail(op, f"{name} is on {t.device} but hidden is on {hidden.device}")
    temperature = checks.temperature(temperature, op)
    composed = _composed(hidden, weight, bias)
    chunk_size = token_chunk(op, hidden, vocab, chunk_size, composed)
    t = _check_token_ids(token_ids.reshape(-1), vocab)
    h = hidden.reshape(-1, hidden.shape[-1])
    if composed:
        lp, entropy = _composition(h, weight, bias, t, temperature)
    else:
        need = tuple(torch.is_grad_enabled() and p is not None and p.requires_grad for p in (h, weight, bias))
        lp, entropy, _m, _d = _LinearTokenLogprobs.apply(h, weight, bias, t, temperature, chunk_size, need)
    lp = lp.reshape(token_ids.shape)
    return (lp, entropy.reshape(token_ids.shape)) if return_entropy else lp


def _check_token_ids(t: torch.Tensor, vocab: int) -> torch.Tensor:
    """``t`` after checking that every id lies in [0, vocab): an IndexError naming token_ids
    otherwise (one host sync); tensors without values (meta, fake, traced) are not checked."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return t
    physical = _physical(t)
    if physical.numel() and not _symbolic(physical):
        bad = (physical < 0) | (physical >= vocab)
        if bool(bad.any()):
            raise IndexError(f"online_softmax.{_OP}: token_ids must lie in [0, {vocab}) (the rows of weight), got "
                             f"{int(physical[bad][0])}")
    return t


def _composition(h, weight, bias, t, temperature):
    """(log_probs, entropy) of rows h (N, H) over the whole (N, V) logits, in differentiable ops."""
    logits = F.linear(h, weight, bias)
    log_p = torch.log_softmax(logits.to(state_dtype(logits.dtype)) / temperature, -1)
    p = log_p.exp()
    # p log p is 0 where p is (a -inf logit): not 0 * -inf, in the value or its gradient.
    entropy = -(p * log_p.masked_fill(p == 0, 0)).sum(-1)
    return log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1), entropy


class _LinearTokenLogprobs(torch.autograd.Function):
    """The chunked log-probabilities of rows h (N, H). ``need``: which of (h, weight, bias) get a
    gradient (grad mode on and requires_grad), decided by the caller, so that nothing is saved under
    no_grad or inference_mode. Outputs (log_probs, entropy)."""

    @staticmethod
    def forward(h, weight, bias, t, temperature, chunk, need):
        n, vocab = h.shape[0], weight.shape[0]
        acc = state_dtype(h.dtype)
        lp, m, d, entropy = (torch.empty(n, dtype=acc, device=h.device) for _ in range(4))
        # One logits buffer for every chunk (allocated once: see linear_cross_entropy's _accumulate).
        buffer = torch.empty(min(n, chunk), vocab, dtype=torch.result_type(h, weight), device=h.device)
        for a, b in _chunks(n, chunk):
            logits, _ = _chunk_logits(h[a:b], weight, bias, None, buffer[:b - a])
            lp[a:b], _rank, _ids, _top, m[a:b], d[a:b], entropy[a:b] = _ops.token_logprobs(logits, t[a:b], 0,
                                                                                            temperature)
        return lp, entropy, m, d

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, bias, t, temperature, chunk, need = inputs
        _lp, entropy, m, d = output
        ctx.mark_non_differentiable(m, d)
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.chunk, ctx.need = temperature, chunk, need
        if any(need):
            # The inputs themselves (no copy) and the per-row state: the backward recomputes the logits.
            ctx.save_for_backward(h, weight, bias, t, m, d, entropy)

    @staticmethod
    def backward(ctx, g_lp, g_h, _gm, _gd):
        need = ctx.need
        if (g_lp is None and g_h is None) or not any(need):
            return None, None, None, None, None, None, None
        h, weight, bias, t, m, d, entropy = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the composition over the saved inputs instead.
            inputs = [p for p, n in zip((h, weight, bias), need) if n]
            with torch.enable_grad():
                lp, ent = _composition(h, weight, bias, t, ctx.temperature)
                outs = [o for o, g in ((lp, g_lp), (ent, g_h)) if g is not None]
                found = iter(torch.autograd.grad(outs, inputs, [g for g in (g_lp, g_h) if g is not None],
                                                 create_graph=True))
            grads = [next(found) if n else None for n in need]
            return grads[0], grads[1], grads[2], None, None, None, None
        gh = torch.empty_like(h) if need[0] else None
        gw = torch.zeros_like(weight) if need[1] else None
        gb = torch.zeros(bias.shape, dtype=state_dtype(bias.dtype), device=bias.device) if need[2] else None
        g_lp = torch.zeros_like(m) if g_lp is None else g_lp.to(m.dtype)
        g_h = None if g_h is None else g_h.to(m.dtype)
        n = h.shape[0]
        buffer = torch.empty(min(n, ctx.chunk), weight.shape[0], dtype=torch.result_type(h, weight), device=h.device)
        for a, b in _chunks(n, ctx.chunk):
            g, _ = _chunk_logits(h[a:b], weight, bias, None, buffer[:b - a])
            # The chunk's logits are ours and not needed again: the gradient is written over them.
            _ops.token_logprobs_backward_(g, g_lp[a:b], None if g_h is None else g_h[a:b], t[a:b], m[a:b], d[a:b],
                                          entropy[a:b], ctx.temperature)
            if gh is not None:
                torch.mm(g, weight, out=gh[a:b])
            if gw is not None:
                gw.addmm_(g.t(), h[a:b])
            if gb is not None:
                gb.add_(g.sum(0, dtype=gb.dtype))
        return gh, gw, None if gb is None else gb.to(bias.dtype), None, None, None, None
