"""Knowledge distillation from logits: the divergence of a student's softmax from a teacher's
(forward KL, reverse KL or the generalized Jensen-Shannon divergence), optionally mixed with the
student's cross-entropy against hard labels.

The forward reads each row of both logits once (the ``distillation_forward`` op: the two online
states and a few running sums; ``jsd`` reads a second time, from cache) and keeps nothing of their
size; the backward writes the gradient in one read of both (``distillation_backward``). The float64
oracle is ``online_softmax.reference.distillation``.

Under torch.func's transforms, forward-mode AD, torch.compile and torch.export, and for a gradient
that must itself be differentiable (``create_graph=True``), the loss is the plain composition of
torch ops instead (every derivative, at the cost of the log-softmaxes).
"""

import math
from typing import Optional

import torch

from .. import _checks as checks
from .._checks import state_dtype
from ..ops import check_distillation, check_distillation_options
from .linear_cross_entropy import _composed

_ops = torch.ops.online_softmax
_OP = "distillation_loss"
_REDUCTIONS = ("none", "mean", "sum")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
                      *, kind: str = "kl", beta: float = 0.5, temperature: float = 1.0, hard_weight: float = 0.5,
                      ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The distillation loss of ``student_logits`` against ``teacher_logits`` (both ``(..., vocab)``,
    one dtype), with ``p = softmax(student / temperature)`` and ``q = softmax(teacher /
    temperature)`` per position:

    - ``kind="kl"``: ``KL(q || p)`` (Hinton's loss, without his ``temperature**2`` factor);
    - ``kind="reverse_kl"``: ``KL(p || q)``;
    - ``kind="jsd"``: ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = beta q + (1 - beta) p``.

    With ``target`` (int64 class indices of shape ``...``), a position's loss is ``hard_weight *
    cross_entropy(student, target) + (1 - hard_weight) * divergence`` (the cross-entropy at
    temperature 1), and a position whose target is ``ignore_index`` has loss 0 and is not counted.
    ``reduction``: ``"mean"`` (the sum over the positions that count: every position without a
    target), ``"sum"`` or ``"none"`` (shape ``...``). The result has the student's dtype.

    Differentiable with respect to ``student_logits`` only: a ``teacher_logits`` that requires grad
    raises (pass ``teacher_logits.detach()``). A position where either distribution does not exist
    (NaN, +inf, all -inf logits) gives NaN."""
    op = _OP
    checks.tensor(student_logits, "student_logits", op)
    checks.tensor(teacher_logits, "teacher_logits", op)
    checks.tensor(target, "target", op, optional=True)
    checks.floating(student_logits, "student_logits", op)
    checks.floating(teacher_logits, "teacher_logits", op)
    if student_logits.dim() < 1:
        raise checks.fail(op, "student_logits must have at least 1 dimension (..., vocab), got a 0-d tensor")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise checks.fail(op, f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}",
                          ValueError if isinstance(reduction, str) else TypeError)
    ignore_index = checks.integer(ignore_index, "ignore_index", op, minimum=-(2 ** 63))
    check_distillation_options(op, kind, beta, temperature, hard_weight)
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise checks.fail(op, "teacher_logits requires grad, but the loss is not differentiable with respect to "
                              "it: pass teacher_logits.detach()")
    if student_logits.device != teacher_logits.device:
        raise checks.fail(op, f"teacher_logits is on {teacher_logits.device} but student_logits is on "
                              f"{student_logits.device}")
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    rows = math.prod(lead)
    s = student_logits.reshape(rows, vocab)
    t = teacher_logits.reshape(rows, vocab) if teacher_logits.shape == student_logits.shape else teacher_logits
    tgt = None
    if target is not None:
        if target.dtype != torch.int64:
            raise checks.fail(op, f"target must be an int64 tensor of class indices, got {target.dtype}", TypeError)
        if target.shape != lead:
            raise checks.fail(op, f"target must have shape {list(lead)} (student_logits' without vocab), got "
                                  f"{list(target.shape)}")
        if target.device != student_logits.device:
            raise checks.fail(op, f"target is on {target.device} but student_logits is on {student_logits.device}")
        tgt = target.reshape(rows)
    check_distillation(op, s, t, tgt, kind, beta, temperature, hard_weight, student_name="student_logits",
                       teacher_name="teacher_logits")
    options = (kind, float(beta), float(temperature), float(hard_weight), int(ignore_index))
    if _composed(s, t):
        losses = composed_rows(s, t, tgt, *options)
    else:
        losses, _stats = _DistillationRows.apply(s, t, tgt, *options)
    if reduction == "none":
        out = losses.reshape(lead)
    elif reduction == "sum":
        out = losses.sum()
    else:
        count = rows if tgt is None else (tgt != ignore_index).sum()
        out = losses.sum() / count
    return out.to(student_logits.dtype)


class _DistillationRows(torch.autograd.Function):
    """Each row's loss (rows,) and the forward's stats (not differentiable) through the
    distillation_forward op; the gradient with respect to the student through
    distillation_backward (one read of both logits, from the stats). Where the gradient must itself
    be differentiable (create_graph=True), it is the composition's, over the saved inputs."""

    @staticmethod
    def forward(s, t, target, kind, beta, temperature, hard_weight, ignore_index):
        return _ops.distillation_forward(s, t, target, kind, beta, temperature, hard_weight, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, t, target = inputs[:3]
        ctx.options = tuple(inputs[3:])
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(s, t, target, output[1])

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        s, t, target, stats = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError(f"online_softmax.{_OP}: the loss is not differentiable with respect to teacher_logits; "
                               "pass teacher_logits.detach()")
        grad_loss = grad_loss.to(stats.dtype)
        if torch.is_grad_enabled():
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(composed_rows(s, t, target, *ctx.options), s, grad_loss,
                                              create_graph=True)
        else:
            grad = _ops.distillation_backward(grad_loss.contiguous(), s, t, target, stats, *ctx.options)
        return grad, None, None, None, None, None, None, None


def composed_rows(s: torch.Tensor, t: torch.Tensor, target: Optional[torch.Tensor], kind: str, beta: float,
                  temperature: float, hard_weight: float, ignore_index: int) -> torch.Tensor:
    """Each row's loss (rows,) of s, t (rows, vocab) in the accumulation dtype, as torch ops that
    every transform differentiates (the fused ops' semantics; not their accuracy for nearly equal
    distributions, which they lose to the log-softmaxes' rounding)."""
    acc = state_dtype(s.dtype)
    inv_t = 1.0 / temperature
    log_p = torch.log_softmax(s.to(acc) * inv_t, -1)
    log_q = torch.log_softmax(t.to(acc) * inv_t, -1)

    def kl(log_a, log_b):  # sum a (log a - log b), a zero-probability term being 0
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if kind == "kl":
        div = kl(log_q, log_p)
    elif kind == "reverse_kl":
        div = kl(log_p, log_q)
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        div = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    if target is None:
        return div
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    x = s.to(acc)
    ce = torch.logsumexp(x, -1) - x.gather(-1, safe[:, None])[:, 0]
    loss = hard_weight * ce + (1 - hard_weight) * div
    return torch.where(keep, loss, torch.zeros_like(loss))
