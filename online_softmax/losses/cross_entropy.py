"""Cross-entropy on the online state: the loss of a row is ``log d - (x[target] - m)``.

``cross_entropy`` has ``torch.nn.functional.cross_entropy``'s semantics (class dim 1, class-index
and probability targets, ``weight``, ``ignore_index``, ``label_smoothing``, every ``reduction``)
and adds what language-model training uses: ``z_loss`` (PaLM's ``z * lse**2`` per row),
``softcap`` (Gemma 2's ``softcap * tanh(x / softcap)`` on the logits) and ``return_lse``.

With class-index targets the forward reads the logits once, through the ``stats`` op (the row's
``(m, d)``; label smoothing adds a row sum), and keeps no logits-sized tensor: the backward
recomputes the softmax ``exp(x - m) / d`` from the logits and the saved state in one read and one
write (the ``cross_entropy_backward`` op). torch's own keeps the whole log-softmax between the two.
Neither the loss nor the gradient goes through a rounded ``lse = m + log d``: at large logits its
rounding (an ulp of lse) would swamp ``x - lse``, as torch's log-softmax ``(x - m) - log d`` does
not. Probability targets go through the materialized log-softmax.

Second derivatives: when the backward itself must be differentiable (``create_graph=True``, or
torch.func's transforms), it is a composition of the ``forward`` op (which has double backward,
forward-mode AD and torch.func support) and torch ops instead of the fused op.
"""

from typing import Optional

import torch

from .. import _checks as checks
from .._checks import state_dtype
from .._dtensor import is_dtensor

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
    with the class dim last and contiguous (2-D ``(N, C)`` or 1-D ``(C,)``), no ``softcap`` (whose
    tanh is an intermediate anyway), and logits that are not a leaf tensor (a parameter) or a view of
    one, whose values must never be overwritten; elsewhere, under torch.compile, and when the
    backward must itself be differentiable, the backward is out of place as usual."""
    op = _OP
    checks.tensor(input, "input", op)
    checks.tensor(target, "target", op)
    checks.floating(input, "input", op)
    checks.tensor(weight, "weight", op, optional=True)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if is_dtensor(input) or is_dtensor(target) or is_dtensor(weight):
        from ..distributed import dtensor_losses

        return dtensor_losses.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                            return_lse=return_lse)
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
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            # As torch's nll_loss, which raises the same (a RuntimeError) rather than leave weight.grad None.
            raise checks.fail(op, "weight (the class weights) cannot have requires_grad=True with class-index "
                                  "targets: the loss is not differentiable with respect to it (as torch's "
                                  "nll_loss); pass weight.detach()", RuntimeError)
        t = _class_targets(input, target, n_classes, ignore_index)
        w = None if weight is None else weight.to(state_dtype(input.dtype))
        # In place only where x is input's own storage (the rows are a view of it) and that storage
        # is not a leaf's (a parameter's values must never become its gradient).
        inplace = (inplace_backward and softcap is None and input.dim() <= 2 and input.is_contiguous()
                   and not torch.compiler.is_compiling() and not _leaf_storage(input))
        loss, lse = class_target_loss(x, t, w, ignore_index, reduction, label_smoothing, z_loss, inplace)
        loss = (loss.reshape(target.shape) if reduction == "none" else loss).to(input.dtype)
    if return_lse:
        return loss, lse.detach().reshape(_target_shape(input))
    return loss


def _leaf_storage(t: torch.Tensor) -> bool:
    """Whether t is a leaf tensor or a view of one (its values are the user's, never scratch)."""
    base = t._base if t._is_view() and t._base is not None else t
    return base.is_leaf


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
    already last), and the number of classes. The row count is a product of sizes, never inferred
    (-1 cannot be inferred when there are no classes), so it stays symbolic under torch.export."""
    if input.dim() == 0:
        raise checks.fail(op, "input must have a class dimension (1-D (C,) or (N, C, ...)), got a 0-d tensor")
    if input.dim() == 1:
        return input.unsqueeze(0), input.shape[0]
    n_classes = input.shape[1]
    x = input.movedim(1, -1) if input.dim() > 2 else input
    rows = input.shape[0]
    for size in input.shape[2:]:
        rows = rows * size
    return x.reshape(rows, n_classes), n_classes


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


def _physical(t: torch.Tensor) -> torch.Tensor:
    """The tensor under torch.func's wrappers (vmap's batched tensors, grad's tracking tensors):
    all of its values, every vmapped batch included."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _symbolic(t: torch.Tensor) -> bool:
    """Whether t has no values to read: meta, fake (torch.compile, torch.export), or traced."""
    from torch._subclasses.fake_tensor import is_fake

    # The compiler's own questions first: dynamo may not trace is_fake.
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or t.device.type == "meta" or is_fake(t))


def check_class_indices(t: torch.Tensor, n_classes: int, ignore_index: int, op: str) -> torch.Tensor:
    """``t`` after checking that every target but ignore_index is a class: an IndexError as in
    torch otherwise (one host sync). Under torch.func's transforms the physical tensor under the
    wrappers is checked (every vmapped batch at once); tensors without values (meta, fake, traced:
    torch.compile, torch.export, jit.trace) are not checked, as they cannot branch on data."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return t
    physical = _physical(t)
    if physical.numel() and not _symbolic(physical):
        bad = (physical != ignore_index) & ((physical < 0) | (physical >= n_classes))
        if bool(bad.any()):
            raise IndexError(f"online_softmax.{op}: Target {int(physical[bad][0])} is out of bounds (classes "
                             f"[0, {n_classes}), ignore_index {ignore_index}).")
    return t


def row_state(x: torch.Tensor):
    """Each row's online state (m, d) of rows x (N, C) in the accumulation dtype, the empty state
    (-inf, 0) for rows without classes."""
    acc = state_dtype(x.dtype)
    if x.shape[1] == 0 or x.shape[0] == 0:
        return (torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device),
                torch.zeros((x.shape[0],), dtype=acc, device=x.device))
    return _ops.stats(x, 1, 1.0)


def smoothing_sum(x: torch.Tensor, m: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """sum_c w_c (x_c - m) per row of x (N, C), in the accumulation dtype: label smoothing's term,
    taken relative to the row's max so that it does not cancel against W log d at large logits."""
    shifted = x.to(m.dtype) - m[:, None]
    return shifted.sum(1) if w is None else shifted @ w


def row_losses(x, t, w, ignore_index: int, eps: float, z: float):
    """Per-row losses of class-index targets on rows x (N, C), from one read of x (the stats op;
    label smoothing adds a row sum). Returns (loss (N,) zero on ignored rows, lse (N,), m (N,),
    d (N,), the target weights w_t (N,), valid (N,) bool, the targets with ignored rows set to 0)."""
    acc = state_dtype(x.dtype)
    n_rows, n_classes = x.shape
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    m, d = row_state(x)
    log_d = torch.log(d)
    if n_classes == 0:
        shift_t = torch.zeros_like(m)
    else:
        shift_t = x.gather(1, safe_t[:, None])[:, 0].to(acc) - m
    w_t = torch.ones_like(m) if w is None else w.gather(0, safe_t)
    wx = w_sum = None
    if eps:
        w_sum = n_classes if w is None else w.sum()
        wx = smoothing_sum(x, m, w)
    loss = combine_row_losses(log_d, shift_t, w_t, valid, eps, z, n_classes, wx, w_sum, lse=m + log_d)
    return loss, m + log_d, m, d, w_t, valid, safe_t


def combine_row_losses(log_d, shift_t, w_t, valid, eps: float, z: float, n_classes, wx=None, w_sum=None, *, lse):
    """A row's loss from its pieces, none of them a difference of large numbers: log d, the target
    logit relative to the max shift_t = x_t - m and the target weight w_t, and, under label
    smoothing, the weighted sum of the logits relative to the max wx = sum_c w_c (x_c - m) and the
    classes' total weight w_sum; lse = m + log d only for the z-loss. Zero on ignored rows.

        loss = (1-eps) w_t (log d - shift_t) + eps/C (w_sum log d - wx) + z lse^2
    """
    loss = (1.0 - eps) * w_t * (log_d - shift_t) if eps != 1.0 else torch.zeros_like(log_d)
    if z:
        loss = loss + z * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if eps:
        # -sum_c w_c log p_c = log d * sum_c w_c - sum_c w_c (x_c - m), divided by C (torch's smoothing,
        # which scales after masking: without classes every row is 0 * inf = NaN, as in torch).
        smooth = torch.where(valid, log_d * w_sum - wx, torch.zeros_like(loss))
        loss = loss + (eps / n_classes if n_classes else float("inf")) * smooth
    return loss


def row_grad(x, safe_t, m, d, w_t, w, scale, eps: float, z: float, *, lse=None, has_target=None,
             n_classes=None, w_sum=None, inplace: bool = False) -> torch.Tensor:
    """d(sum_i scale_i * loss_i) / dx for rows x (N, C): the cross_entropy_backward op (softmax
    exp(x - m) / d recomputed from x and the row's state, the target's one-hot and the smoothing
    term subtracted, in one read of x and one write, in x's dtype). ``scale`` is 0 on ignored rows.

        d loss_i / d x_c = (1-eps) w_t (p_c - [c = t]) + eps/C (W p_c - w_c) + 2 z lse p_c

    For a shard of the classes (vocabulary-parallel): m and d are the whole rows' state,
    ``has_target`` says which rows' targets lie in the shard (at ``safe_t``), and
    ``n_classes``/``w_sum`` are the whole vocabulary's C and W. ``inplace``: the gradient is
    written over x (contiguous) and x is returned."""
    n_classes = x.shape[1] if n_classes is None else n_classes
    if w_sum is None:
        w_sum = n_classes if w is None else w.sum()
    coef_p = (1.0 - eps) * w_t + eps / n_classes * w_sum if eps else w_t
    if z:
        coef_p = coef_p + 2.0 * z * (m + torch.log(d) if lse is None else lse)
    coef_p = scale * coef_p
    onehot = (1.0 - eps) * scale * w_t
    if has_target is not None:
        onehot = torch.where(has_target, onehot, torch.zeros_like(onehot))
    smooth = (eps / n_classes) * scale if eps else None
    # The fused kernel: one read of x, one write of the gradient in x's dtype.
    if inplace:
        _ops.cross_entropy_backward_(x, m, d, safe_t, coef_p, onehot, smooth, w if eps else None)
        # The dispatcher does not count a custom op's write: count it, so that autograd refuses
        # to use x in another node's backward rather than read the gradient as logits.
        torch.autograd.graph.increment_version(x)
        return x
    return _ops.cross_entropy_backward(x, m, d, safe_t, coef_p, onehot, smooth, w if eps else None)


def differentiable_row_grad(x, safe_t, w, scale, eps: float, z: float) -> torch.Tensor:
    """row_grad's gradient (out of place, rows x (N, C), scale (N,) zero on ignored rows) as a
    composition that autograd and torch.func differentiate again: the softmax from the ``forward``
    op (double backward, forward-mode AD and batching in C++), the rest torch ops. For
    create_graph=True and torch.func's transforms, where the fused op (not differentiable) cannot
    serve."""
    acc = state_dtype(x.dtype)
    n_classes = x.shape[1]
    p = _ops.forward(x, 1, False, 1.0, acc if acc != x.dtype else None)
    w_t = torch.ones_like(scale) if w is None else w.gather(0, safe_t)
    coef = (1.0 - eps) * w_t
    if eps:
        coef = coef + eps / n_classes * (n_classes if w is None else w.sum())
    if z:
        coef = coef + 2.0 * z * torch.logsumexp(x.to(acc), 1)
    # A comparison, not F.one_hot (whose bounds check reads the values, which vmap cannot).
    onehot = (torch.arange(n_classes, device=x.device)[None, :] == safe_t[:, None]).to(acc)
    g = coef[:, None] * p - ((1.0 - eps) * w_t)[:, None] * onehot
    if eps:
        g = g - eps / n_classes * (torch.ones_like(p) if w is None else w[None, :].expand_as(p))
    return (g * scale[:, None]).to(x.dtype)


def reduce_losses(loss, valid, w_t, reduction: str):
    """The reduction of per-row losses, and the mean's denominator (the targets' total weight, as
    torch's nll_loss divides by it; 1 for the other reductions)."""
    if reduction == "mean":
        denom = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
        return loss.sum() / denom, denom
    return (loss.sum() if reduction == "sum" else loss), loss.new_ones(())


def _differentiable_backward() -> bool:
    """Whether a backward now running must itself be differentiable: create_graph=True (grad mode
    on inside the backward), or torch.func's transforms (grad, jacrev, jacfwd, hessian, vmap). Under
    torch.compile's tracing the fused op serves (compiled double backward is not supported there)."""
    if torch._C._are_functorch_transforms_active():
        return True
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def class_target_loss(x, t, w, ignore_index: int, reduction: str, eps: float, z: float, inplace: bool):
    """(loss, lse) of class-index targets t (N,) on rows x (N, C): the loss reduced, in the
    accumulation dtype; lse (N,) not differentiable."""
    # Dynamo cannot trace a Function with a custom jvp: under torch.compile the one without it.
    function = _TracedClassTargetLoss if torch.compiler.is_compiling() else _ClassTargetLoss
    out, lse, _m, _d = function.apply(x, t, w, ignore_index, reduction, eps, z, inplace)
    return out, lse


class _TracedClassTargetLoss(torch.autograd.Function):
    """Class-index targets on rows x (N, C): the forward reads x once; the backward recomputes the
    softmax from x and the saved (m, d) in the fused op, or, when the backward must itself be
    differentiable, as a composition (differentiable_row_grad). Outputs (loss, lse, m, d); the last
    three are not differentiable (m and d are outputs so that torch.func can save them)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, w, ignore_index, reduction, eps, z, inplace):
        loss, lse, m, d, w_t, valid, _safe_t = row_losses(x, t, w, ignore_index, eps, z)
        out, _denom = reduce_losses(loss, valid, w_t, reduction)
        return out, lse, m, d

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w, ignore_index, reduction, eps, z, inplace = inputs
        _out, lse, m, d = output
        ctx.mark_non_differentiable(lse, m, d)
        ctx.save_for_backward(x, t, w, m, d)
        ctx.save_for_forward(x, t, w, m, d)
        ctx.options = (ignore_index, reduction, eps, z, inplace)

    @staticmethod
    def _row_scale(t, w, ignore_index, reduction, grad, acc):
        """The per-row scale of the gradient (grad / the mean's denominator, 0 on ignored rows), the
        targets with ignored rows at 0, and the validity mask."""
        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t))
        w_t = torch.ones(t.shape, dtype=acc, device=t.device) if w is None else w.gather(0, safe_t)
        scale = grad.to(acc).expand(t.shape)
        if reduction == "mean":
            scale = scale / torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
        return torch.where(valid, scale, torch.zeros_like(scale)), safe_t, w_t

    @staticmethod
    def backward(ctx, grad, _grad_lse, _grad_m, _grad_d):
        x, t, w, m, d = ctx.saved_tensors
        ignore_index, reduction, eps, z, inplace = ctx.options
        if ctx.needs_input_grad[2]:
            raise RuntimeError("online_softmax.cross_entropy: the loss of class-index targets is not "
                               "differentiable with respect to weight (as torch's nll_loss)")
        if x.numel() == 0:
            return torch.zeros_like(x), None, None, None, None, None, None, None
        scale, safe_t, w_t = _TracedClassTargetLoss._row_scale(t, w, ignore_index, reduction, grad, m.dtype)
        if _differentiable_backward():
            return differentiable_row_grad(x, safe_t, w, scale, eps, z), None, None, None, None, None, None, None
        # Under torch.compile the backward graph may not write over a forward input: out of place.
        inplace = inplace and not torch.compiler.is_compiling()
        g = row_grad(x, safe_t, m, d, w_t, w, scale, eps, z, inplace=inplace)
        return g.to(x.dtype), None, None, None, None, None, None, None


class _ClassTargetLoss(_TracedClassTargetLoss):
    """_TracedClassTargetLoss with forward-mode AD (jvp, torch.func.jvp and jacfwd)."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx, x_dot, *_tangents):
        """The loss's tangent: sum_c g_c x_dot_c per row, with g the per-row gradient at unit scale."""
        x, t, w, m, d = ctx.saved_tensors
        ignore_index, reduction, eps, z, _inplace = ctx.options
        if x_dot is None:
            return None, None, None, None
        acc = m.dtype
        n_classes = x.shape[1]
        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t))
        w_t = torch.ones(t.shape, dtype=acc, device=t.device) if w is None else w.gather(0, safe_t)
        dx = x_dot.to(acc)
        p = torch.exp(x.to(acc) - m[:, None]) / d[:, None]
        coef = (1.0 - eps) * w_t
        if eps:
            coef = coef + eps / n_classes * (n_classes if w is None else w.sum())
        if z:
            coef = coef + 2.0 * z * (m + torch.log(d))
        dx_t = dx.gather(1, safe_t[:, None])[:, 0] if n_classes else torch.zeros_like(coef)
        dloss = coef * (p * dx).sum(1) - (1.0 - eps) * w_t * dx_t
        if eps:
            dloss = dloss - eps / n_classes * (dx.sum(1) if w is None else dx @ w)
        dloss = torch.where(valid, dloss, torch.zeros_like(dloss))
        if reduction == "mean":
            dloss = dloss.sum() / torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
        elif reduction == "sum":
            dloss = dloss.sum()
        return dloss, None, None, None


def _probability_targets(input, x, target, weight, reduction, eps, z, n_classes):
    """Probability targets (class dim 1, input's shape): through the materialized log-softmax, so
    that the target's gradient is there too (torch's semantics)."""
    op = _OP
    if tuple(target.shape) != tuple(input.shape):
        raise checks.fail(op, f"target of class probabilities must have input's shape {list(input.shape)}, "
                              f"got {list(target.shape)}")
    if target.device != input.device:
        raise checks.fail(op, f"target is on {target.device} but input is on {input.device}")
    q = target.unsqueeze(0) if input.dim() == 1 else (target.movedim(1, -1) if input.dim() > 2 else target)
    q = q.reshape(x.shape)
    if eps:
        q = q * (1.0 - eps) + (eps / n_classes if n_classes else float("nan"))
    log_p = _ops.forward(x, 1, True, 1.0, None) if x.numel() else x
    terms = log_p * q if weight is None else log_p * q * weight
    loss = -terms.sum(1)
    # lse = x - log p at any class: differentiable through x, and what return_lse gives.
    lse = (x - log_p).select(1, 0).to(state_dtype(x.dtype)) if n_classes else \
        x.new_full((x.shape[0],), float("-inf"), dtype=state_dtype(x.dtype))
    if z:
        loss = loss + z * lse * lse
    if reduction == "mean":
        # torch divides by numel / C, which is NaN without classes (0 / 0).
        loss = loss.sum() / (x.shape[0] if n_classes else float("nan"))
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.reshape(_target_shape(input))
    return loss, lse
