"""Cross-entropy with the vocabulary sharded across torch.distributed ranks (Megatron's layout:
rank r holds classes [vocab_start, vocab_start + V_r) of every token's logits).

Only per-token numbers travel: the rows' (max, sumexp) states are merged by two all-reduces
(``distributed.global_state``'s), and one more sums each token's target logit (and target weight,
and under label smoothing its weighted logit sum) from the one rank that holds it. The backward
needs no communication: each rank's gradient is its shard's softmax under the whole row's state,
minus the one-hot where it holds the target. As in ``cross_entropy``, the loss is
``log d - (x[t] - m)`` and the gradient ``exp(x - m) / d``, never through a rounded lse.
"""

from typing import Optional

import torch
import torch.distributed as dist

from .. import _checks as checks
from .._checks import state_dtype
from ..state import SoftmaxState
from .cross_entropy import combine_row_losses, loss_options, reduce_losses, row_grad, smoothing_sum

_ops = torch.ops.online_softmax


def cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group=None, *,
                  weight: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                  return_lse: bool = False):
    """The cross-entropy of logits whose last dim (the classes) is sharded across the ranks of
    ``group``: ``local_logits`` (..., V_r) holds classes [vocab_start, vocab_start + V_r) and
    ``target`` (...) global class indices. Every rank gets the loss of the whole vocabulary, equal
    to ``online_softmax.losses.cross_entropy`` of the concatenated logits (classes last), and the
    gradient of its own shard. ``weight`` is this rank's shard of the class weights (V_r,). The
    other options are ``cross_entropy``'s. Every rank of the group must call it (a collective)."""
    from ..distributed import _check

    op = "distributed.cross_entropy"
    checks.tensor(target, "target", op)
    checks.integer(vocab_start, "vocab_start", op, minimum=0)
    checks.tensor(weight, "weight", op, optional=True)
    eps, z, softcap = loss_options(op, reduction, ignore_index, label_smoothing, z_loss, softcap)
    _check(local_logits, -1, 1.0, "cross_entropy", name="local_logits")
    checks.floating(local_logits, "local_logits", op)
    if target.dtype not in (torch.int64, torch.uint8):
        raise checks.fail(op, f"target must hold class indices (int64), got {target.dtype}", TypeError)
    if tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise checks.fail(op, f"target must have local_logits' shape without its last dim, "
                              f"{list(local_logits.shape[:-1])}, got {list(target.shape)}")
    v_local = local_logits.shape[-1]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != v_local):
        raise checks.fail(op, f"weight must be this rank's shard of the class weights, shape [{v_local}], "
                              f"got {list(weight.shape)}")
    x = local_logits.reshape(-1, v_local)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    acc = state_dtype(x.dtype)
    w = None if weight is None else weight.to(acc)
    loss, lse = _VocabParallelLoss.apply(x, target.reshape(-1).long(), vocab_start, w,
                                         (ignore_index, reduction, eps, z), group)
    loss = (loss.reshape(target.shape) if reduction == "none" else loss).to(local_logits.dtype)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def _sum_across_ranks(values, group):
    packed = torch.stack(values)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed.unbind(0)


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, start, w, options, group):
        from ..distributed import _merge_across_ranks

        ignore_index, reduction, eps, z = options
        acc = state_dtype(x.dtype)
        n_rows, v_local = x.shape
        if n_rows and v_local:
            m, d = _ops.stats(x, 1, 1.0)
        else:
            m = torch.full((n_rows,), float("-inf"), dtype=acc, device=x.device)
            d = torch.zeros((n_rows,), dtype=acc, device=x.device)
        m, d = _merge_across_ranks(m, d, group)
        log_d = torch.log(d)
        lse = m + log_d
        valid = t != ignore_index
        here = valid & (t >= start) & (t < start + v_local)
        local_t = torch.where(here, t - start, torch.zeros_like(t))
        zero = torch.zeros(n_rows, dtype=acc, device=x.device)
        x_t = torch.where(here, x.gather(1, local_t[:, None])[:, 0].to(acc), zero) if v_local else zero
        parts = [x_t]
        if w is not None:
            parts.append(torch.where(here, w.gather(0, local_t), zero) if v_local else zero)
        if eps:
            # Relative to the whole row's max, so that it does not cancel against W log d.
            parts.append(smoothing_sum(x, m, w) if v_local else zero)
        totals = torch.tensor([float(v_local), float(w.sum()) if w is not None else float(v_local)],
                              dtype=acc, device=x.device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        summed = list(_sum_across_ranks(parts, group))
        x_t = summed.pop(0)
        w_t = summed.pop(0) if w is not None else torch.ones_like(lse)
        wx = summed.pop(0) if eps else None
        n_classes, w_sum = int(totals[0]), totals[1]
        # x_t - m on the summed x_t: only the rank holding the target contributed, so it is exact.
        loss = combine_row_losses(log_d, x_t - m, w_t, valid, eps, z, n_classes, wx, w_sum, lse=lse)
        out, denom = reduce_losses(loss, valid, w_t, reduction)
        ctx.save_for_backward(x, local_t, here, valid, m, d, lse, w_t, w if w is not None else zero[:0], denom,
                              w_sum)
        ctx.has_w, ctx.eps, ctx.z, ctx.n_classes = w is not None, eps, z, n_classes
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        x, local_t, here, valid, m, d, lse, w_t, w, denom, w_sum = ctx.saved_tensors
        if x.numel() == 0:
            return torch.zeros_like(x), None, None, None, None, None
        scale = grad.to(lse.dtype).expand(lse.shape) / denom
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        probs = SoftmaxState(m, d, 1).normalize(x.to(lse.dtype))
        g = row_grad(x, local_t, m, d, w_t, w if ctx.has_w else None, scale, ctx.eps, ctx.z, lse=lse, probs=probs,
                     has_target=here, n_classes=ctx.n_classes, w_sum=w_sum)
        return g.to(x.dtype), None, None, None, None, None
