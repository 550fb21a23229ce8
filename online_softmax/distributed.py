"""Vocabulary-parallel softmax over torch.distributed: each rank holds a shard of the softmax dim.

    import online_softmax.distributed as osd
    y_shard = osd.softmax(x_shard, dim=-1)                 # this rank's slice of softmax(full x)
    lse = osd.logsumexp(x_shard, dim=-1)                   # the cross-entropy normalizer, every rank
    top = osd.softmax_topk(x_shard, k=5)                   # global top-k, global indices, every rank

Only per-row states travel, never the logits: the (max, sumexp) merge is two all-reduces of
O(rows) values (a MAX of the maxima, then a SUM of the rescaled sums and a NaN count); the top-k
all-gathers k candidates per row and rank, O(rows * k * world). The results equal the
single-process ops on the concatenated tensor (NaN and inf rows included), and softmax,
log_softmax and logsumexp are differentiable: their backward all-reduces one O(rows) sum.

Shards may differ in length. Works with any backend that supports all_reduce(MAX/SUM) and
all_gather: NCCL on GPUs, Gloo on CPUs. Like every collective, the calls (and the backward of
softmax / log_softmax, which all-reduces one sum per row) must run on every rank of the group:
a backward that runs on some ranks only waits for the others forever.
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _checks as checks
from .api import SoftmaxTopK
from .state import SoftmaxState, merge_topk_candidates, rescale

_ops = torch.ops.online_softmax


class CommStats(NamedTuple):
    """Bytes one rank sends for a call, against all-gathering its logits shard instead."""
    state_bytes: int
    gather_logits_bytes: int


def global_state(x: torch.Tensor, dim: int, temperature: float = 1.0, group=None):
    """The (max, sumexp) of x / temperature over the whole sharded dim, on every rank.

    max is of x / temperature, as in :func:`online_softmax.softmax_stats`. Two all-reduces of the
    per-row state; -inf rows, +inf and NaN behave as in the single-process op.
    """
    m, d = _ops.stats(x, dim, float(temperature))
    return _merge_across_ranks(m, d, group)


def _merge_across_ranks(m: torch.Tensor, d: torch.Tensor, group):
    # all_reduce(MAX) does not order NaN; carry NaN as a count and reduce the rest.
    nan = torch.isnan(m)
    m_clean = torch.where(nan, torch.full_like(m, float("-inf")), m)
    m_global = m_clean.clone()
    dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
    packed = torch.stack([torch.where(nan, torch.zeros_like(d), rescale(d, m_clean, m_global)), nan.to(d.dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    d_global, nan_count = packed[0], packed[1]
    any_nan = nan_count > 0
    m_global = torch.where(any_nan, torch.full_like(m_global, float("nan")), m_global)
    # A +inf or NaN max makes the whole row NaN, as finalize() does in the kernels.
    bad = any_nan | (m_global == float("inf"))
    d_global = torch.where(bad, torch.full_like(d_global, float("nan")), d_global)
    return m_global, d_global


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
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        ya, ga = y.to(acc), g.to(acc)
        local = ga.sum(ctx.dim, keepdim=True) if ctx.log else (ga * ya).sum(ctx.dim, keepdim=True)
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.log:
            dx = (ga - torch.exp(ya) * local) / ctx.temperature
        else:
            dx = ya * (ga - local) / ctx.temperature
        return dx.to(y.dtype), None, None, None, None


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


def _check(x, dim, temperature, op, name="input"):
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
    dim, temperature = _check(input, dim, temperature, "softmax")
    return _ShardedSoftmax.apply(input, dim, temperature, False, group)


def log_softmax(input: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, group=None) -> torch.Tensor:
    """This rank's slice of log_softmax(x_full / temperature). Differentiable."""
    dim, temperature = _check(input, dim, temperature, "log_softmax")
    return _ShardedSoftmax.apply(input, dim, temperature, True, group)


def logsumexp(input: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, group=None) -> torch.Tensor:
    """logsumexp(x_full / temperature) along ``dim`` on every rank (the cross-entropy normalizer).
    Differentiable: each rank receives the gradient of its own shard."""
    dim, temperature = _check(input, dim, temperature, "logsumexp")
    return _ShardedLogSumExp.apply(input, dim, temperature, group)


def _shard_offset(n_local: int, device, group) -> int:
    """Global index of this rank's first element: the lengths of the lower ranks' shards."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(n_local, dtype=torch.int64, device=device), group=group)
    rank = dist.get_rank(group)
    return int(sum(s.item() for s in sizes[:rank])), int(sum(s.item() for s in sizes))


def _global_candidates(x, k, dim, offset, temperature, group):
    """Every rank's k best raw values along dim (fewer on short shards, padded with -inf and a huge
    index that never wins), with global indices, concatenated in rank order; and the global state."""
    n_local = x.shape[dim]
    kc = min(k, n_local)
    if kc > 0:
        _v, idx, m, d = _ops.softmax_topk(x, kc, dim, False, temperature)
        raw = x.gather(dim, idx)
    else:  # an empty shard offers no candidates and the empty state
        shape = list(x.shape)
        shape[dim] = 0
        idx = torch.zeros(shape, dtype=torch.int64, device=x.device)
        raw = x.new_zeros(shape)
        m, d = _ops.stats(x, dim, temperature)
    m, d = _merge_across_ranks(m, d, group)
    pshape = list(raw.shape)
    pshape[dim] = k - kc  # every rank sends the same shape
    raw = torch.cat([raw, raw.new_full(pshape, float("-inf"))], dim)
    idx = torch.cat([idx + offset, idx.new_full(pshape, torch.iinfo(torch.int64).max // 2)], dim)
    world = dist.get_world_size(group)
    all_raw = [torch.empty_like(raw) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_raw, raw.contiguous(), group=group)
    dist.all_gather(all_idx, idx.contiguous(), group=group)
    return torch.cat(all_raw, dim), torch.cat(all_idx, dim), m, d


def softmax_topk(input: torch.Tensor, k: int, dim: int = -1, *, log: bool = False, temperature: float = 1.0,
                 group=None) -> SoftmaxTopK:
    """The global top-k of softmax(x_full / temperature) (or log-softmax), with global indices along
    ``dim``, on every rank. Each rank runs the fused top-k on its shard, then k candidates per row
    and rank are all-gathered and merged (ties to the lower global index). Not differentiable."""
    x = input
    checks.positive_int(k, "k", "distributed.softmax_topk")
    dim, temperature = _check(x, dim, temperature, "softmax_topk")
    n_local = x.shape[dim]
    offset, total = _shard_offset(n_local, x.device, group)
    if k > total:
        raise checks.fail("distributed.softmax_topk", f"k={k} is larger than the sharded dim ({total} over all ranks)")
    with torch.no_grad():
        cand_x, cand_i, m, d = _global_candidates(x, k, dim, offset, temperature, group)
        cand_x, cand_i = merge_topk_candidates(cand_x, cand_i, k, dim)
        return SoftmaxTopK(SoftmaxState(m, d, dim, temperature).normalize(cand_x, log=log), cand_i)


def communication_bytes(x: torch.Tensor, dim: int = -1, k: Optional[int] = None, group=None) -> CommStats:
    """What this rank sends for softmax (k=None) or softmax_topk (k given), against all-gathering
    its shard of the logits (what an unfused implementation would need)."""
    dim = checks.wrap_dim(dim, x, "distributed.communication_bytes")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rows = x.numel() // max(1, x.shape[dim])
    acc = 8 if x.dtype == torch.float64 else 4
    state = rows * acc * 3  # MAX of m, then SUM of (d, NaN count)
    if k is not None:
        state += rows * k * (x.element_size() + 8) + 8  # candidates (value, int64 index), shard length
    gather = x.numel() * x.element_size() * (world - 1)  # every other rank's shard, received
    return CommStats(state, gather)


def beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, *,
                     num_candidates: Optional[int] = None, temperature: float = 1.0, group=None):
    """:func:`online_softmax.beam_search_step` with the vocabulary sharded across ranks: ``logits`` is
    this rank's (batch * num_beams, vocab_shard) slice. Every rank gets the same
    (scores, token_ids, beam_ids) with global token ids. Sends O(rows) for the states and
    num_candidates candidates per row."""
    from .decoding.beam_search import BeamStep

    op = "distributed.beam_search_step"
    checks.tensor(beam_scores, "beam_scores", op)
    checks.positive_int(num_beams, "num_beams", op)
    if num_candidates is not None:
        checks.positive_int(num_candidates, "num_candidates", op)
    dim, temperature = _check(logits, -1, temperature, "beam_search_step", name="logits")
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
        cand, tok, m, d = _global_candidates(logits, C, dim, offset, temperature, group)  # (rows, world * C)
        out_dtype = torch.result_type(logits, beam_scores)
        lp = SoftmaxState(m, d, dim, temperature).normalize(cand, log=True).to(out_dtype)
        scores = (lp.view(batch, num_beams, -1) + beam_scores.to(out_dtype)[..., None]).view(batch, -1)
        beam_base = torch.arange(num_beams, device=logits.device).view(1, num_beams, 1) * vocab
        flat = (tok.view(batch, num_beams, -1) + beam_base).view(batch, -1)
        best, best_flat = merge_topk_candidates(scores, flat, C, dim)
        return BeamStep(best, best_flat % vocab, best_flat // vocab)


# The vocabulary-parallel loss lives with the other losses; it is part of this module's API.
from .losses.vocab_parallel import cross_entropy  # noqa: E402,F401
