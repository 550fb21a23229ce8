"""Cross-entropy on the online state: the loss of a row is ``log d + m - x[target]``.

``cross_entropy`` has ``torch.nn.functional.cross_entropy``'s semantics (class dim 1, class-index
and probability targets, ``weight``, ``ignore_index``, ``label_smoothing``, every ``reduction``)
and adds what language-model training uses: ``z_loss`` (PaLM's ``z * lse**2`` per row),
``softcap`` (Gemma 2's ``softcap * tanh(x / softcap)`` on the logits) and ``return_lse``.

With class-index targets the forward reads the logits once, through the ``stats`` op (the row's
``(m, d)``; label smoothing adds a row sum), and keeps no logits-sized tensor: the backward
recomputes the softmax from the logits and the saved ``lse`` in one read and one write (the
``forward`` op), then subtracts the target's one-hot. torch's own keeps the whole log-softmax
between the two. Probability targets go through the materialized log-softmax.
"""

from typing import Optional

import torch

from .. import _checks as checks
from .._checks import state_dtype

_ops = torch.ops.online_softmax
_REDUCTIONS = ("none", "mean", "sum")
_OP = "cross_entropy"


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                  return_lse: bool = False, inplace_backward: bool = False):
    """``torch.nn.functional.cross_entropy(input, target, ...)`` with the same arguments and results,
    computed from each row's online (max, sumexp).

    Beyond torch: ``z_loss`` adds ``z_loss * lse**2`` to the loss of every row that is not ignored
    (unweighted, before the reduction); ``softcap`` replaces the logits by
    ``softcap * tanh(logits / softcap)`` first; ``return_lse=True`` returns ``(loss, lse)``, with
    ``lse`` the per-row logsumexp of the (capped) logits in the target's shape (float32 for half
    inputs), not differentiable. ``size_average`` and ``reduce`` are torch's deprecated forms of
    ``reduction``, accepted as torch accepts them.

    ``inplace_backward=True`` (flash-attention's xentropy option) makes the backward write the
    gradient over ``input``'s own storage instead of a new tensor, so a logits-sized buffer less
    exists at the peak; ``input`` holds the gradient afterwards, and its version counter moves, so
    autograd raises if another node saved it for its own backward. It applies to class-index targets
    with the class dim last and contiguous (2-D ``(N, C)`` or 1-D ``(C,)``) and no ``softcap``
    (whose tanh is an intermediate anyway); elsewhere, and under torch.compile, the backward is out of
    place as usual."""
    op = _OP
    checks.tensor(input, "input", op)
    checks.tensor(target, "target", op)
    checks.floating(input, "input", op)
    checks.tensor(weight, "weight", op, optional=True)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    label_smoothing, z_loss, softcap = loss_options(op, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if not isinstance(inplace_backward, bool):
        raise checks.fail(op, f"inplace_backward must be a bool, got {type(inplace_backward).__name__}", TypeError)
    x, n_classes = _rows(input, op)
    if weight is not None:
        checks.floating(weight, "weight", op)
        if weight.dim() != 1 or weight.shape[0] != n_classes:
            raise checks.fail(op, f"weight must be a 1-D tensor of the {n_classes} classes, got shape "
                                  f"{list(weight.shape)}")
        if weight.device != input.device:
            raise checks.fail(op, f"weight is on {weight.device} but input is on {input.device}")
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if target.dtype.is_floating_point:
        loss, lse = _probability_targets(input, x, target, weight, reduction, label_smoothing, z_loss, n_classes)
    else:
        t = _class_targets(input, target, n_classes, ignore_index)
        w = None if weight is None else weight.to(state_dtype(input.dtype))
        # In place only where x is input's own storage: the rows are a view of it.
        inplace = inplace_backward and softcap is None and input.dim() <= 2 and input.is_contiguous()
        loss, lse = _ClassTargetLoss.apply(x, t, w, ignore_index, reduction, label_smoothing, z_loss, inplace)
        loss = (loss.reshape(target.shape) if reduction == "none" else loss).to(input.dtype)
    if return_lse:
        return loss, lse.detach().reshape(_target_shape(input))
    return loss


def loss_options(op: str, reduction, ignore_index, label_smoothing, z_loss, softcap):
    """The options every cross-entropy shares, checked: returns (label_smoothing, z_loss, softcap)
    as floats (softcap None when off)."""
    if reduction not in _REDUCTIONS:
        raise checks.fail(op, f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    checks.integer(ignore_index, "ignore_index", op, minimum=-(1 << 62))
    label_smoothing = checks.real(label_smoothing, "label_smoothing", op)
    if not 0.0 <= label_smoothing <= 1.0:
        raise checks.fail(op, f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    z_loss = checks.real(z_loss, "z_loss", op)
    if softcap is not None:
        softcap = checks.positive_finite(softcap, "softcap", op)
    return label_smoothing, z_loss, softcap


def _target_shape(input: torch.Tensor):
    return (input.shape[0],) + tuple(input.shape[2:]) if input.dim() >= 2 else ()


def _rows(input: torch.Tensor, op: str):
    """The logits as rows (tokens, classes): class dim 1 moved last (a copy only when it is not
    already last), and the number of classes."""
    if input.dim() == 0:
        raise checks.fail(op, "input must have a class dimension (1-D (C,) or (N, C, ...)), got a 0-d tensor")
    if input.dim() == 1:
        return input.reshape(1, -1), input.shape[0]
    n_classes = input.shape[1]
    x = input.movedim(1, -1) if input.dim() > 2 else input
    return x.reshape(-1, n_classes), n_classes


def _class_targets(input, target, n_classes, ignore_index) -> torch.Tensor:
    op = _OP
    if target.dtype not in (torch.int64, torch.uint8):
        raise checks.fail(op, f"target of class indices must be int64 (or uint8), got {target.dtype}", TypeError)
    if tuple(target.shape) != _target_shape(input):
        raise checks.fail(op, f"target must have shape {list(_target_shape(input))} for input of shape "
                              f"{list(input.shape)} (class dim 1), got {list(target.shape)}")
    if target.device != input.device:
        raise checks.fail(op, f"target is on {target.device} but input is on {input.device}")
    return check_class_indices(target.reshape(-1).long(), n_classes, ignore_index, op)


def check_class_indices(t: torch.Tensor, n_classes: int, ignore_index: int, op: str) -> torch.Tensor:
    """``t`` after checking that every target but ignore_index is a class: an IndexError as in
    torch otherwise (one host sync; skipped under torch.compile, which cannot branch on data)."""
    if t.numel() and not torch.compiler.is_compiling():
        bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
        if bool(bad.any()):
            raise IndexError(f"online_softmax.{op}: Target {int(t[bad][0])} is out of bounds (classes "
                             f"[0, {n_classes}), ignore_index {ignore_index}).")
    return t


def _lse(m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return m + torch.log(d)


def row_losses(x, t, w, ignore_index: int, eps: float, z: float):
    """Per-row losses of class-index targets on rows x (N, C), from one read of x (the stats op;
    label smoothing adds a row sum). Returns (loss (N,) zero on ignored rows, lse (N,), the
    target weights w_t (N,), valid (N,) bool, the targets with ignored rows set to 0)."""
    acc = state_dtype(x.dtype)
    n_rows, n_classes = x.shape
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    if n_classes == 0 or n_rows == 0:
        m = torch.full((n_rows,), float("-inf"), dtype=acc, device=x.device)
        d = torch.zeros((n_rows,), dtype=acc, device=x.device)
    else:
        m, d = _ops.stats(x, 1, 1.0)
    lse = _lse(m, d)
    x_t = x.gather(1, safe_t[:, None])[:, 0].to(acc) if n_classes else lse.new_zeros(n_rows)
    w_t = torch.ones_like(lse) if w is None else w.gather(0, safe_t)
    wx = w_sum = None
    if eps:
        w_sum = float(n_classes) if w is None else w.sum()
        wx = x.sum(1, dtype=acc) if w is None else (x.to(acc) * w).sum(1)
    loss = combine_row_losses(lse, x_t, w_t, valid, eps, z, n_classes, wx, w_sum)
    return loss, lse, w_t, valid, safe_t


def combine_row_losses(lse, x_t, w_t, valid, eps: float, z: float, n_classes: int, wx=None, w_sum=None):
    """A row's loss from its pieces: its lse, target logit x_t and target weight w_t, and, under
    label smoothing, the weighted sum of its logits wx = sum_c w_c x_c and the classes' total
    weight w_sum. Zero on ignored rows.

        loss = (1-eps) w_t (lse - x_t) + eps/C (lse w_sum - wx) + z lse^2
    """
    loss = (1.0 - eps) * w_t * (lse - x_t) if eps != 1.0 else torch.zeros_like(lse)
    if eps:
        # -sum_c w_c log p_c = lse * sum_c w_c - sum_c w_c x_c, divided by C (torch's smoothing).
        loss = loss + eps / n_classes * (lse * w_sum - wx)
    if z:
        loss = loss + z * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def row_grad(x, safe_t, lse, w_t, w, scale, eps: float, z: float, *, probs=None, has_target=None,
             n_classes=None, w_sum=None, inplace: bool = False) -> torch.Tensor:
    """d(sum_i scale_i * loss_i) / dx for rows x (N, C): the cross_entropy_backward op (softmax
    recomputed from x and lse, the target's one-hot and the smoothing term subtracted, in one read
    of x and one write, in x's dtype). ``scale`` is 0 on ignored rows.

        d loss_i / d x_c = (1-eps) w_t (p_c - [c = t]) + eps/C (W p_c - w_c) + 2 z lse p_c

    For a shard of the classes (vocabulary-parallel): ``probs`` are the shard's probabilities
    under the whole row's state (in the accumulation dtype; the gradient is written into them),
    ``has_target`` says which rows' targets lie in the shard (at ``safe_t``), and
    ``n_classes``/``w_sum`` are the whole vocabulary's C and W. ``inplace``: the gradient is written
    over x (contiguous) and x is returned."""
    n_classes = x.shape[1] if n_classes is None else n_classes
    if w_sum is None:
        w_sum = float(n_classes) if w is None else w.sum()
    coef_p = scale * ((1.0 - eps) * w_t + eps / n_classes * w_sum + 2.0 * z * lse)
    onehot = (1.0 - eps) * scale * w_t
    smooth = (eps / n_classes) * scale if eps else None
    if probs is None:
        # The fused kernel: one read of x, one write of the gradient in x's dtype.
        if inplace:
            _ops.cross_entropy_backward_(x, lse, safe_t, coef_p, onehot, smooth, w if eps else None)
            # The dispatcher does not count a custom op's write: count it, so that autograd refuses
            # to use x in another node's backward rather than read the gradient as logits.
            torch.autograd.graph.increment_version(x)
            return x
        return _ops.cross_entropy_backward(x, lse, safe_t, coef_p, onehot, smooth, w if eps else None)
    g = probs.mul_(coef_p[:, None])
    if has_target is not None:
        onehot = torch.where(has_target, onehot, torch.zeros_like(onehot))
    g.scatter_add_(1, safe_t[:, None], -onehot[:, None])
    if eps:
        g.sub_(smooth[:, None] if w is None else smooth[:, None] * w[None, :])
    return g


def reduce_losses(loss, valid, w_t, reduction: str):
    """The reduction of per-row losses, and the mean's denominator (the targets' total weight, as
    torch's nll_loss divides by it; 1 for the other reductions)."""
    if reduction == "mean":
        denom = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
        return loss.sum() / denom, denom
    return (loss.sum() if reduction == "sum" else loss), loss.new_ones(())


class _ClassTargetLoss(torch.autograd.Function):
    """Class-index targets on rows x (N, C): the forward reads x once; the backward recomputes the
    softmax from x and the saved lse."""

    @staticmethod
    def forward(ctx, x, t, w, ignore_index, reduction, eps, z, inplace):
        loss, lse, w_t, valid, safe_t = row_losses(x, t, w, ignore_index, eps, z)
        out, denom = reduce_losses(loss, valid, w_t, reduction)
        ctx.save_for_backward(x, safe_t, valid, lse, w_t, w, denom)
        ctx.reduction, ctx.eps, ctx.z, ctx.inplace = reduction, eps, z, inplace
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        x, safe_t, valid, lse, w_t, w, denom = ctx.saved_tensors
        if x.numel() == 0:
            return torch.zeros_like(x), None, None, None, None, None, None, None
        scale = grad.to(lse.dtype).expand(lse.shape) / denom
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        # Under torch.compile the backward graph may not write over a forward input: out of place.
        inplace = ctx.inplace and not torch.compiler.is_compiling()
        g = row_grad(x, safe_t, lse, w_t, w, scale, ctx.eps, ctx.z, inplace=inplace)
        return g.to(x.dtype), None, None, None, None, None, None, None


def _probability_targets(input, x, target, weight, reduction, eps, z, n_classes):
    """Probability targets (class dim 1, input's shape): through the materialized log-softmax, so
    that the target's gradient is there too (torch's semantics)."""
    op = _OP
    if tuple(target.shape) != tuple(input.shape):
        raise checks.fail(op, f"target of class probabilities must have input's shape {list(input.shape)}, "
                              f"got {list(target.shape)}")
    if target.device != input.device:
        raise checks.fail(op, f"target is on {target.device} but input is on {input.device}")
    q = target.reshape(1, -1) if input.dim() == 1 else (target.movedim(1, -1) if input.dim() > 2 else target)
    q = q.reshape(-1, n_classes)
    if eps:
        q = q * (1.0 - eps) + eps / n_classes
    log_p = _ops.forward(x, 1, True, 1.0, None)
    terms = log_p * q if weight is None else log_p * q * weight
    loss = -terms.sum(1)
    # lse = x - log p at any class: differentiable through x, and what return_lse gives.
    lse = (x - log_p).select(1, 0).to(state_dtype(x.dtype)) if n_classes else \
        x.new_full((x.shape[0],), float("-inf"), dtype=state_dtype(x.dtype))
    if z:
        loss = loss + z * lse * lse
    if reduction == "mean":
        loss = loss.sum() / (input.numel() // max(1, n_classes) if input.dim() > 1 else 1)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.reshape(_target_shape(input))
    return loss, lse
