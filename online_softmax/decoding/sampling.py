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
from . import logprob_fields, serving_edits
from .serving_edits import RowEdits, dense_rows, merge_edits
from .warpers import exact_draw, inverse_cdf

_ops = torch.ops.online_softmax

Param = Union[None, int, float, torch.Tensor]
TIE_SLACK = 8              # selected past k, so that logits tied with the k-th stay in (as transformers keeps them)
EDIT_SLACK = 64            # selected past k for the row's edited tokens; rows with more among them select again


class Sample(NamedTuple):
    """What :func:`sample` returns: the drawn token ids and their log-probabilities under the
    distribution they were drawn from, both of shape (*batch, num_samples); with ``logprobs=N``
    also each drawn token's log-probability and rank and each row's top N (None otherwise)."""

    token_ids: torch.Tensor  # (*batch, num_samples) int64; -1 for a row with no distribution
    log_probs: torch.Tensor  # (*batch, num_samples) under the distribution drawn from (float32; float64 for float64)
    token_log_probs: Optional[torch.Tensor] = None  # (*batch, num_samples) under logprobs_mode's distribution
    rank: Optional[torch.Tensor] = None             # (*batch, num_samples) int64, 1 = the most likely; -1 for token -1
    top_token_ids: Optional[torch.Tensor] = None    # (*batch, N) int64, most likely first
    top_log_probs: Optional[torch.Tensor] = None    # (*batch, N)


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
    the draw. Returns (positions, their log_probs, every candidate's log-probability (rows, K))
    under the distribution drawn from."""
    z = z.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        z = z.masked_fill(~_keep_top_p(torch.softmax(z, -1), top_p), float("-inf"))
    if min_p is not None:
        z = z.masked_fill(~_keep_min_p(torch.softmax(z, -1), min_p), float("-inf"))
    pos, _total = inverse_cdf(torch.softmax(z, -1), u)
    every = torch.log_softmax(z, -1)  # finite for a kept token whose probability underflows
    return pos, every.gather(1, pos), every


class _Drawn(NamedTuple):
    """One group's draws and what the log-probability fields need of them."""

    tokens: torch.Tensor                   # (rows, S) token ids of the group's rows (-1: no distribution)
    log_probs: torch.Tensor                # (rows, S) under the distribution drawn from
    candidates: Optional[tuple] = None     # top-k rows: (ids, raw values, max, sumexp) of the raw top sel
    processed: Optional[tuple] = None      # top-k rows: (ids, log-probs) of the edited candidates, sorted
    cut: Optional[torch.Tensor] = None     # whole rows: the log-ratio cut drawn above (None: no cut)


def _sample_top_k(x, t, k, top_p, min_p, u, edits: Optional[RowEdits], least: int) -> _Drawn:
    """Rows that have a top-k: one fused read selects the k (plus ties, plus the row's edited
    tokens) largest logits; the edits replace theirs among them (an edited token moves anywhere,
    so the edited row's top k are among the raw top k + E and the edited tokens)."""
    rows, vocab = x.shape
    kmax = int(k.max()) if not torch.compiler.is_compiling() else vocab
    width = edits.ids.shape[1] if edits is not None else 0
    sel = min(vocab, max(kmax + TIE_SLACK + min(width, EDIT_SLACK), least))
    _v, idx, m, d = _ops.softmax_topk(x, sel, -1, False, 1.0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    raw = x.gather(1, idx).to(acc)
    v, ids, real = merge_edits(raw, idx, edits)
    z = v / t[:, None].to(acc)  # as TemperatureLogitsWarper rounds it
    # Every token outside the raw candidates has z at most the last one's: the order is settled above it.
    bound = torch.full_like(z[:, :1], float("-inf")) if sel == vocab else (raw[:, -1:] / t[:, None].to(acc))
    k = torch.where((k > 0) & (k < vocab), k, vocab)   # (under torch.compile every row comes here)
    kth = z.gather(1, (k - 1).clamp_max(z.shape[1] - 1)[:, None])
    keep = (z >= kth) & real  # every logit tied with the k-th stays, as transformers' top-k keeps it
    pos, logp, every = _finish(z, keep, top_p, min_p, u)
    tokens = ids.gather(1, pos)
    bad = ~torch.isfinite(m) | ~(z.masked_fill(~keep, float("-inf")).amax(1) > float("-inf"))
    overflow = None
    if sel < vocab and not torch.compiler.is_compiling():
        # More ties with a finite k-th logit than the slack holds: those rows are redone whole.
        overflow = ~(kth[:, 0] > bound[:, 0]) & ~bad & torch.isfinite(kth[:, 0])
    if overflow is not None and bool(overflow.any()):
        o = overflow.nonzero()[:, 0]
        wider = kmax + TIE_SLACK + width
        if sel < min(vocab, wider):  # more edited tokens among the candidates than EDIT_SLACK: select more
            redo = _sample_top_k(x[o], t[o], k[o], _rows(top_p, o), _rows(min_p, o), u[o], _rows_of(edits, o), wider)
            tokens[o], logp[o] = redo.tokens, redo.log_probs
        else:
            xo = dense_rows(x[o], _rows_of(edits, o))
            tokens[o], logp[o] = exact_draw(xo, t[o], k[o], _rows(top_p, o), _rows(min_p, o), u[o])
        every[o] = float("nan")  # not these candidates' any more: the fields come from the whole rows
    tokens = tokens.masked_fill(bad[:, None], -1)
    logp = logp.masked_fill(bad[:, None], float("nan"))
    return _Drawn(tokens, logp, (idx, raw, m, d), (ids, every), None)


def _sample_nucleus(x, t, top_p, min_p, u, edits):
    """top-p without top-k: top_p_threshold finds the cut as a log-ratio to the row's max (one read
    from memory, narrowing passes in cache); min-p only raises it (both keep the largest tokens);
    sample_categorical draws above it. Rows tied at the cut are redone on the whole row."""
    ratio, status = _ops.top_p_threshold(x, t, top_p, *_edit_args(edits))
    if min_p is not None:
        ratio = torch.maximum(ratio, min_p.log())
    # A tie at the max can leave the cut a rounding above 0 (it still rounds to the max).
    ratio = ratio.nan_to_num(nan=0.0).clamp_max(0.0)
    tok, lp = _ops.sample_categorical(x, t, ratio, u, *_edit_args(edits))
    if not torch.compiler.is_compiling():
        tied = (status == 1).nonzero()[:, 0]
        if tied.numel():
            xt = dense_rows(x[tied], _rows_of(edits, tied))
            tok[tied], lp[tied] = exact_draw(xt, t[tied], None, top_p[tied], _rows(min_p, tied), u[tied])
    return _Drawn(tok, lp, cut=ratio)


def _edit_args(edits: Optional[RowEdits]) -> tuple:
    return () if edits is None else (edits.ids, edits.values)


def _rows_of(edits: Optional[RowEdits], idx) -> Optional[RowEdits]:
    return None if edits is None else edits.rows(idx)


def sample(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = None, top_p: Param = None,
           min_p: Param = None, num_samples: int = 1, generator=None, logprobs: Optional[int] = None,
           logprobs_mode: str = "raw", allowed_token_ids=None, bad_words=None, min_tokens=None,
           stop_token_ids=None, logit_bias=None, presence_penalty=None, frequency_penalty=None,
           repetition_penalty=None, output_token_ids=None, prompt_token_ids=None) -> Sample:
    """Draw ``num_samples`` tokens (with replacement) per row of ``logits`` (..., vocab).

    The distribution, in this order (a serving engine's sampler; vLLM's order for the edits,
    transformers' for the cuts):

    1. the edits of each row (each given per row: a list with one entry per row, None where a row
       has none; the penalties also as a number or a tensor of rows), as vLLM applies them to the
       float32 logits ``x``: ``allowed_token_ids`` (every other token -inf), ``bad_words`` (lists of
       token sequences ``w``: ``w[-1]`` gets -inf when ``len(w) == 1`` or the row's output ends with
       ``w[:-1]``), ``min_tokens`` with ``stop_token_ids`` (those get -inf while the output holds fewer
       than ``min_tokens`` tokens), ``logit_bias`` (dicts of token id to bias: ``x[t] += b``),
       ``repetition_penalty`` ``r`` on every token of ``prompt_token_ids`` or ``output_token_ids``
       (``x * (1 / r)`` where ``x > 0``, else ``x * r``), then ``frequency_penalty`` ``f`` and
       ``presence_penalty`` ``p`` over each token's count ``c`` in the output (``x - f * c``, then
       ``x - p * (c > 0)``). Token lists are lists of ints or 1-D tensors per row, or (rows, L)
       integer tensors padded with -1. Edited logits are read in place of the logits, a short
       sorted list per row: nothing of the vocabulary's size is written;
    2. softmax(x / ``temperature``), cut to the ``top_k`` largest (ties with the k-th kept), then to
       the smallest set holding ``top_p``, then to the tokens with p >= ``min_p`` * p_max,
       renormalized (transformers' warpers). Each is a number or a tensor of the batch shape;
       ``top_k=0``, ``top_p=1`` and ``min_p=0`` switch a cut off.

    ``generator``: one ``torch.Generator``, or a list with one (or None) per row: a seeded row draws
    the same tokens whatever its position in the batch and whatever the other rows are.

    ``logprobs=N`` (vLLM's ``logprobs``) also returns each drawn token's log-probability and rank
    (1 = the most likely; equal logits by the lower token id, a stable sort's order; ranks
    compare the (edited) logits before the temperature divides them) and each row's N most likely
    tokens, under ``logprobs_mode``: ``"raw"``, log_softmax of the logits as given (vLLM's default),
    or ``"processed"``, the distribution drawn from (edits, temperature and cuts; -inf for cut
    tokens). Rows with a top-k get them from the same read as the draw; rows drawn from the whole
    vocabulary read their row once more per sample (the drawn token is not known before the draw),
    and still write nothing of the vocabulary's size."""
    x, batch_shape = _check_logits(logits, num_samples, generator)
    rows, dev, vocab = x.shape[0], x.device, x.shape[1]
    t, k, p, mp = _row_params(temperature, top_k, top_p, min_p, rows, batch_shape, dev)
    n_top, processed = _check_logprobs(logprobs, logprobs_mode, vocab)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if dev.type == "meta" or rows == 0:  # nothing to draw from: shapes and dtypes only
        return _empty(batch_shape, num_samples, n_top, acc, dev)
    u = _uniforms(rows, num_samples, dev, generator)
    edits, restriction = None, None
    if any(v is not None for v in (allowed_token_ids, bad_words, min_tokens, stop_token_ids, logit_bias,
                                   presence_penalty, frequency_penalty, repetition_penalty)):
        edits, restriction = serving_edits.build(
            x, allowed_token_ids=allowed_token_ids, bad_words=bad_words, min_tokens=min_tokens,
            stop_token_ids=stop_token_ids, logit_bias=logit_bias, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
            output_token_ids=output_token_ids, prompt_token_ids=prompt_token_ids)
    tokens = torch.empty(rows, num_samples, dtype=torch.int64, device=dev)
    logp = torch.empty(rows, num_samples, dtype=acc, device=dev)
    fields = None if n_top is None else logprob_fields.Fields(rows, num_samples, n_top, acc, dev)
    for part in _draw_parts(x, t, k, p, mp, u, edits, restriction, n_top or 0):
        tokens[part.where] = part.to_tokens(part.drawn.tokens)
        logp[part.where] = part.drawn.log_probs.to(acc)
        if fields is None:
            continue
        if processed:
            got = logprob_fields.processed(part.x, part.t, part.k, part.top_p, part.min_p, part.drawn, part.edits,
                                           n_top, acc)
            fields.put(part.where, got._replace(top_ids=part.to_tokens(got.top_ids)))
        elif part.drawn.candidates is not None and part.restriction is None:
            fields.put(part.where, logprob_fields.raw_from_candidates(part.drawn.candidates, part.drawn.tokens,
                                                                      n_top, acc))
    if fields is not None and not processed:
        logprob_fields.raw_rest(x, tokens, fields, n_top)
    out = Sample(tokens.reshape(*batch_shape, num_samples), logp.reshape(*batch_shape, num_samples))
    return out if fields is None else out._replace(**fields.shaped(batch_shape, tokens))


class _Part(NamedTuple):
    """The rows of one path: where they sit in the batch, their logits (gathered allowed tokens for
    restricted rows), parameters and edits, and their draws."""

    where: torch.Tensor
    x: torch.Tensor
    t: torch.Tensor
    k: Optional[torch.Tensor]
    top_p: Optional[torch.Tensor]
    min_p: Optional[torch.Tensor]
    edits: Optional[RowEdits]
    restriction: Optional[serving_edits.Restriction]
    drawn: _Drawn

    def to_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.restriction is None else self.restriction.to_tokens(ids)


def _draw_parts(x, t, k, p, mp, u, edits, restriction, least: int) -> list:
    """The batch's draws by path: rows with allowed tokens (drawn from those alone, gathered into
    short rows of their own), then the others by fused top-k, nucleus cut or the whole row; a
    batch that mixes them runs each group on its own rows."""
    rows, dev = x.shape[0], x.device
    sets = []  # (batch rows, their logits, edits, restriction)
    free = torch.arange(rows, device=dev)
    if restriction is not None:
        sets.append((restriction.rows, restriction.gather(x), serving_edits.restrict(edits, restriction), restriction))
        keep = torch.ones(rows, dtype=torch.bool, device=dev)
        keep[restriction.rows] = False
        free = keep.nonzero()[:, 0]
        if free.numel():
            sets.append((free, x.index_select(0, free), _rows_of(edits, free), None))
    else:
        sets.append((free, x, edits, None))
    parts = []
    for where, xs, es, res in sets:
        sub = None if res is None and where.numel() == rows else where
        ts, ks, ps, mps, us = (_rows(v, sub) for v in (t, k, p, mp, u))
        ps, mps, groups = _plan_groups(xs.shape[1], ks, ps, mps)
        for idx, topk_rows in groups:
            xg, tg, kg, pg, mpg = (_rows(v, idx) for v in (xs, ts, ks, ps, mps))
            eg = _rows_of(es, idx)
            drawn = _sample_rows(xg, tg, kg, pg, mpg, _rows(us, idx), eg, topk_rows, least)
            parts.append(_Part(where if idx is None else where[idx], xg, tg, kg, pg, mpg, eg, res, drawn))
    return parts


def _empty(batch_shape, num_samples, n_top, acc, dev) -> Sample:
    def e(*tail, dtype):
        return torch.empty(*batch_shape, *tail, dtype=dtype, device=dev)
    out = Sample(e(num_samples, dtype=torch.int64), e(num_samples, dtype=acc))
    if n_top is None:
        return out
    return out._replace(token_log_probs=e(num_samples, dtype=acc), rank=e(num_samples, dtype=torch.int64),
                        top_token_ids=e(n_top, dtype=torch.int64), top_log_probs=e(n_top, dtype=acc))


def _check_logprobs(logprobs, mode, vocab):
    """(N or None, whether the processed distribution is asked)."""
    if mode not in ("raw", "processed"):
        raise checks.fail("sample", f"logprobs_mode must be 'raw' or 'processed', got {mode!r}")
    if logprobs is None:
        return None, False
    checks.nonnegative_int(logprobs, "logprobs", "sample")
    if logprobs > vocab:
        raise checks.fail("sample", f"logprobs must be at most the vocabulary size {vocab}, got {logprobs}")
    return logprobs, mode == "processed"


def _uniforms(rows: int, num_samples: int, dev, generator) -> torch.Tensor:
    """One float64 uniform per draw; a row with its own generator draws its own."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(rows, num_samples, dtype=torch.float64, device=dev, generator=generator)
    u = torch.rand(rows, num_samples, dtype=torch.float64, device=dev) if None in generator else \
        torch.empty(rows, num_samples, dtype=torch.float64, device=dev)
    for r, g in enumerate(generator):
        if g is not None:
            u[r] = torch.rand(num_samples, dtype=torch.float64, device=dev, generator=g)
    return u


def _check_logits(logits, num_samples, generator):
    """The logits as (rows, vocab), and the batch shape."""
    op = "sample"
    checks.tensor(logits, "logits", op)
    if not logits.dtype.is_floating_point:
        raise checks.fail(op, f"logits must be a floating-point tensor, got {logits.dtype}", TypeError)
    if logits.dim() == 0:
        raise checks.fail(op, "logits must have a vocabulary dimension, got a 0-d tensor")
    checks.positive_int(num_samples, "num_samples", op)
    if logits.shape[-1] == 0:
        raise checks.fail(op, "logits has an empty vocabulary dimension")
    x = logits.reshape(-1, logits.shape[-1])
    if isinstance(generator, (list, tuple)):  # one per row (per request)
        if len(generator) != x.shape[0]:
            raise checks.fail(op, f"generator as a list must have one entry per row ({x.shape[0]}), "
                                  f"got {len(generator)}")
        for g in generator:
            checks.generator(g, op)
    else:
        checks.generator(generator, op)
    return x, logits.shape[:-1]


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


def _sample_rows(x, t, k, p, mp, u, edits, topk_rows: bool, least: int) -> _Drawn:
    """One group's draws, by its path: fused top-k, nucleus cut, or the whole row."""
    if topk_rows:
        return _sample_top_k(x, t, k, p, mp, u, edits, least)
    if p is not None:
        return _sample_nucleus(x, t, p, mp, u, edits)
    cut = None if mp is None else mp.log()
    tok, lp = _ops.sample_categorical(x, t, cut, u, *_edit_args(edits))
    return _Drawn(tok, lp, cut=cut)
