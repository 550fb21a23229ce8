"""The cross-entropy of ``hidden @ weight.T (+ bias)`` without ever holding the whole logits.

The tokens are cut into chunks; each chunk's logits (chunk x vocabulary) are computed, turned
into the chunk's losses (their (m, d), one read) and, when gradients are needed, into the gradient
of the logits (one more read and write), which two matmuls fold into ``grad_hidden``,
``grad_weight`` and ``grad_bias`` before the next chunk. When the loss is reduced to a scalar the
gradients are computed during the forward (the reduction's denominator is known from the targets
alone) and the backward only scales them by the incoming gradient, so no chunk's logits are
computed twice; with ``reduction="none"`` the backward recomputes them, chunk by chunk. With grad
mode off (``torch.no_grad()``, ``inference_mode``) no gradient is computed.

Where the chunked loop cannot run or cannot be differentiated again — torch.func's transforms, a
tracer (torch.compile, torch.export, jit.trace), meta or fake tensors — the loss is the plain
composition ``cross_entropy(linear(hidden, weight, bias), target)`` (the whole logits exist), with
the same values, dynamic shapes and every derivative. A double backward of the chunked form
(``create_graph=True``) recomputes the gradient through that composition, so second derivatives are
exact there too.
"""

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD

from .. import _checks as checks
from .._checks import state_dtype
from .._dtensor import is_dtensor
from .cross_entropy import _symbolic, check_class_indices, cross_entropy, loss_options, reduce_losses, row_grad, \
    row_losses

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
    ``F.linear``), the loss from them in float32 (float64 for float64).

    DTensors: a head split by vocabulary rows over a mesh dim, see
    :func:`online_softmax.distributed.dtensor_losses.linear_cross_entropy`."""
    if is_dtensor(weight) or is_dtensor(hidden):
        from ..distributed import dtensor_losses

        return dtensor_losses.linear_cross_entropy(
            hidden, weight, target, bias, class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, return_lse=return_lse,
            chunk_size=chunk_size)
    loss, lse = loss_and_lse(hidden, weight, target, bias, class_weight=class_weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                             chunk_size=chunk_size)
    loss = loss.to(hidden.dtype)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def loss_and_lse(hidden, weight, target, bias=None, *, class_weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None):
    """:func:`linear_cross_entropy`'s checked arguments, loss and flat lse, the loss still in its
    accumulation dtype (float32 for half inputs): transformers' losses are float32 whatever the
    model's dtype."""
    op = _OP
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        checks.tensor(t, name, op)
    checks.tensor(bias, "bias", op, optional=True)
    checks.tensor(class_weight, "class_weight", op, optional=True)
    vocab = check_head(op, hidden, weight, bias)
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
    composed = _composed(hidden, weight, bias)
    chunk_size = token_chunk(op, hidden, vocab, chunk_size, composed)
    if class_weight is not None and class_weight.requires_grad and torch.is_grad_enabled():
        raise checks.fail(op, "class_weight cannot have requires_grad=True: the loss is not differentiable with "
                              "respect to it (as torch's nll_loss); pass class_weight.detach()", RuntimeError)
    t = check_class_indices(target.reshape(-1).long(), vocab, ignore_index, op)
    cw = None if class_weight is None else class_weight.to(state_dtype(hidden.dtype))
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    if composed:
        loss, lse = _composition(hidden.reshape(-1, hidden.shape[-1]), weight, bias, t, cw, options)
    else:
        h = hidden.reshape(-1, hidden.shape[-1])
        grad_mode = torch.is_grad_enabled()
        need = tuple(grad_mode and p is not None and p.requires_grad for p in (h, weight, bias))
        loss, lse = _LinearCrossEntropy.apply(h, weight, bias, t, cw, options, need, [])
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss, lse


def check_head(op, hidden, weight, bias) -> int:
    """The checks of a vocabulary head's arguments, hidden (..., H), weight (V, H) and bias (V,),
    shared by the linear_* losses; returns V."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        checks.floating(t, name, op)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise checks.fail(op, f"hidden (..., H) and weight (V, H) must share H, got {list(hidden.shape)} and "
                              f"{list(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise checks.fail(op, f"bias must have shape [{vocab}], got {list(bias.shape)}")
    return vocab


def token_chunk(op, hidden, vocab, chunk_size, composed) -> int:
    """The chunk of tokens: chunk_size, checked, or the default (see CHUNKS)."""
    if chunk_size is None and composed:
        chunk_size = 1  # unused: the composition has no chunks (and the token count may be symbolic)
    elif chunk_size is None:
        tokens = hidden.numel() // max(1, hidden.shape[-1])
        chunk_size = max(-(-tokens // CHUNKS), MIN_CHUNK_TOKENS, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))
    checks.positive_int(chunk_size, "chunk_size", op)
    return chunk_size


def _composed(*tensors) -> bool:
    """Whether the loss must be the plain composition rather than the chunked loop: under
    torch.func's transforms (whose grad, vmap and jvp need a differentiable graph) and wherever
    there are no values to loop over (meta, fake, traced), and for dual tensors."""
    if torch._C._are_functorch_transforms_active():
        return True
    # Dual tensors (forward-mode AD outside torch.func) need a tangent the chunked loop has no rule for.
    if torch.compiler.is_compiling():
        return True
    return any(t is not None and (_symbolic(t) or fwAD.unpack_dual(t).tangent is not None) for t in tensors)


def _composition(h, weight, bias, t, cw, options):
    """(loss, lse) of rows h (N, H) as cross_entropy(linear(h, weight, bias), t): every derivative
    (double backward, torch.func) and dynamic shapes under torch.export, at the cost of the whole
    (N, V) logits."""
    ignore_index, reduction, eps, z, softcap, _chunk = options
    logits = torch.nn.functional.linear(h, weight, bias)
    return cross_entropy(logits, t, cw, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps,
                         z_loss=z, softcap=softcap, return_lse=True)


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
        loss, lse, m, d, w_t, valid, safe_t = row_losses(logits, t[a:b], cw, ignore_index, eps, z)
        losses[a:b], lses[a:b], w_ts[a:b], valids[a:b] = loss, lse, w_t, valid
        if row_scale is None:
            continue
        scale = torch.where(valid, row_scale(a, b), torch.zeros_like(lse))
        # The chunk's logits are ours and not needed again: the gradient is written over them.
        g = row_grad(logits, safe_t, m, d, w_t, cw, scale, eps, z, lse=lse, inplace=True)
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
    """The chunked loss of rows h (N, H). ``need``: which of (h, weight, bias) get a gradient (grad
    mode on and requires_grad), decided by the caller, so that no gradient is computed under
    no_grad or inference_mode. Outputs (loss, lse). When the loss is a scalar the gradients are
    computed during the forward and handed to the backward through ``stash`` (a list): as outputs
    they would stay referenced by the node (its non-differentiable outputs), so that autograd
    would copy grad_weight rather than take it."""

    @staticmethod
    def forward(h, weight, bias, t, cw, options, need, stash):
        reduction = options[1]
        eager = reduction != "none" and any(need)
        grads = (torch.zeros_like(h) if eager and need[0] else None,
                 torch.zeros_like(weight) if eager and need[1] else None,
                 torch.zeros_like(bias) if eager and bias is not None and need[2] else None)
        row_scale = None
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
        loss, lse, w_t, valid = _accumulate(h, weight, bias, t, cw, options, row_scale, grads)
        out, _ = reduce_losses(loss, valid, w_t, reduction)
        stash.append(grads)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, bias, t, cw, options, need, stash = inputs
        _out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.options, ctx.need = options, need
        ctx.eager = options[1] != "none" and any(need)
        # Kept off save_for_backward: the backward scales them in place (a second copy of
        # grad_weight would be the largest allocation of the whole loss) and lets them go.
        ctx.grads = stash.pop() if ctx.eager else None
        stash.clear()
        # The inputs themselves (no copy): the backward of reduction="none" recomputes from them,
        # and a double backward differentiates the composition over them.
        ctx.save_for_backward(h, weight, bias, t, cw)

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        h, weight, bias, t, cw = ctx.saved_tensors
        need = ctx.need
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable. The chunked gradients are
            # not a graph, so differentiate the composition over the saved inputs instead.
            ctx.grads = None
            inputs = [p for p, n in zip((h, weight, bias), need) if n]
            with torch.enable_grad():
                loss, _lse = _composition(h, weight, bias, t, cw, ctx.options)
                found = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
            grads = [next(found) if n else None for n in need]
            return grads[0], grads[1], grads[2], None, None, None, None, None
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError("online_softmax.linear_cross_entropy: its backward ran already (it computes the "
                                   "gradients during the forward); differentiate a new forward call instead of "
                                   "retain_graph=True")
            grads, ctx.grads = ctx.grads, None
            grads = [g.mul_(grad.to(g.dtype)) if g is not None else None for g in grads]
            return grads[0], grads[1], grads[2], None, None, None, None, None
        grads = (torch.zeros_like(h) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
                 torch.zeros_like(bias) if bias is not None and need[2] else None)
        g_rows = grad.to(state_dtype(h.dtype))
        _accumulate(h, weight, bias, t, cw, ctx.options, lambda a, b: g_rows[a:b], grads)
        return grads[0], grads[1], grads[2], None, None, None, None, None
