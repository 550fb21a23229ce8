"""The log-probability fields of ``sample(..., logprobs=N)``: each drawn token's log-probability and
rank, and each row's N most likely tokens, without writing anything of the vocabulary's size.

Rows with a top-k already hold what the fields need after the draw: the fused selection's raw
candidates with the row's (max, sumexp) (the raw distribution), and the edited candidates with
the log-probabilities drawn from (the processed one). Rows drawn from the whole vocabulary read
their row once more through ``token_logprobs``: the raw top N + E (E: the row's edits) and the
count of tokens ranked ahead of the drawn one, which the edits then correct.

Ranks and the top-N order compare logits (edited ones under "processed") before the temperature
divides them: larger first, NaN above every number, equal values by the lower token id (a stable
descending sort's order; torch.topk leaves the order of equal values unspecified).
"""

from typing import NamedTuple, Optional

import torch

from .serving_edits import RowEdits, dense_rows, merge_edits
from .warpers import warped_probs

_ops = torch.ops.online_softmax


class Got(NamedTuple):
    """Some rows' fields; ``known`` (rows,) says which rows they settle."""

    token_log_probs: torch.Tensor  # (rows, S)
    rank: torch.Tensor             # (rows, S) int64
    top_ids: torch.Tensor          # (rows, N) int64
    top_log_probs: torch.Tensor    # (rows, N)
    known: torch.Tensor            # (rows,) bool


class Fields:
    """The batch's fields while its groups fill them in."""

    def __init__(self, rows: int, samples: int, n: int, acc, dev):
        self.got = Got(torch.full((rows, samples), float("nan"), dtype=acc, device=dev),
                       torch.zeros((rows, samples), dtype=torch.int64, device=dev),
                       torch.full((rows, n), -1, dtype=torch.int64, device=dev),
                       torch.full((rows, n), float("nan"), dtype=acc, device=dev),
                       torch.zeros(rows, dtype=torch.bool, device=dev))

    def put(self, where: torch.Tensor, got: Got) -> None:
        for mine, theirs in zip(self.got, got):
            mine[where] = theirs.to(mine.dtype)

    def shaped(self, batch_shape, tokens: torch.Tensor) -> dict:
        """The fields in the batch's shape; a drawn -1 (no distribution) has rank -1 and NaN."""
        none = tokens < 0
        tlp = self.got.token_log_probs.masked_fill(none, float("nan"))
        rank = self.got.rank.masked_fill(none, -1)
        n = self.got.top_ids.shape[1]
        return dict(token_log_probs=tlp.reshape(*batch_shape, -1), rank=rank.reshape(*batch_shape, -1),
                    top_token_ids=self.got.top_ids.reshape(*batch_shape, n),
                    top_log_probs=self.got.top_log_probs.reshape(*batch_shape, n))


def ahead(values: torch.Tensor, ids: torch.Tensor, value: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Whether (values, ids) rank ahead of (value, token) (broadcast): larger first, NaN above every
    number, equal values by the lower id."""
    nan, their_nan = values != values, value != value
    return (nan & ~their_nan) | (values > value) | ((values == value) & (ids < token))


def _positions(ids: torch.Tensor, tokens: torch.Tensor):
    """Where each token (rows, S) sits in ids (rows, K): (found (rows, S), position (rows, S))."""
    eq = ids[:, None, :] == tokens[:, :, None]
    return eq.any(-1), eq.int().argmax(-1)


def raw_from_candidates(candidates, tokens: torch.Tensor, n: int, acc) -> Got:
    """Top-k rows under the raw distribution, from the fused selection's raw candidates (ids, raw
    values, max, sumexp); a drawn token outside them (an edit raised it) leaves its row unknown."""
    idx, raw, m, d = candidates
    every = (raw - m[:, None].to(acc)) - d.to(acc).log()[:, None]
    found, pos = _positions(idx, tokens)
    known = found.all(1) & (idx.shape[1] >= n)
    return Got(every.gather(1, pos), pos + 1, idx[:, :n], every[:, :n], known)


def raw_rest(x: torch.Tensor, tokens: torch.Tensor, fields: Fields, n: int) -> None:
    """Every row the groups did not settle, from one more read of it per sample."""
    rest = (~fields.got.known).nonzero()[:, 0]
    if rest.numel() == 0:
        return
    whole = rest.numel() == x.shape[0]
    xr = x if whole else x.index_select(0, rest)
    tok = (tokens if whole else tokens.index_select(0, rest)).clamp_min(0)
    tlp, rank = [], []
    for s in range(tok.shape[1]):
        out = _ops.token_logprobs(xr, tok[:, s].contiguous(), n if s == 0 else 0, 1.0, None)
        tlp.append(out[0])
        rank.append(out[1])
        if s == 0:
            top_ids, top_lp = out[2], out[3]
    fields.put(rest, Got(torch.stack(tlp, 1), torch.stack(rank, 1), top_ids, top_lp,
                         torch.ones(rest.numel(), dtype=torch.bool, device=x.device)))


def processed(x, t, k, top_p, min_p, drawn, edits: Optional[RowEdits], n: int, acc) -> Got:
    """Some rows' fields under the distribution drawn from."""
    if drawn.processed is not None:
        return _processed_top_k(x, t, k, top_p, min_p, drawn, edits, n, acc)
    return _processed_whole(x, t, drawn, edits, n, acc)


def _processed_top_k(x, t, k, top_p, min_p, drawn, edits, n, acc) -> Got:
    ids, every = drawn.processed
    tokens = drawn.tokens
    _found, pos = _positions(ids, tokens)
    got = Got(drawn.log_probs, pos + 1, ids[:, :n], every[:, :n], torch.ones_like(tokens[:, 0], dtype=torch.bool))
    redone = torch.isnan(every[:, 0]).nonzero()[:, 0]  # rows the exact warpers redrew: the whole rows
    if redone.numel():
        e = None if edits is None else edits.rows(redone)
        probs = warped_probs(dense_rows(x[redone], e), t[redone], k[redone],
                             None if top_p is None else top_p[redone], None if min_p is None else min_p[redone])
        whole = dense_fields(dense_rows(x[redone], e), probs.log(), tokens[redone], n)
        got = Got(*(g.index_put((redone,), w.to(g.dtype)) for g, w in zip(got[:4], whole)), got.known)
    return got


def dense_fields(v: torch.Tensor, log_probs: torch.Tensor, tokens: torch.Tensor, n: int):
    """The fields from whole rows: edited logits v (rows, vocab), the log-probabilities of the
    distribution drawn from, and the drawn tokens (rows, S) (-1 allowed)."""
    vocab = v.shape[1]
    order = torch.sort(v, dim=1, descending=True, stable=True).indices  # equal values keep id order
    safe = tokens.clamp_min(0)
    mine = v.gather(1, safe)
    ids = torch.arange(vocab, device=v.device)
    rank = ahead(v[:, None, :], ids, mine[:, :, None], safe[:, :, None]).sum(-1) + 1
    return log_probs.gather(1, safe), rank, order[:, :n], log_probs.gather(1, order[:, :n])


def _processed_whole(x, t, drawn, edits, n, acc) -> Got:
    """Rows drawn from the whole vocabulary: token_logprobs reads the row once more for the raw
    top N + E and the count of raw logits ahead of the drawn token's edited one; the edits then
    move their tokens (out of the count and the list, back in with their new values)."""
    rows, vocab = x.shape
    tokens = drawn.tokens.clamp_min(0)
    width = 0 if edits is None else edits.ids.shape[1]
    mine = x.gather(1, tokens).to(acc) if edits is None else edits.value_at(x, tokens)
    top_n = min(vocab, max(n, 1) + width)
    ranks = []
    for s in range(tokens.shape[1]):
        out = _ops.token_logprobs(x, tokens[:, s].contiguous(), top_n if s == 0 else 0, 1.0, mine[:, s].contiguous())
        rank = out[1]
        if edits is not None and width:
            real = edits.ids >= 0
            before = x.gather(1, edits.ids.clamp_min(0)).to(acc)
            tok, val = tokens[:, s:s + 1], mine[:, s:s + 1]
            rank = rank - (real & ahead(before, edits.ids, val, tok)).sum(1) \
                + (real & ahead(edits.values, edits.ids, val, tok)).sum(1)
        ranks.append(rank)
        if s == 0:
            cand = out[2]
    values, ids, real = merge_edits(x.gather(1, cand).to(acc), cand, edits)
    s_inv = (1.0 / t).to(acc)[:, None]
    # Differences of logits, not of logits already divided: no rounding of large logits' quotients.
    top = (values - mine[:, :1]) * s_inv + drawn.log_probs[:, :1].to(acc)
    kept = real & (values > float("-inf"))
    if drawn.cut is not None:
        threshold = (values[:, :1].double() + drawn.cut[:, None] / s_inv.double()).to(acc)  # as the kernels round it
        kept &= values >= threshold
    top = top.masked_fill(~kept, float("-inf"))[:, :n]
    return Got(drawn.log_probs, torch.stack(ranks, 1), ids[:, :n], top, torch.ones(rows, dtype=torch.bool, device=x.device))
