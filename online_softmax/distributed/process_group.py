"""Vocabulary-parallel softmax over torch.distributed process groups, on plain tensors: each rank
holds a shard of the softmax dim.

    import online_softmax.distributed as osd
    y_shard = osd.softmax(x_shard, dim=-1)                 # this rank's slice of softmax(full x)
    lse = osd.logsumexp(x_shard, dim=-1)                   # the cross-entropy normalizer, every rank
    top = osd.softmax_topk(x_shard, k=5)                   # global top-k, global indices, every rank

Only per-row states travel, never the logits: the (max, sumexp) merge is one all-gather of two
numbers per row and rank; the top-k gathers k candidates per row and rank with them, in the same
single call (plus, because plain tensors do not know where their shard starts, one all-gather of
the shard lengths). The results equal the
single-process ops on the concatenated tensor (NaN and inf rows included), and softmax,
log_softmax and logsumexp are differentiable: their backward all-reduces one O(rows) sum.

Shards may differ in length. Works with any backend that supports all_gather and all_reduce(SUM):
NCCL on GPUs, Gloo on CPUs. Like every collective, the calls (and the backward of
softmax / log_softmax, which all-reduces one sum per row) must run on every rank of the group:
a backward that runs on some ranks only waits for the others forever.
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .. import _checks as checks
from ..api import SoftmaxTopK
from ..state import SoftmaxState, merge_topk_candidates
from .collectives import merge_states, merge_topk, sum_rows

_ops = torch.ops.online_softmax


class CommStats(NamedTuple):
    """Bytes one rank sends for a call, against all-gathering its logits shard instead."""
    state_bytes: int
    gather_logits_bytes: int


def global_state(x: torch.Tensor, dim: int, temperature: float = 1.0, group=None):
    """The (max, sumexp) of x / temperature over the whole sharded dim, on every rank.

    max is of x / temperature, as in :func:`online_softmax.softmax_stats`. One all-gather of the
    per-row state, gathered in one call; -inf rows, +inf and NaN behave as in the single-process op.
    """
    m, d = _ops.stats(x, dim, float(temperature))
    return merge_states(m, d, group)


class _ShardedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, temperature, log, group):
        m, d = global_state(x, dim, temperature, group)
        y = SoftmaxState(m, d, dim, temperature).normalize(x, log=log)
        ctx.save_for_backward(y)
        ctx.dim, ctx.temperature, ctx.log, ctx.group = dim, temperature, log, group
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return sharded_softmax_grad(g, y, ctx.dim, ctx.log, ctx.temperature, [ctx.group]), None, None, None, None


def sharded_softmax_grad(g, y, dim: int, log: bool, temperature: float, groups, dtype=None):
    """The gradient of a softmax (log_softmax) whose output shard is y, from its shard g: the row
    sum it needs, of g * y (of g), all-reduced over each of ``groups``; in ``dtype`` (y's if None)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    ya, ga = y.to(acc), g.to(acc)
    row = ga.sum(dim, keepdim=True) if log else (ga * ya).sum(dim, keepdim=True)
    for group in groups:
        row = sum_rows(row, group)
    dx = (ga - torch.exp(ya) * row) / temperature if log else ya * (ga - row) / temperature
    return dx.to(y.dtype if dtype is None else dtype)


class _ShardedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, temperature, group):
        m, d = global_state(x, dim, temperature, group)
        lse = SoftmaxState(m, d, dim, temperature).logsumexp()
        ctx.save_for_backward(x, m, d)
        ctx.dim, ctx.temperature = dim, temperature
        return lse.to(x.dtype)  # like torch.logsumexp

    @staticmethod
    def backward(ctx, g):
        x, m, d = ctx.saved_tensors
        p = SoftmaxState(m, d, ctx.dim, ctx.temperature).normalize(x).to(g.dtype)
        return g.unsqueeze(ctx.dim) * p / ctx.temperature, None, None, None


def check_sharded(x, dim, temperature, op, name="input"):
    op = f"distributed.{op}"
    checks.tensor(x, name, op)
    if not dist.is_available() or not dist.is_initialized():
        raise checks.fail(op, "torch.distributed is not initialized (call torch.distributed.init_process_group "
                              "first)", RuntimeError)
    if x.dim() == 0:
        raise checks.fail(op, f"{name} must have at least one dimension (the sharded dim)")
    return checks.wrap_dim(dim, x, op), checks.temperature(temperature, op)


def softmax(input: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, group=None) -> torch.Tensor:
    """This rank's slice of softmax(x_full / temperature), where x_full concatenates every rank's
    shard ``input`` along ``dim`` in rank order. Differentiable."""
    dim, temperature = check_sharded(input, dim, temperature, "softmax")
    return _ShardedSoftmax.apply(input, dim, temperature, False, group)


def log_softmax(input: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, group=None) -> torch.Tensor:
    """This rank's slice of log_softmax(x_full / temperature). Differentiable."""
    dim, temperature = check_sharded(input, dim, temperature, "log_softmax")
    return _ShardedSoftmax.apply(input, dim, temperature, True, group)


def logsumexp(input: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, group=None) -> torch.Tensor:
    """logsumexp(x_full / temperature) along ``dim`` on every rank (the cross-entropy normalizer).
    Differentiable: each rank receives the gradient of its own shard."""
    dim, temperature = check_sharded(input, dim, temperature, "logsumexp")
    return _ShardedLogSumExp.apply(input, dim, temperature, group)


def _shard_offset(n_local: int, device, group) -> int:
    """Global index of this rank's first element: the lengths of the lower ranks' shards."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(n_local, dtype=torch.int64, device=device), group=group)
    rank = dist.get_rank(group)
    return int(sum(s.item() for s in sizes[:rank])), int(sum(s.item() for s in sizes))


def global_candidates(x, k, dim, offset, temperature, groups):
    """The k best raw values along dim over every rank's shard, with global indices (the shard
    starts at ``offset``), and the whole rows' state: each rank's fused top-k of its shard (fewer
    candidates from a short shard, none from an empty one), merged from one all-gather per group."""
    kc = min(k, x.shape[dim])
    if kc > 0:
        _v, idx, m, d = _ops.softmax_topk(x, kc, dim, False, temperature)
        raw = x.gather(dim, idx)
    else:
        shape = list(x.shape)
        shape[dim] = 0
        idx = torch.zeros(shape, dtype=torch.int64, device=x.device)
        raw = x.new_zeros(shape)
        m, d = _ops.stats(x, dim, temperature)
    raw, idx = raw.movedim(dim, -1), (idx + offset).movedim(dim, -1)
    for group in groups:
        raw, idx, m, d = merge_topk(raw, idx, m, d, k, group)
    return raw.movedim(-1, dim), idx.movedim(-1, dim), m, d


def softmax_topk(input: torch.Tensor, k: int, dim: int = -1, *, log: bool = False, temperature: float = 1.0,
                 group=None) -> SoftmaxTopK:
    """The global top-k of softmax(x_full / temperature) (or log-softmax), with global indices along
    ``dim``, on every rank. Each rank runs the fused top-k on its shard, then k candidates per row
    and rank are all-gathered and merged (ties to the lower global index). Not differentiable."""
    x = input
    checks.positive_int(k, "k", "distributed.softmax_topk")
    dim, temperature = check_sharded(x, dim, temperature, "softmax_topk")
    n_local = x.shape[dim]
    offset, total = _shard_offset(n_local, x.device, group)
    if k > total:
        raise checks.fail("distributed.softmax_topk", f"k={k} is larger than the sharded dim ({total} over all ranks)")
    with torch.no_grad():
        cand_x, cand_i, m, d = global_candidates(x, k, dim, offset, temperature, [group])
        return SoftmaxTopK(SoftmaxState(m, d, dim, temperature).normalize(cand_x, log=log), cand_i)


def communication_bytes(x: torch.Tensor, dim: int = -1, k: Optional[int] = None, group=None) -> CommStats:
    """What this rank sends for softmax (k=None) or softmax_topk (k given), against all-gathering
    its shard of the logits (what an unfused implementation would need)."""
    dim = checks.wrap_dim(dim, x, "distributed.communication_bytes")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rows = 1
    for i, n in enumerate(x.shape):
        rows *= n if i != dim else 1
    acc = 8 if x.dtype == torch.float64 else 4
    if k is None:
        state = rows * acc * 2  # (m, d) per row, gathered once
    else:
        state = rows * (2 * k + 2) * 8 + 8  # k (value, index) pairs and (m, d) as float64; shard length
    gather = x.numel() * x.element_size() * (world - 1)  # every other rank's shard, received
    return CommStats(state, gather)


def beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, *,
                     num_candidates: Optional[int] = None, temperature: float = 1.0, group=None):
    """:func:`online_softmax.beam_search_step` with the vocabulary sharded across ranks: ``logits`` is
    this rank's (batch * num_beams, vocab_shard) slice. Every rank gets the same
    (scores, token_ids, beam_ids) with global token ids. Sends O(rows) for the states and
    num_candidates candidates per row."""
    from ..decoding.beam_search import BeamStep

    op = "distributed.beam_search_step"
    checks.tensor(beam_scores, "beam_scores", op)
    checks.positive_int(num_beams, "num_beams", op)
    if num_candidates is not None:
        checks.positive_int(num_candidates, "num_candidates", op)
    dim, temperature = check_sharded(logits, -1, temperature, "beam_search_step", name="logits")
    if logits.dim() != 2 or beam_scores.dim() != 2 or logits.shape[0] != beam_scores.shape[0] * num_beams:
        raise checks.fail(op, "logits must be (batch * num_beams, vocab_shard) and beam_scores (batch, num_beams); "
                              f"got {list(logits.shape)} and {list(beam_scores.shape)}")
    batch = beam_scores.shape[0]
    C = 2 * num_beams if num_candidates is None else num_candidates
    n_local = logits.shape[dim]
    offset, vocab = _shard_offset(n_local, logits.device, group)
    if not 1 <= C <= num_beams * vocab:
        raise checks.fail(op, f"num_candidates must satisfy 1 <= num_candidates <= num_beams * vocab = "
                              f"{num_beams * vocab}, got {C}")
    with torch.no_grad():
        cand, tok, m, d = global_candidates(logits, C, dim, offset, temperature, [group])  # (rows, C)
        out_dtype = torch.result_type(logits, beam_scores)
        lp = SoftmaxState(m, d, dim, temperature).normalize(cand, log=True).to(out_dtype)
        scores = (lp.view(batch, num_beams, -1) + beam_scores.to(out_dtype)[..., None]).view(batch, -1)
        beam_base = torch.arange(num_beams, device=logits.device).view(1, num_beams, 1) * vocab
        flat = (tok.view(batch, num_beams, -1) + beam_base).view(batch, -1)
        best, best_flat = merge_topk_candidates(scores, flat, C, dim)
        return BeamStep(best, best_flat % vocab, best_flat // vocab)

