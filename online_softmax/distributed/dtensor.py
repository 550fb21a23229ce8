"""DTensor rules of the ops: a DTensor sharded along the softmax dimension is reduced by merging the
ranks' per-row (max, sumexp) states in one collective over that mesh dimension (a top-k: their k
candidates with them), never by gathering its rows; any other placement (``Shard`` of another dim,
``Replicate``) runs the local op, without communication, and the output is placed like the input.

The rules are DTensor's per-op handlers (``DTensor._op_dispatcher._custom_op_handlers``, the hook
torch's own argmax and convolution rules use): an op strategy can only ask for inputs to be
redistributed, which for the softmax dimension would gather the rows. Autograd runs above them, so
the ops' C++ autograd nodes call the backward ops on DTensors, which have rules too.

Placements other than ``Shard`` and ``Replicate`` (``Partial``, strided shards) are refused with a
``ValueError`` naming the argument: a partial sum must be reduced before a softmax. Uneven shards
(torch.chunk's split: some ranks may hold nothing) work, as do meshes of any size and dimension.
"""

from typing import Optional

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .. import _checks as checks
from .._checks import state_dtype
from ..state import SoftmaxState
from .collectives import merge_states, merge_topk, sum_rows
from .process_group import global_candidates, sharded_softmax_grad

_ops = torch.ops.online_softmax


# ---- placements ----

def _fail(op: str, message: str, kind=ValueError):
    return checks.fail(op, message, kind)


def check_placements(t, name: str, op: str) -> None:
    """Only Shard(dim) and Replicate() placements, with the argument named otherwise."""
    if not isinstance(t, DTensor):
        return
    for i, p in enumerate(t.placements):
        if not isinstance(p, (Shard, Replicate)):
            what = "a partial (unreduced) value" if isinstance(p, Partial) else "not supported"
            raise _fail(op, f"{name} has placement {p} on mesh dim {i} ({what}): online_softmax takes DTensors "
                            f"placed as Shard(dim) or Replicate(); redistribute {name} first")


def mesh_dims_sharding(t: DTensor, dim: int) -> list:
    """The mesh dims along which t is sharded on tensor dim ``dim``."""
    return [i for i, p in enumerate(t.placements) if isinstance(p, Shard) and p.dim % t.dim() == dim]


def groups_of(t: DTensor, mesh_dims) -> list:
    return [t.device_mesh.get_group(i) for i in mesh_dims]


def extent(t: DTensor, dim: int):
    """(offset, length) of this rank's shard of t along ``dim``."""
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[dim], shape[dim]


def wrap(local: torch.Tensor, like: DTensor, placements, shape) -> DTensor:
    """A DTensor of this rank's ``local`` piece of a global tensor of ``shape``."""
    shape = torch.Size(shape)
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return DTensor.from_local(local, like.device_mesh, tuple(placements), run_check=False, shape=shape,
                              stride=tuple(reversed(stride)))


def reduced_placements(placements, dim: int, ndim: int):
    """Placements once tensor dim ``dim`` is reduced away: its shards become replicas."""
    out = []
    for p in placements:
        if isinstance(p, Shard) and p.dim % ndim == dim:
            out.append(Replicate())
        elif isinstance(p, Shard) and p.dim % ndim > dim:
            out.append(Shard(p.dim % ndim - 1))
        else:
            out.append(p)
    return out


def replicated_on(placements, mesh_dims):
    return [Replicate() if i in mesh_dims else p for i, p in enumerate(placements)]


def local_piece(t, like: DTensor, name: str, op: str, *, align: int = 0) -> Optional[torch.Tensor]:
    """This rank's piece of ``t`` where t lines up with ``like`` (its dims right-aligned to like's,
    ``align`` trailing dims of like skipped; size-1 dims broadcast): a DTensor placed like
    ``like`` gives its local tensor; a replicated DTensor or a plain tensor (the whole value, the
    same on every rank) is cut to like's shard."""
    if t is None:
        return None
    if isinstance(t, DTensor):
        check_placements(t, name, op)
        if t.device_mesh != like.device_mesh:
            raise _fail(op, f"{name} is on another device mesh than {like.device_mesh}")
        if all(isinstance(p, Replicate) for p in t.placements):
            t = t.to_local()
        elif t.dim() + align == like.dim() and tuple(t.placements) == _aligned(like.placements, like.dim(), align):
            return t.to_local()
        else:
            raise _fail(op, f"{name} must be replicated or sharded like the input (placements "
                            f"{list(_aligned(like.placements, like.dim(), align))}), got {list(t.placements)}")
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    lead = like.dim() - align - t.dim()
    if lead < 0:
        raise _fail(op, f"{name} has more dims ({t.dim()}) than it can have against the input ({like.dim() - align})")
    for j in range(t.dim()):
        jj = j + lead
        if t.shape[j] != 1 and shape[jj] != like.shape[jj]:
            t = t.narrow(j, offset[jj], shape[jj])
    return t


def _aligned(placements, ndim: int, align: int):
    """like's placements as seen by a tensor of like's dims less the trailing ``align``."""
    out = []
    for p in placements:
        if isinstance(p, Shard) and p.dim % ndim >= ndim - align:
            out.append(Replicate())
        else:
            out.append(p)
    return tuple(out)


def _bind(op_call, args, kwargs) -> dict:
    values = {}
    for i, a in enumerate(op_call._schema.arguments):
        if i < len(args):
            values[a.name] = args[i]
        elif a.name in kwargs:
            values[a.name] = kwargs[a.name]
        else:
            values[a.name] = a.default_value if a.has_default_value() else None
    return values


def _dtensor(value, name: str, op: str) -> DTensor:
    if not isinstance(value, DTensor):
        raise _fail(op, f"{name} must be a DTensor when the other inputs are, got {type(value).__name__}", TypeError)
    check_placements(value, name, op)
    return value


def merged_state(local: torch.Tensor, dim: int, temperature: float, groups, *counts):
    m, d = _ops.stats(local, dim, temperature)
    for group in groups:
        m, d, *counts = merge_states(m, d, group, *counts)
    return (m, d, *counts) if counts else (m, d)


# ---- softmax ----

def _rows_input(op_call, args, kwargs):
    """The bound arguments, the op's name, its input x (a checked DTensor) and x's softmax dim."""
    a = _bind(op_call, args, kwargs)
    op = op_call._schema.name.split("::")[-1]
    x = _dtensor(a["x"], "x", op)
    return a, op, x, checks.wrap_dim(a["dim"], x, op)


def _forward(op_call, args, kwargs):
    a, op, x, dim = _rows_input(op_call, args, kwargs)
    local = x.to_local()
    sharded = mesh_dims_sharding(x, dim)
    if not sharded:
        out = op_call(local, dim, a["log"], a["temperature"], a["dtype"])
    else:
        temperature = checks.temperature(a["temperature"], op)
        checks.float_dtype(a["dtype"], "dtype", op)
        checks.floating(local, "x", op)
        if a["dtype"] is not None:
            local = local.to(a["dtype"])
        m, d = merged_state(local, dim, temperature, groups_of(x, sharded))
        out = SoftmaxState(m, d, dim, temperature).normalize(local, log=a["log"])
    return wrap(out, x, x.placements, x.shape)


def _backward(op_call, args, kwargs):
    """backward, and backward_ (the same gradient written over grad_out's local tensor)."""
    a = _bind(op_call, args, kwargs)
    inplace = op_call._schema.name.endswith("_")
    op = "backward_" if inplace else "backward"
    y = _dtensor(a["out"], "out", op)
    g = _dtensor(a["grad_out"], "grad_out", op)
    if tuple(g.placements) != tuple(y.placements):
        if inplace:
            raise _fail(op, f"grad_out is written in place and must be placed like out ({list(y.placements)}), "
                            f"got {list(g.placements)}")
        g = g.redistribute(y.device_mesh, y.placements)
    dim = checks.wrap_dim(a["dim"], y, op)
    sharded = mesh_dims_sharding(y, dim)
    local_args = (g.to_local(), y.to_local(), dim, a["log"], a["temperature"])
    if not sharded:
        dx = op_call(*local_args) if inplace else op_call(*local_args, a["input_dtype"])
    else:
        dx = sharded_softmax_grad(g.to_local(), y.to_local(), dim, a["log"], checks.temperature(a["temperature"], op),
                                  groups_of(y, sharded), None if inplace else a["input_dtype"])
        if inplace:
            local_args[0].copy_(dx)
    return None if inplace else wrap(dx, y, y.placements, y.shape)


def _masked_forward(op_call, args, kwargs):
    a, op, x, dim = _rows_input(op_call, args, kwargs)
    local = x.to_local()
    mask = local_piece(a["mask"], x, "mask", op)
    causal_offset = a["causal_offset"]
    if a["causal"]:
        if x.dim() < 2:
            raise _fail(op, "causal=True needs x with at least 2 dims (queries, keys)")
        # The local block's first query and key are global (q0, k0): j <= i + c holds globally
        # where j_local <= i_local + c + q0 - k0.
        q0, _ = extent(x, x.dim() - 2)
        k0, _ = extent(x, x.dim() - 1)
        causal_offset = causal_offset + q0 - k0
    sharded = mesh_dims_sharding(x, dim)
    if not sharded:
        out = op_call(local, mask, a["causal"], causal_offset, a["log"], a["scale"], dim, a["dtype"])
        return wrap(out, x, x.placements, x.shape)
    checks.floating(local, "x", op)
    checks.float_dtype(a["dtype"], "dtype", op)
    if a["causal"] and dim != x.dim() - 1:
        raise _fail(op, f"causal=True needs dim to be the last dim, got {a['dim']}")
    acc = state_dtype(local.dtype if a["dtype"] is None else a["dtype"])
    z = local.to(acc) * checks.real(a["scale"], "scale", op)
    taking_part = torch.ones_like(z, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            taking_part = taking_part & mask
        else:
            z = z + mask.to(acc)
            taking_part = taking_part & (mask != float("-inf"))
    if a["causal"]:
        q = torch.arange(z.shape[-2], device=z.device)[:, None]
        k = torch.arange(z.shape[-1], device=z.device)[None, :]
        taking_part = taking_part & (k <= q + causal_offset)
    z = torch.where(taking_part, z, torch.full_like(z, float("-inf")))
    count = taking_part.sum(dim, dtype=acc)
    m, d, count = merged_state(z, dim, 1.0, groups_of(x, sharded), count)
    y = SoftmaxState(m, d, dim).normalize(z, log=a["log"])
    # Masked positions are 0 (log: -inf) whatever the row holds; a row where nothing takes part is all so.
    y = torch.where(taking_part, y, torch.full_like(y, float("-inf") if a["log"] else 0.0))
    out_dtype = local.dtype if a["dtype"] is None else a["dtype"]
    return wrap(y.to(out_dtype), x, x.placements, x.shape)


def _stats(op_call, args, kwargs):
    a, op, x, dim = _rows_input(op_call, args, kwargs)
    sharded = mesh_dims_sharding(x, dim)
    if sharded:
        m, d = merged_state(x.to_local(), dim, checks.temperature(a["temperature"], op), groups_of(x, sharded))
    else:
        m, d = op_call(x.to_local(), dim, a["temperature"])
    placements = reduced_placements(x.placements, dim, x.dim())
    shape = checks.reduced_shape(x, dim)
    return wrap(m, x, placements, shape), wrap(d, x, placements, shape)


# ---- top-k ----

def _softmax_topk(op_call, args, kwargs):
    a, op, x, dim = _rows_input(op_call, args, kwargs)
    k = a["k"]
    sharded = mesh_dims_sharding(x, dim)
    local = x.to_local()
    if not sharded:
        values, indices, m, d = op_call(local, k, dim, a["log"], a["temperature"])
    else:
        checks.positive_int(k, "k", op)
        checks.k_in_range(k, x.shape[dim], op)
        checks.floating(local, "x", op)
        temperature = checks.temperature(a["temperature"], op)
        offset, _ = extent(x, dim)
        raw, indices, m, d = global_candidates(local, k, dim, offset, temperature, groups_of(x, sharded))
        values = SoftmaxState(m, d, dim, temperature).normalize(raw, log=a["log"])
    top_placements = replicated_on(x.placements, sharded)
    top_shape = list(x.shape)
    top_shape[dim] = k
    stat_placements = reduced_placements(x.placements, dim, x.dim())
    stat_shape = checks.reduced_shape(x, dim)
    return (wrap(values, x, top_placements, top_shape), wrap(indices, x, top_placements, top_shape),
            wrap(m, x, stat_placements, stat_shape), wrap(d, x, stat_placements, stat_shape))


def _softmax_topk_backward(op_call, args, kwargs):
    a = _bind(op_call, args, kwargs)
    op = "softmax_topk_backward"
    x = _dtensor(a["x"], "x", op)
    dim = checks.wrap_dim(a["dim"], x, op)
    sharded = mesh_dims_sharding(x, dim)
    names = ("grad_values", "indices", "max", "sumexp")
    if not sharded:
        g, idx, m, d = (_dtensor(a[n], n, op).to_local() for n in names)
        dx = op_call(g, x.to_local(), idx, m, d, dim, a["log"], a["temperature"])
        return wrap(dx, x, x.placements, x.shape)
    # The k entries are replicated over the class-sharded mesh dims; each rank adds the ones in its
    # shard: dx_j = ([j in top] g_j (p_j) - p_j * sum_i g_i (p_i)) / T, the sum over the k entries.
    g, idx, m, d = (_dtensor(a[n], n, op).to_local() for n in names)
    local = x.to_local()
    temperature = checks.temperature(a["temperature"], op)
    acc = m.dtype
    offset, n_local = extent(x, dim)
    p = SoftmaxState(m, d, dim, temperature).normalize(local.to(acc))
    in_shard = (idx >= offset) & (idx < offset + n_local)
    local_idx = torch.where(in_shard, idx - offset, torch.zeros_like(idx))
    g = g.to(acc)
    if a["log"]:
        row = g.sum(dim, keepdim=True)
        own = torch.where(in_shard, g, torch.zeros_like(g))
    else:
        p_top = p.gather(dim, local_idx) if n_local else torch.zeros_like(g)
        own = torch.where(in_shard, g * p_top, torch.zeros_like(g))
        row = own.sum(dim, keepdim=True)
        for group in groups_of(x, sharded):
            row = sum_rows(row, group)
    dx = -p * row
    if n_local:
        dx = dx.scatter_add(dim, local_idx, own)
    return wrap((dx / temperature).to(local.dtype), x, x.placements, x.shape)


# ---- cross-entropy ----

def _cross_entropy_backward(op_call, args, kwargs):
    a = _bind(op_call, args, kwargs)
    op = op_call._schema.name.split("::")[-1]
    x = _dtensor(a["x"], "x", op)
    if x.dim() != 2:
        raise _fail(op, f"x must be (rows, classes), got {x.dim()} dims")
    rows = {n: local_piece(a[n], x, n, op, align=1)
            for n in ("max", "sumexp", "target", "p_scale", "target_scale", "smooth_scale")}
    sharded = mesh_dims_sharding(x, 1)
    offset, n_local = extent(x, 1)
    weight = a["weight"]
    if isinstance(weight, DTensor) and not all(isinstance(p, Replicate) for p in weight.placements):
        weight = _class_shard(weight, x, "weight", op)
    elif weight is not None:
        weight = (weight.to_local() if isinstance(weight, DTensor) else weight).narrow(0, offset, n_local)
    local = x.to_local()
    t, target_scale = rows["target"], rows["target_scale"]
    if sharded:
        here = (t >= offset) & (t < offset + n_local)
        t = torch.where(here, t - offset, torch.zeros_like(t))
        target_scale = torch.where(here, target_scale, torch.zeros_like(target_scale))
    if n_local == 0:  # nothing of the classes here: an empty gradient (the ops want classes)
        return None if op.endswith("_") else wrap(torch.empty_like(local), x, x.placements, x.shape)
    out = op_call(local, rows["max"], rows["sumexp"], t, rows["p_scale"], target_scale, rows["smooth_scale"], weight)
    return None if op.endswith("_") else wrap(out, x, x.placements, x.shape)


def _class_shard(weight: DTensor, x: DTensor, name: str, op: str) -> torch.Tensor:
    """The local piece of class weights sharded along the same mesh dims as x's classes."""
    want = tuple(Shard(0) if isinstance(p, Shard) and p.dim % x.dim() == x.dim() - 1 else Replicate()
                 for p in x.placements)
    if weight.dim() != 1 or tuple(weight.placements) != want:
        raise _fail(op, f"{name} must be replicated, or sharded like the classes (placements {list(want)}), "
                        f"got {list(weight.placements)}")
    return weight.to_local()


# ---- ops computed row by row: rows may be split or replicated, the classes may not ----

# For each op, the argument whose rows (dim 0) the outputs follow; None: replicated inputs only.
_ROW_OPS = {
    "token_logprobs": "x",
    "token_logprobs_backward": "x",
    "token_logprobs_backward_": "x",
    "sample_categorical": "x",
    "top_p_threshold": "x",
    "distillation_forward": "student",
    "distillation_backward": "student",
    "distillation_backward_": "student",
    "beam_search_step": "beam_scores",
    "rejection_sample": None,
}


def _row_op(op_call, args, kwargs):
    """The local op on each rank's rows. Every DTensor input is Replicate() or Shard(0) on each mesh
    dim, the same for all of them on a dim; outputs are Shard(0) where the inputs are."""
    a = _bind(op_call, args, kwargs)
    op = op_call._schema.name.split("::")[-1]
    tensors = {n: v for n, v in a.items() if isinstance(v, DTensor)}
    for n, v in tensors.items():
        check_placements(v, n, op)
    first = next(iter(tensors.values()))
    mesh = first.device_mesh
    row_arg = _ROW_OPS[op]
    row_dims = set()
    for n, v in tensors.items():
        if v.device_mesh != mesh:
            raise _fail(op, f"{n} is on another device mesh than the other inputs")
        for i, p in enumerate(v.placements):
            if isinstance(p, Shard) and (p.dim % v.dim() != 0 or row_arg is None):
                hint = (" (a vocabulary split across ranks: online_softmax.distributed.beam_search_step)"
                        if op == "beam_search_step" else "")
                raise _fail(op, f"{n} is sharded along dim {p.dim % v.dim()} (mesh dim {i}): {op} runs on whole "
                                f"rows; shard only the rows (Shard(0)) or replicate it{hint}", NotImplementedError)
            if isinstance(p, Shard):
                row_dims.add(i)
    for n, v in tensors.items():
        for i in row_dims:
            if v.dim() and not isinstance(v.placements[i], Shard):
                raise _fail(op, f"{n} is replicated on mesh dim {i}, where the other inputs' rows are sharded: "
                                f"shard every input's rows alike")
    local = {n: (v.to_local() if isinstance(v, DTensor) else v) for n, v in a.items()}
    out = op_call(**local)
    if out is None:
        return None
    ref = tensors.get(row_arg) if row_arg else None
    placements = [Shard(0) if i in row_dims else Replicate() for i in range(mesh.ndim)]

    def place(t):
        if not row_dims:
            return wrap(t, first, [Replicate()] * mesh.ndim, t.shape)
        if t.dim() == 0 or ref is None or t.shape[0] != ref.to_local().shape[0]:
            raise _fail(op, "an output does not follow the rows of the inputs: replicate the inputs",
                        NotImplementedError)
        return wrap(t, first, placements, (ref.shape[0], *t.shape[1:]))

    return tuple(place(t) for t in out) if isinstance(out, (tuple, list)) else place(out)


_RULES = {
    "forward": _forward,
    "backward": _backward,
    "backward_": _backward,
    "masked_forward": _masked_forward,
    "stats": _stats,
    "softmax_topk": _softmax_topk,
    "softmax_topk_backward": _softmax_topk_backward,
    "cross_entropy_backward": _cross_entropy_backward,
    "cross_entropy_backward_": _cross_entropy_backward,
    **{name: _row_op for name in _ROW_OPS},
}


def install() -> None:
    """Register the rules with DTensor's dispatcher (idempotent)."""
    handlers = getattr(DTensor._op_dispatcher, "_custom_op_handlers", None)
    if handlers is None:  # a torch whose DTensor has no per-op handlers: the ops stay without rules
        return
    for name, rule in _RULES.items():
        handlers[getattr(_ops, name).default] = rule


install()


# ---- softmax_stats with a gradient ----

class _ShardedStats(torch.autograd.Function):
    """(m, d) of a tensor split along dim, on each rank's local piece, with the stats op's
    derivative: dm/dx = e_a / t for a the row's first argmax over the whole row (found by one
    all-gather of each shard's best (value, index) in the backward: the stats node's own argmax
    would run as a DTensor reduction), dd/dx = d (p - e_a) / t."""

    @staticmethod
    def forward(ctx, x, dim, temperature, offset, groups):
        m, d = merged_state(x, dim, temperature, groups)
        ctx.save_for_backward(x, m, d)
        ctx.dim, ctx.temperature, ctx.offset, ctx.groups = dim, temperature, offset, groups
        return m, d

    @staticmethod
    def backward(ctx, gm, gd):
        x, m, d = ctx.saved_tensors
        dim, t = ctx.dim, ctx.temperature
        acc = m.dtype
        n = x.shape[dim]
        if n:
            best, at = x.max(dim, keepdim=True)
            best, at = best.to(torch.float64), at + ctx.offset
        else:
            shape = list(x.shape)
            shape[dim] = 1
            best = x.new_full(shape, float("-inf"), dtype=torch.float64)
            at = torch.zeros(shape, dtype=torch.int64, device=x.device)
        best, at = best.movedim(dim, -1), at.movedim(dim, -1)
        for group in ctx.groups:
            best, at, _m, _d = merge_topk(best, at, m.double(), d.double(), 1, group)
        first = at.movedim(-1, dim) - ctx.offset
        positions = torch.arange(n, device=x.device).view([-1 if i == dim else 1 for i in range(x.dim())])
        onehot = (positions == first).to(acc)
        p = SoftmaxState(m, d, dim, t).normalize(x.to(acc))
        gm = torch.zeros_like(m) if gm is None else gm.to(acc)
        gd = torch.zeros_like(d) if gd is None else gd.to(acc)
        dx = (gm.unsqueeze(dim) * onehot + gd.unsqueeze(dim) * d.unsqueeze(dim) * (p - onehot)) / t
        return dx.to(x.dtype), None, None, None, None


def sharded_stats(x: DTensor, dim: int, temperature: float):
    """softmax_stats' (m, d) of a DTensor, differentiable on each rank's piece whatever the
    placement (the stats node's derivative would run argmax and scatter as DTensor ops, which
    replicate the gradient and fail on an empty piece)."""
    op = "softmax_stats"
    check_placements(x, "input", op)
    dim = checks.wrap_dim(dim, x, op)
    sharded = mesh_dims_sharding(x, dim)
    checks.floating(x, "input", op)
    temperature = checks.temperature(temperature, op)
    offset, _ = extent(x, dim)
    m, d = _ShardedStats.apply(x.to_local(), dim, temperature, offset, groups_of(x, sharded))
    placements, shape = reduced_placements(x.placements, dim, x.dim()), checks.reduced_shape(x, dim)
    return wrap(m, x, placements, shape), wrap(d, x, placements, shape)
