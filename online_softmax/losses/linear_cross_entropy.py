"""The cross-entropy of ``hidden @ weight.T (+ bias)`` without ever holding the whole logits.

The tokens are cut into chunks; each chunk's logits (chunk x vocabulary) are computed, turned
into the chunk's losses (their (m, d), one read) and, when gradients are needed, into the gradient
of the logits (one more read and write), which two matmuls fold into ``grad_hidden``,
``grad_weight`` and ``grad_bias`` before the next chunk. When the loss is reduced to a scalar the
gradients are computed during the forward (the reduction's denominator is known from the targets
alone) and the backward only scales them by the incoming gradient, so no chunk's logits are
computed twice; with ``reduction="none"`` the backward recomputes them, chunk by chunk.
"""

from typing import Optional

import torch

from .. import _checks as checks
from .._checks import state_dtype
from .cross_entropy import check_class_indices, loss_options, reduce_losses, row_grad, row_losses

_OP = "linear_cross_entropy"
# The default chunk: 1/28 of the tokens (so the chunk's logits are under 4% of the whole logits),
# at least MIN_CHUNK_TOKENS tokens, and at least DEFAULT_CHUNK_ELEMENTS logits for small
# vocabularies. Every chunk reads the whole head twice and reads and writes the whole grad_weight
# once, whatever its size, so thin chunks are memory-bound: on a 2-core Zen 4, 4096 x 1024 x 32000
# float32 took 9.9 s in 32-token chunks (the old default of 2**20 logits), 5.3 s in 147-token ones
# (1/28) and 5.0 s in 171-token ones, against 5.0 s unfused; bfloat16 3.6 s and 2.2 s (171), against
# 2.4 s.
CHUNKS = 28
DEFAULT_CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_TOKENS = 128


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, class_weight: Optional[torch.Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None, return_lse: bool = False,
                         chunk_size: Optional[int] = None):
    """``cross_entropy(linear(hidden, weight, bias), target, ...)`` for ``hidden`` (..., H),
    ``weight`` (V, H), ``bias`` (V,) and class-index ``target`` (...), computed ``chunk_size``
    tokens at a time (default: 1/28 of the tokens, at least 128 and at least 2**20 logits) so that no
    (tokens, V) tensor exists.

    The options are :func:`online_softmax.losses.cross_entropy`'s, with the class weights named
    ``class_weight`` (``weight`` is the linear layer's). Differentiable with respect to
    ``hidden``, ``weight`` and ``bias``; the logits are computed in the inputs' dtype (as
    ``F.linear``), the loss from them in float32 (float64 for float64)."""
    op = _OP
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        checks.tensor(t, name, op)
    checks.tensor(bias, "bias", op, optional=True)
    checks.tensor(class_weight, "class_weight", op, optional=True)
    for name, t in (("hidden", hidden), ("weight", weight)):
        checks.floating(t, name, op)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise checks.fail(op, f"hidden (..., H) and weight (V, H) must share H, got {list(hidden.shape)} and "
                              f"{list(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise checks.fail(op, f"bias must have shape [{vocab}], got {list(bias.shape)}")
    if target.dtype.is_floating_point or target.dtype not in (torch.int64, torch.uint8):
        raise checks.fail(op, f"target must hold class indices (int64), got {target.dtype}", TypeError)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise checks.fail(op, f"target must have hidden's shape without its last dim, "
                              f"{list(hidden.shape[:-1])}, got {list(target.shape)}")
    if class_weight is not None and (class_weight.dim() != 1 or class_weight.shape[0] != vocab):
        raise checks.fail(op, f"class_weight must have shape [{vocab}], got {list(class_weight.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias), ("class_weight", class_weight)):
        if t is not None and t.device != hidden.device:
            raise checks.fail(op, f"{name} is on {t.device} but hidden is on {hidden.device}")
    label_smoothing, z_loss, softcap = loss_options(op, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if chunk_size is None:
        tokens = hidden.numel() // max(1, hidden.shape[-1])
        chunk_size = max(-(-tokens // CHUNKS), MIN_CHUNK_TOKENS, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))
    checks.positive_int(chunk_size, "chunk_size", op)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = check_class_indices(target.reshape(-1).long(), vocab, ignore_index, op)
    cw = None if class_weight is None else class_weight.to(state_dtype(hidden.dtype))
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    loss, lse = _LinearCrossEntropy.apply(h, weight, bias, t, cw, options)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    loss = loss.to(hidden.dtype)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def _chunk_logits(h, weight, bias, softcap, out):
    """One chunk's logits, written into ``out`` (rows, V), and the factor their gradient is
    multiplied by under a softcap."""
    if bias is None:
        logits = torch.mm(h, weight.t(), out=out)
    else:
        logits = torch.addmm(bias, h, weight.t(), out=out)
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits.to(state_dtype(logits.dtype)) / softcap)
    return (capped * softcap).to(logits.dtype), 1.0 - capped * capped


def _chunks(n, size):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _accumulate(h, weight, bias, t, cw, options, row_scale, grads):
    """Every chunk's losses and, when ``row_scale`` is given (a function of the chunk's rows that
    returns their scale), the gradients folded into ``grads`` (grad_hidden, grad_weight, grad_bias,
    each None where not wanted)."""
    ignore_index, _reduction, eps, z, softcap, chunk = options
    n = h.shape[0]
    acc = state_dtype(h.dtype)
    # Every chunk's per-row results go into tensors allocated once: small tensors kept alive from
    # each iteration would sit between the chunks' large buffers and fragment the heap.
    losses, lses, w_ts = (torch.empty(n, dtype=acc, device=h.device) for _ in range(3))
    valids = torch.empty(n, dtype=torch.bool, device=h.device)
    # One logits buffer for every chunk (the gradient is written over it): a fresh chunk-sized
    # tensor per chunk left the allocator holding several of them at the peak.
    buffer = torch.empty(min(n, chunk), weight.shape[0], dtype=torch.result_type(h, weight), device=h.device)
    gh, gw, gb = grads
    for a, b in _chunks(n, chunk):
        logits, cap_grad = _chunk_logits(h[a:b], weight, bias, softcap, buffer[:b - a])
        loss, lse, w_t, valid, safe_t = row_losses(logits, t[a:b], cw, ignore_index, eps, z)
        losses[a:b], lses[a:b], w_ts[a:b], valids[a:b] = loss, lse, w_t, valid
        if row_scale is None:
            continue
        scale = torch.where(valid, row_scale(a, b), torch.zeros_like(lse))
        # The chunk's logits are ours and not needed again: the gradient is written over them.
        g = row_grad(logits, safe_t, lse, w_t, cw, scale, eps, z, inplace=True)
        del logits
        if cap_grad is not None:
            g.mul_(cap_grad)
        g = g.to(h.dtype)
        if gh is not None:
            torch.mm(g, weight, out=gh[a:b])
        if gw is not None:
            gw.addmm_(g.t(), h[a:b])
        if gb is not None:
            gb.add_(g.sum(0).to(gb.dtype))
    return losses, lses, w_ts, valids


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, t, cw, options):
        reduction = options[1]
        need = ctx.needs_input_grad[:3]
        eager = reduction != "none" and any(need)
        grads = (torch.zeros_like(h) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
                 torch.zeros_like(bias) if bias is not None and need[2] else None)
        denom = None
        if eager:
            # The mean's denominator needs only the targets, so each chunk's gradient is final as it
            # is computed (up to the incoming gradient, a scalar the backward multiplies in).
            valid = t != options[0]
            w_all = torch.ones(t.shape, dtype=state_dtype(h.dtype), device=h.device) if cw is None else \
                cw.gather(0, torch.where(valid, t, torch.zeros_like(t)))
            denom = torch.where(valid, w_all, torch.zeros_like(w_all)).sum() if reduction == "mean" else None

            def row_scale(a, b):
                one = torch.ones(b - a, dtype=w_all.dtype, device=h.device)
                return one / denom if denom is not None else one
        loss, lse, w_t, valid = _accumulate(h, weight, bias, t, cw, options, row_scale if eager else None, grads)
        out, _ = reduce_losses(loss, valid, w_t, reduction)
        ctx.options, ctx.eager = options, eager
        if eager:
            # Kept off save_for_backward: the backward scales them in place (a second copy of
            # grad_weight would be the largest allocation of the whole loss) and lets them go.
            ctx.grads = grads
        else:
            ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), t,
                                  cw if cw is not None else torch.empty(0))
            ctx.has_bias, ctx.has_cw = bias is not None, cw is not None
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError("online_softmax.linear_cross_entropy: its backward ran already (it computes the "
                                   "gradients during the forward); differentiate a new forward call instead of "
                                   "retain_graph=True")
            grads, ctx.grads = ctx.grads, None
            grads = [g.mul_(grad.to(g.dtype)) if g is not None else None for g in grads]
            return grads[0], grads[1], grads[2], None, None, None
        h, weight, bias, t, cw = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        cw = cw if ctx.has_cw else None
        need = ctx.needs_input_grad[:3]
        grads = (torch.zeros_like(h) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
                 torch.zeros_like(bias) if bias is not None and need[2] else None)
        g_rows = grad.to(state_dtype(h.dtype))
        _accumulate(h, weight, bias, t, cw, ctx.options, lambda a, b: g_rows[a:b], grads)
        return grads[0], grads[1], grads[2], None, None, None
