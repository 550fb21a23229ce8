"""The one collective every sharded op needs: each rank's per-row numbers all-gathered in a single
call, then merged locally. A (max, sumexp) state cannot be merged by one all-reduce (it needs a MAX
and then a SUM of values rescaled by that max); gathering the states costs world x rows numbers,
O(rows) per rank, and leaves NaN and +inf rows to the same local merge as everywhere else.

Collectives go through torch's functional collectives, so that DTensor's CommDebugMode sees them
and torch.compile can trace them; on a group of one rank nothing is sent.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..state import merge_topk_candidates, rescale

# An index that never wins a tie and stays exact in float64 (below 2**53).
_NO_INDEX = float(2 ** 52)


def gather_rows(packed: torch.Tensor, group) -> torch.Tensor:
    """(world, *packed.shape): every rank's ``packed`` in rank order, from one all-gather."""
    group = dist.group.WORLD if group is None else group
    world = dist.get_world_size(group)
    if world == 1:
        return packed.unsqueeze(0)
    gathered = funcol.all_gather_single(packed.contiguous(), 0, group)
    return funcol.wait_tensor(gathered).view(world, *packed.shape)


def sum_rows(values: torch.Tensor, group) -> torch.Tensor:
    """The elementwise sum of ``values`` over the group (one all-reduce)."""
    group = dist.group.WORLD if group is None else group
    if dist.get_world_size(group) == 1:
        return values
    return funcol.wait_tensor(funcol.all_reduce(values.contiguous(), "sum", group))


def merge_gathered(m: torch.Tensor, d: torch.Tensor):
    """The merge of states gathered along dim 0, as the kernels finalize a row: NaN anywhere makes
    the max NaN, and a NaN or +inf max makes the sum NaN (the whole row NaN)."""
    m_all = m.amax(0)  # propagates NaN
    d_all = rescale(d, m, m_all.unsqueeze(0)).sum(0)
    bad = torch.isnan(m_all) | (m_all == float("inf"))
    return m_all, torch.where(bad, torch.full_like(d_all, float("nan")), d_all)


def merge_states(m: torch.Tensor, d: torch.Tensor, group, *counts: torch.Tensor):
    """The (max, sumexp) of whole rows from each rank's state of its shard, in one all-gather;
    ``counts`` (per-row numbers in m's dtype) travel in the same call and come back summed."""
    every = gather_rows(torch.stack([m, d, *counts]), group)
    return (*merge_gathered(every[:, 0], every[:, 1]), *every[:, 2:].sum(0).unbind(0))


def merge_topk(raw: torch.Tensor, index: torch.Tensor, m: torch.Tensor, d: torch.Tensor, k: int, group):
    """Every rank's candidates for rows (..., kc) — raw values with global indices, kc <= k — and
    its rows' state, merged into the k best (raw values, indices) and the whole rows' state, in one
    all-gather. Candidates travel as float64 (exact for every float dtype and for indices below
    2**53), padded to k with -inf and an index that never wins."""
    pad = k - raw.shape[-1]
    values = torch.cat([raw.double(), raw.new_full((*raw.shape[:-1], pad), float("-inf"), dtype=torch.float64)], -1)
    ids = torch.cat([index.double(), index.new_full((*index.shape[:-1], pad), _NO_INDEX, dtype=torch.float64)], -1)
    packed = torch.cat([values, ids, m.double().unsqueeze(-1), d.double().unsqueeze(-1)], -1)
    every = gather_rows(packed, group)  # (world, ..., 2k + 2)
    world = every.shape[0]
    m_all, d_all = merge_gathered(every[..., 2 * k].to(m.dtype), every[..., 2 * k + 1].to(d.dtype))
    values = every[..., :k].movedim(0, -2).reshape(*raw.shape[:-1], world * k)
    ids = every[..., k:2 * k].movedim(0, -2).reshape(*raw.shape[:-1], world * k).long()
    values, ids = merge_topk_candidates(values, ids, k, -1)
    return values.to(raw.dtype), ids, m_all, d_all
