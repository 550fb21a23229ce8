"""Knowledge distillation from both models' hidden states: the divergence between the teacher's and
the student's softmax over the vocabulary without either model's whole logits.

The positions are cut into chunks as :func:`online_softmax.linear_cross_entropy` cuts them. Each
chunk's student and teacher logits (chunk x vocabulary) are computed by the heads' matmuls and read
by the distillation_forward op (each row's online states of both, the divergence and, with a target,
the hard-label cross-entropy); when the loss is reduced to a scalar the gradient of the chunk's
student logits is written over them at once by distillation_backward_ (the mean's denominator is
known from the targets) and two matmuls fold it into ``grad_hidden``, ``grad_weight`` and
``grad_bias``. The backward then only scales those by the incoming gradient. With
``reduction="none"`` the backward recomputes each chunk's logits instead. So at most one chunk of
each model's logits exists at a time.

The teacher is a constant: nothing is differentiated with respect to its hidden states or head (a
teacher tensor that requires grad under grad mode is an error, not a silent None gradient).

Where the chunked loop cannot run or cannot be differentiated again (torch.func's transforms,
tracers, meta or fake tensors, dual tensors) the loss is the composition over the whole logits,
:func:`online_softmax.distillation_loss` of the two heads' outputs; a double backward of the chunked
form differentiates that composition over the saved inputs.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks as checks
from .._checks import state_dtype
from ..ops import check_distillation_options
from .distillation import distillation_loss
from .linear_cross_entropy import _chunk_logits, _chunks, _composed, check_head, token_chunk

_OP = "linear_distillation_loss"
_ops = torch.ops.online_softmax
_REDUCTIONS = ("none", "mean", "sum")
# The default chunk holds 2**22 logits per model (16 MiB each in float32), at least 16 positions.
# Two models' chunks are alive at once, and the heads here are usually the whole memory of the
# step (a 128256 x 256 head is 125 MiB), so linear_cross_entropy's larger default chunk would add a
# third of that; thinner chunks than this re-read the heads and grad_weight too often.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_POSITIONS = 16


def linear_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                             teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                             student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                             kind: str = "kl", beta: float = 0.5, temperature: float = 1.0, hard_weight: float = 0.5,
                             ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None):
    """:func:`online_softmax.distillation_loss` of the student's logits
    ``student_hidden @ student_weight.T (+ student_bias)`` against the teacher's
    ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``, ``chunk_size`` positions at a time, so
    that neither model's (positions, V) logits exist.

    ``student_hidden`` (..., H_s) and ``teacher_hidden`` (..., H_t) hold the same positions; the
    heads are (V, H_s) and (V, H_t) over the same vocabulary. ``kind`` "kl" (KL(teacher ||
    student)), "reverse_kl" or "jsd" (with ``beta``), both softmaxes at ``temperature``; with a
    class-index ``target`` (...), each position's loss is ``hard_weight`` x the student's
    cross-entropy (temperature 1) + (1 - ``hard_weight``) x the divergence, and positions whose target
    is ``ignore_index`` count for nothing. ``reduction``: "mean" over the positions that count, "sum"
    or "none" (shape ...), in the student's dtype (as linear_cross_entropy). Differentiable with
    respect to the student's hidden states, weight and bias. The default chunk holds 2**22 logits
    of each model (at least 16 positions)."""
    op = _OP
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        checks.tensor(t, name, op)
    for name, t in (("student_bias", student_bias), ("teacher_bias", teacher_bias), ("target", target)):
        checks.tensor(t, name, op, optional=True)
    vocab = _check_heads(op, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                         teacher_bias)
    check_distillation_options(op, kind, beta, temperature, hard_weight)
    ignore_index = checks.integer(ignore_index, "ignore_index", op, minimum=-(2 ** 63))
    if reduction not in _REDUCTIONS:
        raise checks.fail(op, f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    positions = tuple(student_hidden.shape[:-1])
    if target is not None:
        if target.dtype != torch.int64:
            raise checks.fail(op, f"target must hold class indices (int64), got {target.dtype}", TypeError)
        if tuple(target.shape) != positions:
            raise checks.fail(op, f"target must have student_hidden's shape without its last dim, {list(positions)}, "
                                  f"got {list(target.shape)}")
    for name, t in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight), ("student_bias", student_bias),
                    ("teacher_bias", teacher_bias), ("target", target)):
        if t is not None and t.device != student_hidden.device:
            raise checks.fail(op, f"{name} is on {t.device} but student_hidden is on {student_hidden.device}")
    if torch.is_grad_enabled():
        for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias)):
            if t is not None and t.requires_grad:
                raise checks.fail(op, f"{name} requires grad, but the loss is not differentiable with respect to the "
                                      f"teacher: pass {name}.detach() (or run the teacher under torch.no_grad())",
                                  RuntimeError)
    options = (kind, float(beta), float(temperature), float(hard_weight), ignore_index, reduction)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    t = None if target is None else target.reshape(-1)
    if _composed(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
        loss = _composition(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, t, options)
    else:
        if chunk_size is None:
            chunk_size = max(MIN_CHUNK_POSITIONS, CHUNK_ELEMENTS // max(1, vocab))
        chunk = token_chunk(op, student_hidden, vocab, chunk_size, False)
        need = tuple(torch.is_grad_enabled() and p is not None and p.requires_grad
                     for p in (hs, student_weight, student_bias))
        loss = _LinearDistillation.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, t,
                                         options + (chunk,), need, [])
    loss = loss.to(torch.promote_types(student_hidden.dtype, student_weight.dtype))
    return loss.reshape(positions) if reduction == "none" else loss


def _check_heads(op, hs, ws, bs, ht, wt, bt) -> int:
    vocab = check_head(op, hs, ws, bs)
    if check_head(op, ht, wt, bt) != vocab:
        raise checks.fail(op, f"student_weight and teacher_weight must cover the same vocabulary, got {vocab} and "
                              f"{wt.shape[0]} rows")
    if tuple(hs.shape[:-1]) != tuple(ht.shape[:-1]):
        raise checks.fail(op, f"student_hidden and teacher_hidden must hold the same positions, got "
                              f"{list(hs.shape)} and {list(ht.shape)}")
    return vocab


def _composition(hs, ws, bs, ht, wt, bt, t, options):
    """The loss over both models' whole logits: every derivative (double backward, torch.func) at the
    cost of the (positions, V) logits."""
    kind, beta, temperature, hard_weight, ignore_index, reduction = options[:6]
    with torch.no_grad():
        teacher = F.linear(ht, wt, bt).to(torch.promote_types(hs.dtype, ws.dtype))
    return distillation_loss(F.linear(hs, ws, bs), teacher, t, kind=kind, beta=beta, temperature=temperature,
                             hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction)


def _accumulate(tensors, t, options, row_scale, grads):
    """Every chunk's losses (positions,) and, when ``row_scale`` is given (a function of the chunk's
    rows returning their incoming gradient), the student's gradients folded into ``grads``
    (grad_hidden, grad_weight, grad_bias, each None where not wanted)."""
    hs, ws, bs, ht, wt, bt = tensors
    kind, beta, temperature, hard_weight, ignore_index, _reduction, chunk = options
    n = hs.shape[0]
    dtype = torch.promote_types(hs.dtype, ws.dtype)
    losses = torch.empty(n, dtype=state_dtype(dtype), device=hs.device)
    # One buffer per model for every chunk (the student's gradient is written over its logits).
    rows = min(n, chunk)
    student_buffer = torch.empty(rows, ws.shape[0], dtype=dtype, device=hs.device)
    teacher_dtype = torch.promote_types(ht.dtype, wt.dtype)
    teacher_buffer = torch.empty(rows, wt.shape[0], dtype=teacher_dtype, device=hs.device)
    gh, gw, gb = grads
    for a, b in _chunks(n, chunk):
        student, _ = _chunk_logits(hs[a:b], ws, bs, None, student_buffer[:b - a])
        with torch.no_grad():
            teacher, _ = _chunk_logits(ht[a:b], wt, bt, None, teacher_buffer[:b - a])
        teacher = teacher.to(dtype)  # the op reads both in one dtype; a copy only for a teacher of another dtype
        ta = None if t is None else t[a:b]
        loss, stats = _ops.distillation_forward(student, teacher, ta, kind, beta, temperature, hard_weight,
                                                ignore_index)
        losses[a:b] = loss
        if row_scale is None:
            continue
        # The chunk's logits are ours and not needed again: the gradient is written over them.
        _ops.distillation_backward_(student, row_scale(a, b), teacher, ta, stats, kind, beta, temperature,
                                    hard_weight, ignore_index)
        g = student.to(hs.dtype)
        del student
        if gh is not None:
            torch.mm(g, ws.to(g.dtype), out=gh[a:b])
        if gw is not None:
            gw.addmm_(g.t(), hs[a:b])
        if gb is not None:
            gb.add_(g.sum(0).to(gb.dtype))
    return losses


def _counted(t, n, ignore_index, dtype, device):
    """The number of positions that count (those whose target is not ignore_index; all without a
    target), in the accumulation dtype."""
    if t is None:
        return torch.tensor(float(n), dtype=dtype, device=device)
    return (t != ignore_index).sum().to(dtype)


def _reduce(losses, t, ignore_index, reduction):
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / _counted(t, losses.numel(), ignore_index, losses.dtype,
                                                             losses.device)


class _LinearDistillation(torch.autograd.Function):
    """The chunked loss of the student's rows hs (N, H_s) against the teacher's ht (N, H_t).
    ``need``: which of (hs, weight, bias) get a gradient. As in linear_cross_entropy, a scalar loss
    computes the gradients during the forward and hands them to the backward through ``stash``."""

    @staticmethod
    def forward(hs, ws, bs, ht, wt, bt, t, options, need, stash):
        reduction, ignore_index = options[5], options[4]
        eager = reduction != "none" and any(need)
        grads = (torch.zeros_like(hs) if eager and need[0] else None,
                 torch.zeros_like(ws) if eager and need[1] else None,
                 torch.zeros_like(bs) if eager and bs is not None and need[2] else None)
        row_scale = None
        if eager:
            acc = state_dtype(torch.promote_types(hs.dtype, ws.dtype))
            scale = torch.ones((), dtype=acc, device=hs.device)
            if reduction == "mean":
                scale = scale / _counted(t, hs.shape[0], ignore_index, acc, hs.device)

            def row_scale(a, b):
                return scale.expand(b - a).contiguous()
        losses = _accumulate((hs, ws, bs, ht, wt, bt), t, options, row_scale, grads)
        stash.append(grads)
        return _reduce(losses, t, ignore_index, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hs, ws, bs, ht, wt, bt, t, options, need, stash = inputs
        ctx.options, ctx.need = options, need
        ctx.eager = options[5] != "none" and any(need)
        ctx.grads = stash.pop() if ctx.eager else None
        stash.clear()
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, t)

    @staticmethod
    def backward(ctx, grad):
        hs, ws, bs, ht, wt, bt, t = ctx.saved_tensors
        need = ctx.need
        none = (None,) * 7
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the composition over the saved inputs.
            ctx.grads = None
            inputs = [p for p, n in zip((hs, ws, bs), need) if n]
            with torch.enable_grad():
                loss = _composition(hs, ws, bs, ht, wt, bt, t, ctx.options)
                found = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
            grads = [next(found) if n else None for n in need]
            return (*grads, *none)
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError(f"online_softmax.{_OP}: its backward ran already (it computes the gradients during "
                                   "the forward); differentiate a new forward call instead of retain_graph=True")
            grads, ctx.grads = ctx.grads, None
            grads = [g.mul_(grad.to(g.dtype)) if g is not None else None for g in grads]
            return (*grads, *none)
        grads = (torch.zeros_like(hs) if need[0] else None, torch.zeros_like(ws) if need[1] else None,
                 torch.zeros_like(bs) if bs is not None and need[2] else None)
        g_rows = grad.to(state_dtype(torch.promote_types(hs.dtype, ws.dtype))).contiguous()
        _accumulate((hs, ws, bs, ht, wt, bt), t, ctx.options, lambda a, b: g_rows[a:b], grads)
        return (*grads, *none)
