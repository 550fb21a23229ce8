"""The partial softmax state (m, d) as a first-class object.

For values x (scaled by 1 / temperature) along one dim, the state is ``max = max(x)`` and
``sumexp = sum(exp(x - max))``. States of disjoint pieces of a row merge exactly:

    m = max(m1, m2)
    d = d1 * exp(m1 - m) + d2 * exp(m2 - m)

and the empty state (-inf, 0) is the identity of that merge. This lets a row be processed in
chunks (streamed, or split across threads or ranks) and normalized afterwards.
"""

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from . import _checks as checks
from ._dtensor import is_dtensor

_ops = torch.ops.online_softmax


def rescale(d: torch.Tensor, m_from: torch.Tensor, m_to: torch.Tensor) -> torch.Tensor:
    """A sum of exp(x - m_from) re-expressed as a sum of exp(x - m_to), for m_to >= m_from.

    Equal maxima (also -inf == -inf) scale by exactly 1, so the empty state's (-inf) - (-inf) never
    happens; NaN and +inf in either max still give NaN, as the unguarded formula would."""
    return d * torch.where(m_from == m_to, torch.ones_like(m_from), torch.exp(m_from - m_to))


def merge_pair(m1: torch.Tensor, d1: torch.Tensor, m2: torch.Tensor, d2: torch.Tensor):
    """Merge two (max, sumexp) pairs elementwise. (-inf, 0) is the identity and never makes NaN."""
    m = torch.maximum(m1, m2)  # NaN propagates
    return m, rescale(d1, m1, m) + rescale(d2, m2, m)


@dataclass(frozen=True)
class SoftmaxState:
    """Per-row (max, sumexp) of x / temperature along ``dim`` (``dim`` removed from the shape).

    ``dim`` is the softmax dim of the tensors the state describes, counted from the front.
    """

    max: torch.Tensor
    sumexp: torch.Tensor
    dim: int
    temperature: float = 1.0

    def merge(self, other: "SoftmaxState") -> "SoftmaxState":
        """The state of the union of the two pieces of each row."""
        op = "SoftmaxState.merge"
        if not isinstance(other, SoftmaxState):
            raise checks.fail(op, f"other must be a SoftmaxState, got {type(other).__name__}", TypeError)
        if other.dim != self.dim or other.temperature != self.temperature:
            raise checks.fail(op, "states must share dim and temperature, got dim "
                                  f"{self.dim} vs {other.dim}, temperature {self.temperature} vs {other.temperature}")
        if other.max.shape != self.max.shape:
            raise checks.fail(op, f"state shapes differ: {list(self.max.shape)} vs {list(other.max.shape)}")
        m, d = merge_pair(self.max, self.sumexp, other.max, other.sumexp)
        return SoftmaxState(m, d, self.dim, self.temperature)

    def logsumexp(self) -> torch.Tensor:
        """log(sum(exp(x / t))) per row, with torch.logsumexp's answers for -inf, +inf and NaN."""
        lse = self.max + torch.log(self.sumexp)
        # All -inf (or empty): -inf; a +inf entry: +inf (d is NaN there by construction).
        lse = torch.where(self.max == float("-inf"), self.max, lse)
        return torch.where(self.max == float("inf"), self.max, lse)

    def normalize(self, x_chunk: torch.Tensor, *, log: bool = False) -> torch.Tensor:
        """softmax (or log_softmax) of a chunk of the rows, relative to the whole rows' state."""
        op = "SoftmaxState.normalize"
        checks.tensor(x_chunk, "x_chunk", op)
        if x_chunk.dim() != self.max.dim() + 1:
            raise checks.fail(op, f"x_chunk must have {self.max.dim() + 1} dimensions (the state's plus "
                                  f"dim {self.dim}), got {x_chunk.dim()}")
        m = self.max.unsqueeze(self.dim)
        d = self.sumexp.unsqueeze(self.dim)
        finite = torch.isfinite(m)
        # Rows without a finite max (all -inf, +inf or NaN inside) are NaN, as in torch.softmax.
        m = torch.where(finite, m, torch.zeros_like(m))
        d = torch.where(finite, d, torch.full_like(d, float("nan")))
        z = x_chunk.to(m.dtype) / self.temperature - m
        out = z - torch.log(d) if log else torch.exp(z) / d
        return out.to(x_chunk.dtype)


def merge_topk_candidates(values: torch.Tensor, indices: torch.Tensor, k: int, dim: int):
    """The (at most) k best (value, index) pairs along ``dim``, in the library's top-k order: larger first,
    NaN above every number, ties to the lower index. Used to merge the top-k lists of chunks or
    ranks, whose candidates carry global indices."""
    by_index = indices.argsort(dim=dim, stable=True)
    v, i = values.gather(dim, by_index), indices.gather(dim, by_index)
    v, order = torch.sort(v, dim=dim, descending=True, stable=True)  # NaN sorts first, ties keep index order
    i = i.gather(dim, order)
    k = min(k, v.shape[dim])
    return v.narrow(dim, 0, k), i.narrow(dim, 0, k)


def softmax_stats(input: torch.Tensor, dim: int = -1, *, temperature: float = 1.0,
                  mask: Optional[torch.Tensor] = None) -> SoftmaxState:
    """The online state of input / temperature along dim, computed in one read of the input.

    ``mask``: a bool tensor that broadcasts to the input, True where a position takes part (as in
    :func:`~online_softmax.softmax`); the state is that of the positions taking part, and a row
    with none is the empty state (-inf, 0). It costs one pass more (the masked input is built first).
    """
    op = "softmax_stats"
    checks.tensor(input, "input", op)
    checks.dim_type(dim, op)
    temperature = checks.real(temperature, "temperature", op)  # its range: the op's own check
    if mask is not None:
        checks.bool_mask(mask, input, op)
        input = input.masked_fill(~mask, float("-inf"))
    if is_dtensor(input) and input.dim() > 0:
        from .distributed.dtensor import sharded_stats

        return SoftmaxState(*sharded_stats(input, dim, temperature), checks.wrap_dim(dim, input, op), temperature)
    m, d = _ops.stats(input, dim, temperature)
    return SoftmaxState(m, d, checks.wrap_dim(dim, input, op), temperature)


def merge_states(states: Iterable[SoftmaxState]) -> SoftmaxState:
    """Merge the states of several pieces of the same rows (in any order)."""
    states = list(states)
    if not states:
        raise checks.fail("merge_states", "states must not be empty")
    out = states[0]
    for st in states[1:]:
        out = out.merge(st)
    return out
