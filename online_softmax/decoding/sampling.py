"""Fused token sampling: the distribution of transformers' sampling warpers, in their order
(temperature, top-k, top-p, min-p), drawn without materializing the softmax.

- With ``top_k``: the fused softmax + top-k reads the logits once; top-p, min-p and the draw then
  work on the k candidates.
- Without ``top_k`` and without ``top_p``: ``sample_categorical`` reads the logits once (twice with
  ``min_p``) and writes nothing of the vocabulary's size: per-block masses, then each draw re-reads
  the one block that holds it.
- ``top_p`` without ``top_k``: ``top_p_threshold`` finds the cut per row (one read from memory,
  then narrowing passes over the row while it is in cache), and ``sample_categorical`` draws above
  it (a max pass from memory, then the block masses from cache when the row fits). Nothing of the
  vocabulary's size is written.

Every draw uses one float64 uniform from ``torch.rand(..., generator=generator)``, so a seeded
generator reproduces the tokens. A row with no distribution (a NaN or +inf logit, or every token
-inf) draws token -1 with log-probability NaN instead of raising, so one bad row does not stop a
batch.
"""

from typing import NamedTuple, Optional, Union

import torch

from .. import _checks as checks
from .warpers import exact_draw, inverse_cdf

_ops = torch.ops.online_softmax

Param = Union[None, int, float, torch.Tensor]
TIE_SLACK = 8              # selected past k, so that logits tied with the k-th stay in (as transformers keeps them)


class Sample(NamedTuple):
    """What :func:`sample` returns: the drawn token ids and their log-probabilities under the
    distribution they were drawn from, both of shape (*batch, num_samples)."""

    token_ids: torch.Tensor  # (*batch, num_samples) int64; -1 for a row with no distribution
    log_probs: torch.Tensor  # (*batch, num_samples) under the distribution drawn from (float32; float64 for float64)


def _rows(v, idx):
    """The rows idx of v (all of v when idx is None; None stays None)."""
    return v if v is None or idx is None else v.index_select(0, idx)


def _per_row(value: Param, name: str, rows: int, batch_shape, device, dtype) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(rows)
        elif tuple(value.shape) == tuple(batch_shape):
            value = value.reshape(rows)
        else:
            raise checks.fail("sample", f"{name} must be a number or a tensor of the batch shape "
                                        f"{list(batch_shape)}, got shape {list(value.shape)}")
        if value.dtype.is_complex or (dtype.is_floating_point is False and value.dtype.is_floating_point):
            kind = "a real" if dtype.is_floating_point else "an integer"
            raise checks.fail("sample", f"{name} must be {kind} tensor, got {value.dtype}", TypeError)
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise checks.fail("sample", f"{name} must be a number or a tensor, got {type(value).__name__}", TypeError)
    if not dtype.is_floating_point and not isinstance(value, int):
        raise TypeError(f"online_softmax.sample: {name} must be an int, got {value!r}")
    return torch.full((rows,), value, dtype=dtype, device=device)


def _check_range(t: Optional[torch.Tensor], name: str, lo, hi, lo_open=False, hi_open=False) -> None:
    if t is None or t.numel() == 0 or torch.compiler.is_compiling() or t.device.type == "meta":
        return
    a, b = torch.stack([t.min(), t.max()]).tolist()  # one host sync
    if not ((a > lo if lo_open else a >= lo) and (b < hi if hi_open else b <= hi)) or a != a or b != b:
        raise ValueError(f"online_softmax.sample: {name} must lie in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got values in [{a}, {b}]")


def _draw(weights: torch.Tensor, u: torch.Tensor):
    """Positions drawn from rows of nonnegative weights (rows, K), one per uniform (rows, S), and
    the log of the drawn weight over the row's total."""
    pos, total = inverse_cdf(weights, u)
    return pos, (weights.gather(1, pos).double().log() - total.log()).to(weights.dtype)


def _keep_top_p(p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' top-p on probabilities sorted descending: a token is removed when it and every
    smaller one hold at most 1 - top_p; the largest always stays."""
    tail = p.flip(-1).cumsum(-1).flip(-1)  # its own probability and all smaller ones, as transformers sums them
    keep = tail > (1 - top_p)[:, None]
    keep[:, 0] = True
    return keep


def _keep_min_p(p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    keep = p >= min_p[:, None] * p[:, :1]
    keep[:, 0] = True
    return keep


def _finish(z: torch.Tensor, keep: torch.Tensor, top_p, min_p, u):
    """Top-p and min-p over candidate scores z (rows, K) sorted descending with a kept prefix, then
    the draw. Returns (positions, log_probs)."""
    z = z.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        z = z.masked_fill(~_keep_top_p(torch.softmax(z, -1), top_p), float("-inf"))
    if min_p is not None:
        z = z.masked_fill(~_keep_min_p(torch.softmax(z, -1), min_p), float("-inf"))
    return _draw(torch.softmax(z, -1), u)


def _sample_top_k(x, t, k, top_p, min_p, u):
    """Rows that have a top-k: one fused read selects the k (plus ties) largest logits."""
    rows, vocab = x.shape
    kmax = int(k.max()) if not torch.compiler.is_compiling() else vocab
    sel = min(vocab, kmax + TIE_SLACK)
    _v, idx, m, _d = _ops.softmax_topk(x, sel, -1, False, 1.0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.gather(1, idx).to(acc) / t[:, None].to(acc)  # as TemperatureLogitsWarper rounds it
    k = torch.where((k > 0) & (k < vocab), k, vocab)   # (under torch.compile every row comes here)
    kth = z.gather(1, (k - 1).clamp_max(sel - 1)[:, None])
    keep = z >= kth  # every logit tied with the k-th stays, as transformers' top-k keeps it
    pos, logp = _finish(z, keep, top_p, min_p, u)
    tokens = idx.gather(1, pos)
    bad = ~torch.isfinite(m)
    overflow = None
    if sel < vocab and not torch.compiler.is_compiling():
        # More ties with a finite k-th logit than the slack holds: those rows are redone whole.
        overflow = keep[:, -1] & ~bad & torch.isfinite(kth[:, 0])
    return tokens, logp, bad, overflow


def _sample_nucleus(x, t, top_p, min_p, u):
    """top-p without top-k: top_p_threshold finds the cut as a log-ratio to the row's max (one read
    from memory, narrowing passes in cache); min-p only raises it (both keep the largest tokens);
    sample_categorical draws above it. Rows tied at the cut are redone on the whole row."""
    ratio, status = _ops.top_p_threshold(x, t, top_p)
    if min_p is not None:
        ratio = torch.maximum(ratio, min_p.log())
    # A tie at the max can leave the cut a rounding above 0 (it still rounds to the max).
    tok, lp = _ops.sample_categorical(x, t, ratio.nan_to_num(nan=0.0).clamp_max(0.0), u)
    if not torch.compiler.is_compiling():
        tied = (status == 1).nonzero()[:, 0]
        if tied.numel():
            tok[tied], lp[tied] = exact_draw(x[tied], t[tied], None, top_p[tied], _rows(min_p, tied), u[tied])
    return tok, lp


def sample(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = None, top_p: Param = None,
           min_p: Param = None, num_samples: int = 1, generator: Optional[torch.Generator] = None) -> Sample:
    """Draw ``num_samples`` tokens (with replacement) per row of ``logits`` (..., vocab) from the
    distribution transformers' sampling produces: softmax(logits / temperature), cut to the
    ``top_k`` largest (with ties at the k-th kept), then to the smallest set holding ``top_p``, then
    to the tokens with p >= ``min_p`` * p_max, renormalized. Each parameter is a number or a tensor
    of the batch shape (one value per row); ``top_k=0``, ``top_p=1`` and ``min_p=0`` switch a cut
    off. Returns the int64 token ids and their log-probabilities under that distribution."""
    x, batch_shape = _check_logits(logits, num_samples, generator)
    rows, dev = x.shape[0], x.device
    t, k, p, mp = _row_params(temperature, top_k, top_p, min_p, rows, batch_shape, dev)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if dev.type == "meta":  # shapes and dtypes only: nothing to draw from
        return Sample(torch.empty(*batch_shape, num_samples, dtype=torch.int64, device=dev),
                      torch.empty(*batch_shape, num_samples, dtype=acc, device=dev))
    u = torch.rand(rows, num_samples, dtype=torch.float64, device=dev, generator=generator)
    if rows == 0:
        return Sample(torch.empty(*batch_shape, num_samples, dtype=torch.int64, device=dev),
                      torch.empty(*batch_shape, num_samples, dtype=acc, device=dev))
    p, mp, groups = _plan_groups(x.shape[1], k, p, mp)
    tokens = logp = None
    for rows_idx, topk_rows in groups:
        tok, lp = _sample_rows(_rows(x, rows_idx), _rows(t, rows_idx), _rows(k, rows_idx), _rows(p, rows_idx),
                               _rows(mp, rows_idx), _rows(u, rows_idx), topk_rows)
        lp = lp.to(acc)
        if rows_idx is None:
            tokens, logp = tok, lp
            continue
        if tokens is None:
            tokens = torch.empty(rows, num_samples, dtype=torch.int64, device=dev)
            logp = torch.empty(rows, num_samples, dtype=acc, device=dev)
        tokens[rows_idx], logp[rows_idx] = tok, lp
    return Sample(tokens.reshape(*batch_shape, num_samples), logp.reshape(*batch_shape, num_samples))


def _check_logits(logits, num_samples, generator):
    """The logits as (rows, vocab), and the batch shape."""
    op = "sample"
    checks.tensor(logits, "logits", op)
    if not logits.dtype.is_floating_point:
        raise checks.fail(op, f"logits must be a floating-point tensor, got {logits.dtype}", TypeError)
    if logits.dim() == 0:
        raise checks.fail(op, "logits must have a vocabulary dimension, got a 0-d tensor")
    checks.positive_int(num_samples, "num_samples", op)
    checks.generator(generator, op)
    if logits.shape[-1] == 0:
        raise checks.fail(op, "logits has an empty vocabulary dimension")
    return logits.reshape(-1, logits.shape[-1]), logits.shape[:-1]


def _row_params(temperature, top_k, top_p, min_p, rows, batch_shape, dev):
    """Each parameter as one value per row (None where not given), range-checked."""
    t = _per_row(temperature, "temperature", rows, batch_shape, dev, torch.float64)
    k = _per_row(top_k, "top_k", rows, batch_shape, dev, torch.int64)
    p = _per_row(top_p, "top_p", rows, batch_shape, dev, torch.float64)
    mp = _per_row(min_p, "min_p", rows, batch_shape, dev, torch.float64)
    _check_range(t, "temperature", 0.0, float("inf"), lo_open=True, hi_open=True)
    _check_range(k, "top_k", 0, float("inf"))
    _check_range(p, "top_p", 0.0, 1.0)
    _check_range(mp, "min_p", 0.0, 1.0)
    return t, k, p, mp


def _plan_groups(vocab, k, p, mp):
    """Drops the cuts no row uses and groups the rows by path: [(row indices or None for all,
    whether they have a top-k)]. Under torch.compile there are no data-dependent branches: every
    given cut is applied (a switched-off one keeps all) and all rows take one path."""
    if torch.compiler.is_compiling():
        return p, mp, [(None, k is not None)]
    p = p if p is not None and bool((p < 1).any()) else None
    mp = mp if mp is not None and bool((mp > 0).any()) else None
    has_k = (k > 0) & (k < vocab) if k is not None else None
    if has_k is None or not bool(has_k.any()):
        return p, mp, [(None, False)]
    if bool(has_k.all()):
        return p, mp, [(None, True)]
    # A batch that mixes rows with and without top_k: each group on its own rows.
    return p, mp, [(has_k.nonzero()[:, 0], True), ((~has_k).nonzero()[:, 0], False)]


def _sample_rows(x, t, k, p, mp, u, topk_rows: bool):
    """One group's draws, by its path: fused top-k, nucleus cut, or the whole row."""
    if topk_rows:
        tok, lp, bad, overflow = _sample_top_k(x, t, k, p, mp, u)
        if overflow is not None and bool(overflow.any()):
            o = overflow.nonzero()[:, 0]
            tok[o], lp[o] = exact_draw(x[o], t[o], k[o], _rows(p, o), _rows(mp, o), u[o])
        return tok.masked_fill(bad[:, None], -1), lp.masked_fill(bad[:, None], float("nan"))
    if p is not None:
        return _sample_nucleus(x, t, p, mp, u)
    return _ops.sample_categorical(x, t, None if mp is None else mp.log(), u)
