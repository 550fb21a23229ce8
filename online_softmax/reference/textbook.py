"""Textbook softmax algorithms in plain PyTorch: test oracles and documentation of the math.

Nothing in the production code path calls this module. It exists so that every kernel in the
package can be checked against a short, obviously correct implementation of the same algorithm,
and so that a reader can see the mathematics that the C++/CUDA kernels implement.

Every function works along the last dimension of a tensor with at least one dimension and, unless
its docstring says otherwise, computes in the dtype of its input.

Notation (for one row x_1..x_n):

    softmax(x)_i     = exp(x_i) / sum_j exp(x_j)
    log_softmax(x)_i = x_i - log(sum_j exp(x_j))

Because exp(x - c) / sum_j exp(x_j - c) is the same number for every constant c, we are free to pick
c = max(x). Then every exponent is <= 0, nothing overflows, and the largest term is exactly 1, so
the denominator is >= 1 and nothing underflows to a zero denominator either.

The whole package rests on the *partial state* of a set of values S:

    m(S) = max_{j in S} x_j
    d(S) = sum_{j in S} exp(x_j - m(S))

and on the fact that the states of two disjoint sets A and B combine into the state of A u B:

    m = max(m_A, m_B)
    d = d_A * exp(m_A - m) + d_B * exp(m_B - m)

(rescale each normalizer from its own reference point to the common one, then add). This merge is
associative and commutative, and the state of the empty set, (m, d) = (-inf, 0), is its identity.
Given the state (m, d) of a whole row, the outputs are

    softmax(x)_i     = exp(x_i - m) / d
    log_softmax(x)_i = x_i - m - log(d)

Special values follow torch.softmax. In IEEE arithmetic (-inf) - (-inf) is NaN, so merging naively
with an empty state would turn 0 * exp(NaN) into NaN. The helper ``_rescale`` (one element at a
time) therefore uses a factor of exactly 0 when the value being rescaled is -inf (the element is -inf
and contributes nothing); ``merge`` of two states is the package's own ``state.merge_pair``, which
scales equal maxima (also -inf == -inf) by exactly 1. Everything else is left to IEEE arithmetic, which gives
the same answers as torch:

* a NaN logit makes m NaN (torch.maximum and amax propagate NaN), hence d NaN, hence a NaN row;
* a +inf logit makes m = +inf and exp(inf - inf) = NaN enters d, hence a NaN row;
* a row that is entirely -inf has m = -inf and d = 0; the final exp(x - m) / d is NaN / 0 = NaN.
"""

import heapq
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..state import merge_pair

__all__ = [
    "naive_softmax",
    "safe_softmax",
    "online_softmax",
    "SoftmaxPartial",
    "empty_state",
    "partial_state",
    "merge",
    "softmax_from_state",
    "log_softmax_from_state",
    "block_online_softmax",
    "merge_two_halves",
    "batched_block_online_softmax",
    "online_softmax_topk",
]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating point dtype, got {x.dtype}")


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _rescale(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(a - m), except that the factor is exactly 0 wherever a == -inf.

    ``a`` is an old reference point (a running max, or a single logit) and ``m >= a`` the new one.
    When a == -inf the quantity being rescaled is zero (the empty state's d, or the contribution of
    a -inf logit), so the factor does not matter as long as it is finite; choosing 0 avoids
    exp((-inf) - (-inf)) = exp(NaN) = NaN when m is -inf too. NaN and +inf in ``a`` or ``m`` still
    produce NaN, exactly as in the unguarded formula.
    """
    return torch.exp(a - m).masked_fill(a == -math.inf, 0.0)


# --------------------------------------------------------------------------------------------
# The three classic formulations
# --------------------------------------------------------------------------------------------


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax(x)_i = exp(x_i) / sum_j exp(x_j), literally, with no max subtraction.

    Two passes over x (sum of exponentials, then divide). This is the formula from the textbook and
    it is numerically broken on purpose: exp overflows to +inf once x_i exceeds about 88.7 in
    float32 (709.8 in float64, 11.1 in float16), after which the row becomes inf / inf = NaN; and if
    every x_i is very negative, every exp underflows to 0 and the row becomes 0 / 0 = NaN. It is
    here to show why every real implementation subtracts the maximum first.
    """
    _check_input(x)
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def safe_softmax(x: torch.Tensor) -> torch.Tensor:
    """Max-subtracted softmax in three passes over x.

    pass 1: m = max_j x_j
    pass 2: d = sum_j exp(x_j - m)
    pass 3: y_i = exp(x_i - m) / d

    All exponents are <= 0 and the largest term is 1, so nothing overflows and d >= 1 for any row
    of finite numbers. The price is reading x three times (the exponentials of pass 2 are
    recomputed in pass 3, as a kernel that does not keep the row on chip would do).
    """
    _check_input(x)
    if x.shape[-1] == 0:
        return torch.empty_like(x)
    m = torch.amax(x, dim=-1, keepdim=True)  # pass 1
    d = torch.exp(x - m).sum(dim=-1, keepdim=True)  # pass 2
    return torch.exp(x - m) / d  # pass 3


def online_softmax(x: torch.Tensor) -> torch.Tensor:
    """Online normalizer (Milakov & Gimelshein 2018, arXiv:1805.02867): two passes over x.

    Pass 1 walks the row once, element by element, keeping the running max m and the running
    normalizer d = sum of exp(x_k - m) over the elements seen so far:

        m_0 = -inf, d_0 = 0
        m_j = max(m_{j-1}, x_j)
        d_j = d_{j-1} * exp(m_{j-1} - m_j) + exp(x_j - m_j)

    When the max grows, the old sum is rescaled to the new reference point; otherwise the factor is
    exp(0) = 1. After the last element, (m_n, d_n) equals (max, sum exp(x - max)) of safe softmax,
    obtained in one read instead of two. Pass 2 writes y_i = exp(x_i - m_n) / d_n.

    The loop runs over columns only; all rows (all leading dimensions) advance together.
    """
    _check_input(x)
    n = x.shape[-1]
    if n == 0:
        return torch.empty_like(x)
    state = empty_state(x.shape[:-1], dtype=x.dtype, device=x.device)
    m, d = state.m, state.d
    for j in range(n):
        xj = x[..., j]
        m_new = torch.maximum(m, xj)  # propagates NaN
        d = d * _rescale(m, m_new) + _rescale(xj, m_new)
        m = m_new
    return softmax_from_state(x, SoftmaxPartial(m, d))


# --------------------------------------------------------------------------------------------
# Partial states and their merge
# --------------------------------------------------------------------------------------------


class SoftmaxPartial(NamedTuple):
    """Partial softmax state of a set of values, per row: m = max, d = sum exp(x - m).

    Both tensors have the shape of the input without its last dimension.
    """

    m: torch.Tensor
    d: torch.Tensor


def empty_state(
    shape: Sequence[int],
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> SoftmaxPartial:
    """The state of the empty set, (m, d) = (-inf, 0): the identity element of ``merge``."""
    m = torch.full(tuple(shape), -math.inf, dtype=dtype, device=device)
    d = torch.zeros(tuple(shape), dtype=dtype, device=device)
    return SoftmaxPartial(m, d)


def partial_state(x: torch.Tensor) -> SoftmaxPartial:
    """State of a block of values along the last dim: m = max_j x_j, d = sum_j exp(x_j - m).

    A block that is empty or contains only -inf gives the empty state (-inf, 0). A block with a NaN
    gives m = NaN, d = NaN; a block with +inf gives m = +inf, d = NaN (from exp(inf - inf)).
    """
    _check_input(x)
    if x.shape[-1] == 0:
        return empty_state(x.shape[:-1], dtype=x.dtype, device=x.device)
    m = torch.amax(x, dim=-1)  # propagates NaN
    d = _rescale(x, m.unsqueeze(-1)).sum(dim=-1)
    return SoftmaxPartial(m, d)


def merge(a: SoftmaxPartial, b: SoftmaxPartial) -> SoftmaxPartial:
    """Combine the states of two disjoint sets of values (elementwise over rows).

        m = max(m_a, m_b)
        d = d_a * exp(m_a - m) + d_b * exp(m_b - m)

    Associative and commutative (up to rounding in d for associativity; exactly for
    commutativity). The factor for a side whose m is -inf is taken as 0, so the empty state
    (-inf, 0) is an exact identity and merging two empty states gives (-inf, 0), never NaN. NaN
    and +inf in either state still yield NaN in d.
    """
    return SoftmaxPartial(*merge_pair(a.m, a.d, b.m, b.d))  # the package's one merge (state.py)


def softmax_from_state(x: torch.Tensor, state: SoftmaxPartial) -> torch.Tensor:
    """Final normalization: y_i = exp(x_i - m) / d, with (m, d) the state of the whole row."""
    return torch.exp(x - state.m.unsqueeze(-1)) / state.d.unsqueeze(-1)


def log_softmax_from_state(x: torch.Tensor, state: SoftmaxPartial) -> torch.Tensor:
    """log_softmax from the row state: log y_i = x_i - m - log(d).

    An all -inf row gives (-inf) - (-inf) - log 0 = NaN, like torch.log_softmax; a -inf element in
    an otherwise finite row gives -inf.
    """
    return x - state.m.unsqueeze(-1) - torch.log(state.d).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Block formulations (what threads, warps, blocks, chunks and ranks do)
# --------------------------------------------------------------------------------------------


def block_online_softmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Online softmax one tile at a time.

    The last dim is cut into tiles of ``block_size`` elements (the last tile may be shorter). Each
    tile's state (m_t, d_t) is computed on its own and folded into the running state from left to
    right with ``merge``, starting from the empty state:

        s = (-inf, 0);  for each tile t: s = merge(s, partial_state(tile_t))

    then y = exp(x - m) / d. With block_size = 1 this is exactly ``online_softmax``; with
    block_size >= n it is ``safe_softmax`` with passes 1 and 2 fused.
    """
    _check_input(x)
    _check_positive_int(block_size, "block_size")
    n = x.shape[-1]
    state = empty_state(x.shape[:-1], dtype=x.dtype, device=x.device)
    for start in range(0, n, block_size):
        state = merge(state, partial_state(x[..., start:start + block_size]))
    return softmax_from_state(x, state)


def merge_two_halves(x: torch.Tensor, split: int) -> torch.Tensor:
    """Softmax from two independently computed partial results.

    The states of x[..., :split] and x[..., split:] are computed separately (as two threads, two
    kernels or two GPUs would), merged once, and used to normalize the whole row. ``split`` may be
    0 or n, in which case one side is the empty state.
    """
    _check_input(x)
    n = x.shape[-1]
    if isinstance(split, bool) or not isinstance(split, int):
        raise ValueError(f"split must be an int, got {type(split).__name__}")
    if not 0 <= split <= n:
        raise ValueError(f"split must be in [0, {n}], got {split}")
    left = partial_state(x[..., :split])
    right = partial_state(x[..., split:])
    return softmax_from_state(x, merge(left, right))


def batched_block_online_softmax(x: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """All rows and all blocks at once, then a tree reduction of the block states.

    With n the row length, block = ceil(n / num_blocks). The row is padded with -inf up to
    num_blocks * block and viewed as (..., num_blocks, block). One vectorized ``partial_state``
    gives every block's (m, d); a block that is only padding gets the empty state (-inf, 0), which
    is why the merge must treat (-inf) - (-inf) as a zero contribution. The num_blocks states of
    each row are then merged pairwise, level by level, like a shuffle tree (an odd count is padded
    with one more empty state), and the row is normalized with the final state.
    """
    _check_input(x)
    _check_positive_int(num_blocks, "num_blocks")
    n = x.shape[-1]
    if n == 0:
        return torch.empty_like(x)
    block = -(-n // num_blocks)  # ceil(n / num_blocks)
    pad = num_blocks * block - n
    padded = torch.cat([x, x.new_full((*x.shape[:-1], pad), -math.inf)], dim=-1)
    tiles = padded.reshape(*x.shape[:-1], num_blocks, block)
    m, d = partial_state(tiles)  # shapes (..., num_blocks)
    while m.shape[-1] > 1:
        if m.shape[-1] % 2 == 1:
            extra = empty_state((*m.shape[:-1], 1), dtype=m.dtype, device=m.device)
            m = torch.cat([m, extra.m], dim=-1)
            d = torch.cat([d, extra.d], dim=-1)
        even = SoftmaxPartial(m[..., 0::2], d[..., 0::2])
        odd = SoftmaxPartial(m[..., 1::2], d[..., 1::2])
        m, d = merge(even, odd)
    state = SoftmaxPartial(m.squeeze(-1), d.squeeze(-1))
    return softmax_from_state(x, state)


# --------------------------------------------------------------------------------------------
# Online softmax + top-k in one pass
# --------------------------------------------------------------------------------------------


def _topk_key(value: float, index: int) -> Tuple[int, float, int]:
    """Sort key where larger means better: NaN beats every number, then larger value, then lower
    index. Encoding NaN as class 1 keeps all comparisons well defined (NaN never compares)."""
    if value != value:
        return (1, 0.0, -index)
    return (0, value, -index)


def _rescale_scalar(a: float, m: float) -> float:
    """Python-float twin of ``_rescale``: exp(a - m), or exactly 0 when a is -inf."""
    if a == -math.inf:
        return 0.0
    return math.exp(a - m)  # a <= m or NaN, so this never overflows


def _topk_row(row: List[float], k: int) -> Tuple[float, float, List[int]]:
    """One pass over a row: running (m, d) plus a min-heap holding the k best (key, index)."""
    m, d = -math.inf, 0.0
    heap: List[Tuple[Tuple[int, float, int], int]] = []
    for i, v in enumerate(row):
        # online normalizer update (NaN-propagating max; Python's max() is order dependent)
        m_new = math.nan if (m != m or v != v) else max(m, v)
        d = d * _rescale_scalar(m, m_new) + _rescale_scalar(v, m_new)
        m = m_new
        # top-k update: heap[0] is the worst kept element; a new element enters only if strictly
        # better, so an equal value arriving later (higher index) never displaces an earlier one.
        key = _topk_key(v, i)
        if len(heap) < k:
            heapq.heappush(heap, (key, i))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, i))
    best = sorted(heap, reverse=True)  # value descending (NaN first), index ascending
    return m, d, [i for _, i in best]


def online_softmax_topk(
    x: torch.Tensor, k: int, log: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(x) (or log_softmax) along the last dim in a single pass over each row.

    For a 1-d or 2-d x. Each row is read once, in index order, keeping
      * the online normalizer: m = max(m, x_i); d = d * exp(m_old - m) + exp(x_i - m), and
      * a min-heap of the k best (x_i, i) seen so far (softmax is monotone in x, so the k largest
        logits are the k largest probabilities).
    At the end the selected logits are turned into probabilities exp(x_i - m) / d, or with
    ``log=True`` into log-probabilities x_i - m - log(d).

    Order: values descending; ties go to the lower index; NaN counts as larger than every number
    (as in torch.topk), lower index first among NaNs. A row with a NaN or +inf logit has NaN
    values (like torch.softmax); an all -inf row has NaN values.

    The loop runs on Python floats, i.e. the state is accumulated in float64 whatever the input
    dtype; the final values are computed in float64 and returned in x's dtype. Indices are int64.
    Meant for small inputs (it is a pure Python loop per element).
    """
    _check_input(x)
    if x.dim() > 2:
        raise ValueError(f"x must be 1-d or 2-d, got {x.dim()}-d")
    n = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= {n} (size of the last dim), got {k}")

    rows = x.detach().to(device="cpu", dtype=torch.float64).reshape(-1, n)
    values, indices = [], []
    for row in rows.tolist():
        m, d, idx = _topk_row(row, k)
        sel = torch.tensor([row[i] for i in idx], dtype=torch.float64)
        m_t = torch.tensor(m, dtype=torch.float64)
        d_t = torch.tensor(d, dtype=torch.float64)
        if log:
            vals = sel - m_t - torch.log(d_t)
        else:
            vals = torch.exp(sel - m_t) / d_t
        values.append(vals)
        indices.append(torch.tensor(idx, dtype=torch.int64))

    if not values:  # a 2-d input with zero rows
        return x.new_empty((0, k)), torch.empty((0, k), dtype=torch.int64, device=x.device)
    out_values = torch.stack(values).to(dtype=x.dtype, device=x.device)
    out_indices = torch.stack(indices).to(device=x.device)
    if x.dim() == 1:
        out_values, out_indices = out_values[0], out_indices[0]
    return out_values, out_indices
