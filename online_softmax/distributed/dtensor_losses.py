"""cross_entropy and linear_cross_entropy of DTensors: what torch's ``loss_parallel()`` does for
``F.cross_entropy``, in one collective per forward, and beyond it (label smoothing, class weights,
z-loss, softcap, every reduction, a second mesh dim splitting the rows, the head's linear layer).

The logits' class dim may be split over one mesh dim (``Shard(class dim)``); the rows over any
others. Each rank's loss terms are those of ``vocab_parallel.sharded_rows_loss``: one all-gather
of per-row (m, d, target logit, ...) over the class-split mesh dim in the forward, none in the
backward; a mean or sum over rows split on other mesh dims adds one all-reduce of two numbers.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.utils.checkpoint import checkpoint

from .. import _checks as checks
from .._checks import state_dtype
from ..losses.cross_entropy import loss_options
from ..losses.linear_cross_entropy import token_chunk
from .collectives import sum_rows
from .dtensor import _aligned, check_placements, extent, groups_of, local_piece, mesh_dims_sharding, wrap
from .vocab_parallel import sharded_rows_loss


def _class_targets(target, op: str):
    if target.dtype.is_floating_point:
        raise checks.fail(op, "probability targets are not supported for DTensor logits (class indices only)",
                          NotImplementedError)
    if target.dtype not in (torch.int64, torch.uint8):
        raise checks.fail(op, f"target must hold class indices (int64), got {target.dtype}", TypeError)


def _split(x: DTensor, class_dim: int, op: str):
    """(mesh dims splitting the classes, mesh dims splitting the rows)."""
    classes = mesh_dims_sharding(x, class_dim)
    if len(classes) > 1:
        raise checks.fail(op, f"the classes are split over mesh dims {classes}: at most one is supported",
                          NotImplementedError)
    rows = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and i not in classes]
    return classes, rows


def _targets_whole_over(target, class_dims, op: str) -> None:
    if isinstance(target, DTensor):
        check_placements(target, "target", op)
        for i in class_dims:
            if isinstance(target.placements[i], Shard):
                raise checks.fail(op, f"target is sharded ({target.placements[i]}) on mesh dim {i}, which splits "
                                      f"the classes: every rank there needs the same targets; make target "
                                      f"Replicate() on that mesh dim")


def _class_weights(weight, like: DTensor, class_dims, op: str, name: str):
    """This rank's class weights (V_r,): from a DTensor sharded like the classes, or replicated, or a
    plain tensor holding them all."""
    if weight is None:
        return None
    offset, n_local = extent(like, like.dim() - 1)
    if isinstance(weight, DTensor):
        check_placements(weight, name, op)
        want = tuple(Shard(0) if i in class_dims else Replicate() for i in range(like.device_mesh.ndim))
        if tuple(weight.placements) == want and class_dims:
            return weight.to_local()
        if not all(isinstance(p, Replicate) for p in weight.placements):
            raise checks.fail(op, f"{name} must be replicated or sharded like the classes ({list(want)}), got "
                                  f"{list(weight.placements)}")
        weight = weight.to_local()
    return weight.narrow(0, offset, n_local)


def _finish(loss, lse, like: DTensor, local_shape, target_shape, reduction: str, dtype, return_lse: bool):
    """The loss (and lse) as DTensors: replicated when reduced, else placed like the rows of
    ``like`` (whose last dim is the classes or the hidden size)."""
    row_placements = _aligned(like.placements, like.dim(), 1)
    if reduction == "none":
        out = wrap(loss.to(dtype).reshape(local_shape), like, row_placements, target_shape)
    else:
        out = wrap(loss.to(dtype), like, [Replicate()] * like.device_mesh.ndim, ())
    if not return_lse:
        return out
    return out, wrap(lse.detach().reshape(local_shape), like, row_placements, target_shape)


def cross_entropy(input, target, weight=None, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                  return_lse: bool = False):
    """:func:`online_softmax.cross_entropy` of DTensor logits (class dim 1, or 0 for one row).
    ``target``: class indices, a DTensor placed like the logits' rows (replicated over the mesh dim
    that splits the classes) or a plain tensor holding all of them; ``weight``: replicated, sharded
    like the classes, or plain. Returns a DTensor: the loss replicated (reduced) or placed like the
    target (``"none"``); the gradient comes back placed like the logits."""
    op = "cross_entropy"
    if not isinstance(input, DTensor):
        raise checks.fail(op, "input must be a DTensor when target or weight is one", TypeError)
    check_placements(input, "input", op)
    checks.floating(input, "input", op)
    _class_targets(target, op)
    eps, z, softcap = loss_options(op, reduction, ignore_index, label_smoothing, z_loss, softcap)
    class_dim = 1 if input.dim() >= 2 else 0
    want = tuple(s for i, s in enumerate(input.shape) if i != class_dim)
    if tuple(target.shape) != want:
        raise checks.fail(op, f"target must have input's shape without the class dim, {list(want)}, got "
                              f"{list(target.shape)}")
    x = input if class_dim == input.dim() - 1 else input.movedim(class_dim, -1)
    class_dims, row_dims = _split(x, x.dim() - 1, op)
    _targets_whole_over(target, class_dims, op)
    t = local_piece(target, x, "target", op, align=1)
    w = _class_weights(weight, x, class_dims, op, "weight")
    offset, n_local = extent(x, x.dim() - 1)
    local = x.to_local()
    rows = local.reshape(local.shape[:-1].numel(), n_local)  # -1 is ambiguous for an empty shard
    if softcap is not None:
        rows = softcap * torch.tanh(rows / softcap)
    w = None if w is None else w.to(state_dtype(rows.dtype))
    loss, lse = sharded_rows_loss(rows, t.reshape(-1).long(), offset, w, ignore_index, reduction, eps, z,
                                  groups_of(x, class_dims), groups_of(x, row_dims))
    return _finish(loss, lse, x, t.shape, target.shape, reduction, input.dtype, return_lse)


def linear_cross_entropy(hidden, weight, target, bias=None, *, class_weight=None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, return_lse: bool = False,
                         chunk_size: Optional[int] = None):
    """:func:`online_softmax.linear_cross_entropy` with a vocabulary head ``weight`` (V, H) split by
    vocabulary rows (``Shard(0)``) over one mesh dim (a column-parallel head), ``hidden`` (..., H)
    a DTensor replicated over that mesh dim (its rows may be split over others), ``bias`` placed
    like ``weight``. Each rank computes its shard's logits ``chunk_size`` tokens at a time and
    recomputes them in the backward (activation checkpointing), so neither the whole nor the local
    logits exist at once. As DTensor's own linear layer gives them, the gradients are ``Partial()``
    where a rank holds a partial sum: hidden's over the vocabulary mesh dim (each rank's sum over
    its classes), the head's over mesh dims splitting the tokens (each rank's sum over its tokens).""" 
    op = "linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, DTensor):
            raise checks.fail(op, f"{name} must be a DTensor when the head is (a plain {name} would get a "
                                  f"partial gradient on each rank)", TypeError)
        check_placements(t, name, op)
        checks.floating(t, name, op)
    _class_targets(target, op)
    eps, z, softcap = loss_options(op, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise checks.fail(op, f"weight must be (V, {hidden.shape[-1]}), got {list(weight.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise checks.fail(op, f"target must have hidden's shape without its last dim, {list(hidden.shape[:-1])}, "
                              f"got {list(target.shape)}")
    vocab_dims = mesh_dims_sharding(weight, 0)
    if len(vocab_dims) > 1:
        raise checks.fail(op, f"weight must be split by vocabulary rows (Shard(0)) over one mesh dim at most, got "
                              f"{list(weight.placements)}", NotImplementedError)
    if any(isinstance(hidden.placements[i], Shard) for i in vocab_dims) or mesh_dims_sharding(hidden, hidden.dim() - 1):
        raise checks.fail(op, f"hidden must be replicated over the vocabulary's mesh dim and keep its last dim "
                              f"whole, got {list(hidden.placements)}")
    row_dims = [i for i, p in enumerate(hidden.placements) if isinstance(p, Shard)]
    h = hidden.to_local(grad_placements=[Partial() if i in vocab_dims else p
                                         for i, p in enumerate(hidden.placements)])
    _targets_whole_over(target, vocab_dims, op)
    t = local_piece(target, hidden, "target", op, align=1).reshape(-1).long()
    head_placements = tuple(Shard(0) if i in vocab_dims else Replicate() for i in range(weight.device_mesh.ndim))
    if tuple(weight.placements) != head_placements:
        raise checks.fail(op, f"weight must be Shard(0) over the vocabulary's mesh dim and replicated over the "
                              f"others ({list(head_placements)}), got {list(weight.placements)}",
                          NotImplementedError)
    # Each rank's head gradient sums over its own tokens: partial over the mesh dims splitting them.
    head_grad = [Partial() if i in row_dims else p for i, p in enumerate(head_placements)]
    w_local = weight.to_local(grad_placements=head_grad)
    b_local = None
    if bias is not None:
        if not isinstance(bias, DTensor) or tuple(bias.placements) != head_placements:
            raise checks.fail(op, "bias must be a DTensor placed like weight's rows (Shard(0) with weight)")
        b_local = bias.to_local(grad_placements=head_grad)
    offset, n_local = extent(weight, 0)
    cw_all = None
    if class_weight is not None:
        if isinstance(class_weight, DTensor):
            if not all(isinstance(p, Replicate) for p in class_weight.placements):
                raise checks.fail(op, "class_weight must be replicated (or a plain tensor of every class weight)")
            class_weight = class_weight.to_local()
        cw_all = class_weight.to(state_dtype(h.dtype))
    cw = None if cw_all is None else cw_all.narrow(0, offset, n_local)
    rows = h.reshape(-1, h.shape[-1])
    chunk = token_chunk(op, rows, max(n_local, 1), chunk_size, False)
    class_groups, row_groups = groups_of(weight, vocab_dims), groups_of(hidden, row_dims)

    def chunk_loss(h_chunk, w, b, t_chunk):
        logits = F.linear(h_chunk, w, b)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return sharded_rows_loss(logits, t_chunk, offset, cw, ignore_index, "none", eps, z, class_groups)

    losses, lses = [], []
    for start in range(0, rows.shape[0], chunk):
        loss, lse = checkpoint(chunk_loss, rows[start:start + chunk], w_local, b_local, t[start:start + chunk],
                               use_reentrant=False)
        losses.append(loss)
        lses.append(lse)
    acc = state_dtype(h.dtype)
    loss = torch.cat(losses) if losses else rows.new_zeros(0, dtype=acc)
    lse = torch.cat(lses) if lses else rows.new_zeros(0, dtype=acc)
    if reduction != "none":
        valid = t != ignore_index
        w_t = torch.ones_like(loss) if cw_all is None else cw_all.gather(0, torch.where(valid, t, 0))
        local = torch.stack([loss.sum(), torch.where(valid, w_t, torch.zeros_like(w_t)).sum()])
        total = local.detach()
        for group in row_groups:
            total = sum_rows(total, group)
        # The rows' total over every rank, differentiated as this rank's own part of it.
        summed = local[0] + (total[0] - local[0]).detach()
        loss = summed / total[1] if reduction == "mean" else summed
    return _finish(loss, lse, hidden, h.shape[:-1], target.shape, reduction, hidden.dtype, return_lse)
