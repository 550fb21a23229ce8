"""Cross-entropy with the vocabulary sharded across torch.distributed ranks (Megatron's layout:
rank r holds classes [vocab_start, vocab_start + V_r) of every token's logits).

Only per-token numbers travel, in one all-gather: each rank's (max, sumexp) state of its shard of
every row, the target logit (and target weight) from the rank that holds it, and under label
smoothing the shard's weighted logit sum; one more row carries the shard's class count and total
class weight. Every rank merges them locally. The backward needs no communication: each rank's
gradient is its shard's softmax under the whole row's state, minus the one-hot where it holds the
target. As in ``cross_entropy``, the loss is ``log d - (x[t] - m)`` and the gradient
``exp(x - m) / d``, never through a rounded lse.
"""

from typing import Optional, Sequence

import torch

from .. import _checks as checks
from .._checks import state_dtype
from ..losses.cross_entropy import combine_row_losses, loss_options, reduce_losses, row_grad, row_state, smoothing_sum
from .collectives import gather_rows, merge_gathered, sum_rows
from .process_group import check_sharded


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
    op = "distributed.cross_entropy"
    checks.tensor(target, "target", op)
    checks.integer(vocab_start, "vocab_start", op, minimum=0)
    checks.tensor(weight, "weight", op, optional=True)
    eps, z, softcap = loss_options(op, reduction, ignore_index, label_smoothing, z_loss, softcap)
    check_sharded(local_logits, -1, 1.0, "cross_entropy", name="local_logits")
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
    x = local_logits.reshape(local_logits.shape[:-1].numel(), v_local)  # -1 is ambiguous for an empty shard
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = None if weight is None else weight.to(state_dtype(x.dtype))
    loss, lse = sharded_rows_loss(x, target.reshape(-1).long(), vocab_start, w, ignore_index, reduction, eps, z,
                                  [group])
    loss = (loss.reshape(target.shape) if reduction == "none" else loss).to(local_logits.dtype)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def sharded_rows_loss(x, t, start: int, w, ignore_index: int, reduction: str, eps: float, z: float,
                      class_groups: Sequence, row_groups: Sequence = ()):
    """The loss of rows x (N, V_r), this rank's classes [start, start + V_r) of every row, targets
    t (N,) global class indices, w this rank's class weights (or None), in the accumulation dtype;
    returns (loss, lse (N,), not differentiable). ``class_groups``: the group over which the classes
    are split (none: this rank holds them all). ``row_groups``: the groups over which the rows
    themselves are split (a data-parallel mesh dim), whose mean and sum reductions add one O(1)
    all-reduce each."""
    if len(class_groups) > 1:
        raise checks.fail("cross_entropy", "the classes may be split over one mesh dim at most",
                          NotImplementedError)
    return _VocabParallelLoss.apply(x, t, start, w, (ignore_index, reduction, eps, z), tuple(class_groups),
                                    tuple(row_groups))


def _gathered_row_terms(x, t, start, w, ignore_index, eps, class_groups):
    """This rank's per-row terms of the loss, gathered from every rank of the class group in one
    call and merged: (m, d, x_t, w_t, wx, n_classes, w_sum, valid, here, local_t)."""
    acc = state_dtype(x.dtype)
    n_rows, v_local = x.shape
    m, d = row_state(x)
    valid = t != ignore_index
    here = valid & (t >= start) & (t < start + v_local)
    local_t = torch.where(here, t - start, torch.zeros_like(t))
    zero = torch.zeros(n_rows, dtype=acc, device=x.device)
    columns = [m, d, torch.where(here, x.gather(1, local_t[:, None])[:, 0].to(acc), zero) if v_local else zero]
    if w is not None:
        columns.append(torch.where(here, w.gather(0, local_t), zero) if v_local else zero)
    if eps:
        # The shard's weighted logit sum relative to its own max (the whole row's is not known yet),
        # moved to the whole row's max after the gather: both parts <= 0, so nothing cancels.
        ref = torch.where(torch.isfinite(m), m, zero)
        columns += [smoothing_sum(x, ref, w), ref]
    packed = torch.stack(columns, 1)
    totals = torch.zeros(1, packed.shape[1], dtype=acc, device=x.device)
    totals[0, 0] = v_local
    totals[0, 1] = v_local if w is None else w.sum()
    packed = torch.cat([packed, totals])
    every = gather_rows(packed, class_groups[0]) if class_groups else packed[None]  # (world, N + 1, columns)
    rows, totals = every[:, :n_rows], every[:, n_rows]
    m, d = merge_gathered(rows[..., 0], rows[..., 1])
    x_t = rows[..., 2].sum(0)  # only the rank holding the target contributed: exact
    w_t = rows[..., 3].sum(0) if w is not None else torch.ones_like(m)
    n_classes, w_shards = int(totals[:, 0].sum()), totals[:, 1]
    wx = None
    if eps:
        wx_r, ref_r = rows[..., -2], rows[..., -1]
        shift = torch.where(w_shards[:, None] == 0, torch.zeros_like(ref_r), (ref_r - m) * w_shards[:, None])
        wx = (wx_r + shift).sum(0)
    return m, d, x_t, w_t, wx, n_classes, w_shards.sum(), valid, here, local_t


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, start, w, options, class_groups, row_groups):
        ignore_index, reduction, eps, z = options
        m, d, x_t, w_t, wx, n_classes, w_sum, valid, here, local_t = _gathered_row_terms(
            x, t, start, w, ignore_index, eps, class_groups)
        outside = valid & ((t < 0) | (t >= n_classes))
        if not x.is_cuda:
            if bool(outside.any()):
                raise checks.fail("cross_entropy", f"target holds a class index outside "
                                  f"[0, {n_classes}) (the whole vocabulary)", IndexError)
        else:  # no host sync on a GPU: those rows' losses are NaN, as the fused kernels make them
            x_t = torch.where(outside, torch.full_like(x_t, float("nan")), x_t)
        log_d = torch.log(d)
        lse = m + log_d
        loss = combine_row_losses(log_d, x_t - m, w_t, valid, eps, z, n_classes, wx, w_sum, lse=lse)
        out, denom = reduce_losses(loss, valid, w_t, reduction)
        if reduction != "none" and row_groups:
            total = torch.stack([loss.sum(), denom])
            for g in row_groups:
                total = sum_rows(total, g)
            denom = total[1] if reduction == "mean" else denom
            out = total[0] / denom if reduction == "mean" else total[0]
        zero = x.new_zeros(0, dtype=m.dtype)
        ctx.save_for_backward(x, local_t, here, valid, m, d, lse, w_t, w if w is not None else zero, denom, w_sum)
        ctx.has_w, ctx.eps, ctx.z, ctx.n_classes = w is not None, eps, z, n_classes
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        x, local_t, here, valid, m, d, lse, w_t, w, denom, w_sum = ctx.saved_tensors
        none = (None,) * 6
        if x.numel() == 0:
            return (torch.zeros_like(x),) + none
        scale = grad.to(lse.dtype).expand(lse.shape) / denom
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        # The fused backward op under the whole rows' state: one read of the shard, one write.
        g = row_grad(x.contiguous(), local_t, m, d, w_t, w if ctx.has_w else None, scale, ctx.eps, ctx.z, lse=lse,
                     has_target=here, n_classes=ctx.n_classes, w_sum=w_sum)
        return (g,) + none
