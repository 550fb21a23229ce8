"""A serving engine's per-request logit edits, as sparse per-row replacements of a few logits.

vLLM applies these to a float32 copy of the whole batch's logits, in this order:

1. ``allowed_token_ids``: every other token gets -inf;
2. ``bad_words``: for each banned sequence ``w``, ``w[-1]`` gets -inf when ``len(w) == 1`` or the
   row's output ends with ``w[:-1]``;
3. ``min_tokens``: while the row's output holds fewer than ``min_tokens`` tokens, its
   ``stop_token_ids`` get -inf;
4. ``logit_bias``: ``x[t] += bias[t]``;
5. the repetition penalty ``r`` on every token of the prompt or the output:
   ``x = x * (1 / r) if x > 0 else x * r``;
6. the frequency and presence penalties over the output's token counts ``c``:
   ``x = x - frequency * c``, then ``x = x - presence * (c > 0)``.

Every edit touches only the tokens it names, so a row's edits are a short sorted list of token ids
and the values their logits take instead: the kernels read those values in place of the logits
(bans are -inf), and nothing of the vocabulary's size is written. The allowed tokens are a
whitelist, the opposite of sparse: such rows are sampled from their allowed tokens alone, gathered
into a short row of their own (``Restriction``).
"""

import itertools
from typing import NamedTuple, Optional

import torch

from .. import _checks as checks

_OP = "sample"


class RowEdits(NamedTuple):
    """Each row's edited tokens and their new logits. ``ids`` (rows, E) int64: the row's edited
    token ids ascending, then -1; ``values`` (rows, E) in the accumulation dtype (float32, float64
    for float64 logits): the logit each takes (before the temperature), -inf for a ban."""

    ids: torch.Tensor
    values: torch.Tensor

    def rows(self, idx: Optional[torch.Tensor]) -> "RowEdits":
        return self if idx is None else RowEdits(self.ids.index_select(0, idx), self.values.index_select(0, idx))

    def value_at(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The edited logits of tokens (rows, S) (ids >= 0) in the accumulation dtype."""
        raw = x.gather(1, tokens).to(self.values.dtype)
        search = self.ids.masked_fill(self.ids < 0, torch.iinfo(torch.int64).max)
        pos = torch.searchsorted(search, tokens).clamp_max(max(self.ids.shape[1] - 1, 0))
        if self.ids.shape[1] == 0:
            return raw
        hit = search.gather(1, pos) == tokens
        return torch.where(hit, self.values.gather(1, pos), raw)


class Restriction(NamedTuple):
    """Rows sampled from their allowed tokens only: ``rows`` (R,) the batch rows, ``ids`` (R, A)
    each row's allowed token ids ascending, then -1."""

    rows: torch.Tensor
    ids: torch.Tensor

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The allowed tokens' logits (R, A), -inf where the list is padded."""
        got = x.index_select(0, self.rows).gather(1, self.ids.clamp_min(0))
        return got.masked_fill(self.ids < 0, float("-inf"))

    def to_tokens(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions in the gathered rows (R, S) back to token ids (-1 stays -1)."""
        return torch.where(positions >= 0, self.ids.gather(1, positions.clamp_min(0)), positions)


def _coo(lists, name: str, rows: int, vocab: int, device):
    """Per-row token lists (a list of rows, each None, a sequence of ints or a 1-D tensor; or a
    (rows, L) integer tensor padded with -1) as (row, token) int64 pairs on device."""
    if lists is None:
        return None
    if isinstance(lists, torch.Tensor):
        if lists.dim() != 2 or lists.shape[0] != rows or lists.dtype.is_floating_point or lists.dtype.is_complex \
                or lists.dtype == torch.bool:
            raise checks.fail(_OP, f"{name} must be a list of {rows} rows or an integer tensor of shape "
                                   f"({rows}, L) padded with -1, got {lists.dtype} of shape {list(lists.shape)}",
                              TypeError)
        t = lists.to(device=device, dtype=torch.int64)
        keep = t >= 0
        r = torch.arange(rows, device=device)[:, None].expand_as(t)[keep]
        tok = t[keep]
        if t.numel() and bool((t < -1).any() | (t >= vocab).any()):
            raise checks.fail(_OP, f"{name} must hold token ids in [0, {vocab}) or -1 padding")
        return r, tok
    if not isinstance(lists, (list, tuple)) or len(lists) != rows:
        got = f"{len(lists)} entries" if isinstance(lists, (list, tuple)) else type(lists).__name__
        raise checks.fail(_OP, f"{name} must have one entry per row ({rows}), got {got}")
    per_row = [_ids(row, name) for row in lists]
    lengths = [len(ids) for ids in per_row]
    flat = torch.tensor(list(itertools.chain.from_iterable(per_row)), dtype=None if any(lengths) else torch.int64)
    if flat.dtype != torch.int64:
        raise checks.fail(_OP, f"{name} must hold integer token ids, got {flat.dtype} values", TypeError)
    if flat.numel() and bool((flat < 0).any() | (flat >= vocab).any()):
        raise checks.fail(_OP, f"{name} must hold token ids in [0, {vocab}), got {int(flat.min())}..{int(flat.max())}")
    tok = flat.to(device)
    r = torch.repeat_interleave(torch.arange(rows), torch.tensor(lengths, dtype=torch.int64)).to(device)
    return r, tok


def _ids(row, name: str) -> list:
    if row is None:
        return []
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
            raise checks.fail(_OP, f"each row of {name} must be a 1-D integer tensor or a list of ints", TypeError)
        return row.tolist()
    if not isinstance(row, (list, tuple)):
        raise checks.fail(_OP, f"each row of {name} must be None, a list of ints or a 1-D integer tensor", TypeError)
    return row


def _int_list(row, name: str) -> list:
    """A short token list (a bad word, stop tokens, allowed tokens) as a list of Python ints."""
    ids = list(_ids(row, name))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
        raise checks.fail(_OP, f"{name} must hold integer token ids", TypeError)
    return ids


def _output_lists(output_token_ids, rows: int) -> list:
    """The output tokens as Python lists per row (for bad words and min_tokens, which look at
    their lengths and last tokens)."""
    if output_token_ids is None:
        return [[] for _ in range(rows)]
    if isinstance(output_token_ids, torch.Tensor):
        return [[v for v in row if v >= 0] for row in output_token_ids.tolist()]
    return [list(_ids(row, "output_token_ids")) for row in output_token_ids]


def _per_row_list(value, name: str, rows: int) -> list:
    if value is None:
        return [None] * rows
    if not isinstance(value, (list, tuple)) or len(value) != rows:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else type(value).__name__
        raise checks.fail(_OP, f"{name} must be a list with one entry per row ({rows}), got {got}")
    return list(value)


def _bans(rows: int, vocab: int, bad_words, min_tokens, stop_token_ids, outputs: list, device):
    """The (row, token) pairs that bad words and min_tokens ban."""
    banned_r, banned_t = [], []
    for r, words in enumerate(_per_row_list(bad_words, "bad_words", rows)):
        for word in words or ():
            word = _int_list(word, "bad_words")
            if not word:
                raise checks.fail(_OP, "bad_words must not hold an empty sequence")
            prefix = word[:-1]
            if len(prefix) <= len(outputs[r]) and (not prefix or outputs[r][-len(prefix):] == prefix):
                banned_r.append(r)
                banned_t.append(word[-1])
    mins = _per_row_list(min_tokens, "min_tokens", rows) if isinstance(min_tokens, (list, tuple)) \
        else [min_tokens] * rows
    stops = _per_row_list(stop_token_ids, "stop_token_ids", rows)
    for r, (least, stop) in enumerate(zip(mins, stops)):
        if least is None:
            continue
        if isinstance(least, bool) or not isinstance(least, int) or least < 0:
            raise checks.fail(_OP, f"min_tokens must be ints >= 0, got {least!r}")
        if len(outputs[r]) < least:
            ids = _int_list(stop, "stop_token_ids")
            banned_r.extend([r] * len(ids))
            banned_t.extend(ids)
    if banned_t and (min(banned_t) < 0 or max(banned_t) >= vocab):
        raise checks.fail(_OP, f"bad_words and stop_token_ids must hold token ids in [0, {vocab})")
    return (torch.tensor(banned_r, dtype=torch.int64).to(device), torch.tensor(banned_t, dtype=torch.int64).to(device))


def _bias(rows: int, vocab: int, logit_bias, device, dtype):
    r, t, b = [], [], []
    for row, biases in enumerate(_per_row_list(logit_bias, "logit_bias", rows)):
        if not biases:
            continue
        if not isinstance(biases, dict):
            raise checks.fail(_OP, f"each row of logit_bias must be None or a dict of token id to bias, "
                                   f"got {type(biases).__name__}", TypeError)
        for tok, value in biases.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
                raise checks.fail(_OP, f"logit_bias keys must be token ids in [0, {vocab}), got {tok!r}")
            value = checks.real(value, "logit_bias", _OP)
            if value != value or value == float("inf"):
                raise checks.fail(_OP, f"logit_bias values must be numbers below +inf (-inf bans), got {value}")
            r.append(row)
            t.append(tok)
            b.append(value)
    return (torch.tensor(r, dtype=torch.int64).to(device), torch.tensor(t, dtype=torch.int64).to(device),
            torch.tensor(b, dtype=torch.float64).to(device=device, dtype=dtype))


def _penalty(value, name: str, rows: int, device, dtype, neutral: float, low: float, low_open: bool):
    """A per-row penalty (number, list or tensor of rows), or None where every row has the neutral value."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value, dtype=torch.float64)
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != rows):
            raise checks.fail(_OP, f"{name} must be a number or have one value per row ({rows}), "
                                   f"got shape {list(value.shape)}")
        t = value.to(device=device, dtype=dtype).reshape(-1).expand(rows)
    else:
        t = torch.full((rows,), checks.real(value, name, _OP), dtype=dtype, device=device)
    if rows and not torch.compiler.is_compiling():
        lo_val, hi_val = torch.stack([t.min(), t.max()]).tolist()
        if lo_val != lo_val or hi_val != hi_val or abs(hi_val) == float("inf") or lo_val < low \
                or (low_open and lo_val == low):
            raise checks.fail(_OP, f"{name} must be finite and {'>' if low_open else '>='} {low}, "
                                   f"got values in [{lo_val}, {hi_val}]")
    if rows == 0 or bool((t == neutral).all()):
        return None
    return t


def build(x: torch.Tensor, *, allowed_token_ids=None, bad_words=None, min_tokens=None, stop_token_ids=None,
          logit_bias=None, presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
          output_token_ids=None, prompt_token_ids=None):
    """The edits of logits x (rows, vocab) as (RowEdits or None, Restriction or None)."""
    rows, vocab = x.shape
    dev = x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    outputs_needed = bad_words is not None or min_tokens is not None
    outputs = _output_lists(output_token_ids, rows) if outputs_needed else None
    if (stop_token_ids is None) != (min_tokens is None):
        raise checks.fail(_OP, "min_tokens and stop_token_ids go together: give both or neither")
    pieces = []  # (row, token) pairs of each kind, then what each carries
    ban = _bans(rows, vocab, bad_words, min_tokens, stop_token_ids, outputs, dev) if outputs_needed else None
    bias = _bias(rows, vocab, logit_bias, dev, acc) if logit_bias is not None else None
    rep = _penalty(repetition_penalty, "repetition_penalty", rows, dev, acc, 1.0, 0.0, True)
    freq = _penalty(frequency_penalty, "frequency_penalty", rows, dev, acc, 0.0, float("-inf"), False)
    pres = _penalty(presence_penalty, "presence_penalty", rows, dev, acc, 0.0, float("-inf"), False)
    out = prompt = None
    if rep is not None or freq is not None or pres is not None:
        out = _coo(output_token_ids, "output_token_ids", rows, vocab, dev)
    if rep is not None:
        prompt = _coo(prompt_token_ids, "prompt_token_ids", rows, vocab, dev)
    if out is not None:  # only the rows whose penalties are on
        on = _on(rep, 1.0, rows, dev) | _on(freq, 0.0, rows, dev) | _on(pres, 0.0, rows, dev)
        out = (out[0][on[out[0]]], out[1][on[out[0]]])
    if prompt is not None:
        on = _on(rep, 1.0, rows, dev)
        prompt = (prompt[0][on[prompt[0]]], prompt[1][on[prompt[0]]])
    for kind in (ban, bias, out, prompt):
        if kind is not None:
            pieces.append(kind[0] * vocab + kind[1])
    edits = None
    if pieces and sum(p.numel() for p in pieces):
        keys = torch.unique(torch.cat(pieces))  # sorted: by row, then token
        r, tok = keys // vocab, keys % vocab
        v = x[r, tok].to(acc)
        if bias is not None and bias[2].numel():
            add = torch.zeros_like(v).index_put_((torch.searchsorted(keys, bias[0] * vocab + bias[1]),), bias[2])
            v = v + add
        count = torch.zeros_like(keys)
        if out is not None and out[1].numel():
            okeys, ocounts = torch.unique(out[0] * vocab + out[1], return_counts=True)
            count[torch.searchsorted(keys, okeys)] = ocounts
        if rep is not None:
            seen = count > 0
            if prompt is not None and prompt[1].numel():
                seen[torch.searchsorted(keys, prompt[0] * vocab + prompt[1])] = True
            penalty = torch.where(seen, rep[r], torch.ones_like(v))
            v = v * torch.where(v > 0, 1.0 / penalty, penalty)  # vLLM's scaling, as it rounds it
        if freq is not None:
            v = v - freq[r] * count.to(acc)
        if pres is not None:
            v = v - pres[r] * (count > 0).to(acc)
        if ban is not None and ban[1].numel():
            v[torch.searchsorted(keys, ban[0] * vocab + ban[1])] = float("-inf")
        edits = RowEdits(*_pad_rows(r, tok, v, rows))
    return edits, _restriction(allowed_token_ids, rows, vocab, dev)


def _on(penalty: Optional[torch.Tensor], neutral: float, rows: int, dev):
    """Per row: whether the penalty is in force (False everywhere when it is None)."""
    return torch.zeros(rows, dtype=torch.bool, device=dev) if penalty is None else penalty != neutral


def _pad_rows(r: torch.Tensor, tok: torch.Tensor, v: torch.Tensor, rows: int):
    """Sorted (row, token, value) triples as (rows, E) ids padded with -1 and values."""
    per_row = torch.bincount(r, minlength=rows)
    width = int(per_row.max()) if rows else 0
    start = torch.cumsum(per_row, 0) - per_row
    col = torch.arange(r.numel(), device=r.device) - start[r]
    ids = torch.full((rows, width), -1, dtype=torch.int64, device=r.device)
    values = torch.zeros((rows, width), dtype=v.dtype, device=r.device)
    ids[r, col] = tok
    values[r, col] = v
    return ids, values


def _restriction(allowed_token_ids, rows: int, vocab: int, dev) -> Optional[Restriction]:
    if allowed_token_ids is None:
        return None
    lists = _per_row_list(allowed_token_ids, "allowed_token_ids", rows)
    rows_with = [r for r, a in enumerate(lists) if a is not None]
    if not rows_with:
        return None
    sets = []
    for r in rows_with:
        ids = sorted(set(_int_list(lists[r], "allowed_token_ids")))
        if not ids:
            raise checks.fail(_OP, f"allowed_token_ids of row {r} is empty (None allows every token)")
        if ids[0] < 0 or ids[-1] >= vocab:
            raise checks.fail(_OP, f"allowed_token_ids must hold token ids in [0, {vocab})")
        sets.append(ids)
    width = max(len(s) for s in sets)
    ids = torch.tensor([s + [-1] * (width - len(s)) for s in sets], dtype=torch.int64).to(dev)
    return Restriction(torch.tensor(rows_with, dtype=torch.int64).to(dev), ids)


def restrict(edits: Optional[RowEdits], restriction: Restriction) -> Optional[RowEdits]:
    """The edits of the restricted rows, as positions in their gathered rows (edits of tokens that
    are not allowed are dropped: those tokens are out already)."""
    if edits is None:
        return None
    e = edits.rows(restriction.rows)
    allowed = restriction.ids.masked_fill(restriction.ids < 0, torch.iinfo(torch.int64).max)
    width = allowed.shape[1]
    pos = torch.searchsorted(allowed, e.ids.clamp_min(0)).clamp_max(width - 1)
    hit = (allowed.gather(1, pos) == e.ids) & (e.ids >= 0)
    # Allowed lists are sorted, so kept positions stay ascending; the dropped ones go to the end as -1.
    key = torch.where(hit, pos, torch.full_like(pos, width))
    order = torch.argsort(key, dim=1, stable=True)
    ids = torch.where(hit, pos, -1).gather(1, order)
    return RowEdits(ids, e.values.gather(1, order))


def merge_edits(raw: torch.Tensor, idx: torch.Tensor, edits: Optional[RowEdits]):
    """A row's raw candidates (rows, C) (values ``raw``, ids ``idx``, in the top-k order: larger
    first, equal values by id) and its edits, as the edited row's candidates in that order: the
    edited tokens leave the raw list and come back with their new values. Returns (values, ids,
    real); ``real`` is False on the padding (value -inf, which sorts last). Every token outside
    the result ranks after the last raw candidate, so the result is the edited row's top down to
    that candidate's value."""
    if edits is None or edits.ids.shape[1] == 0:
        return raw, idx, torch.ones_like(idx, dtype=torch.bool)
    search = edits.ids.masked_fill(edits.ids < 0, torch.iinfo(torch.int64).max)
    pos = torch.searchsorted(search, idx).clamp_max(search.shape[1] - 1)
    edited = search.gather(1, pos) == idx
    values = torch.cat([raw.masked_fill(edited, float("-inf")), edits.values.masked_fill(edits.ids < 0, float("-inf"))], 1)
    ids = torch.cat([idx.masked_fill(edited, -1), edits.ids], 1)
    real = ids >= 0
    # The top-k order: by id among equal values (stable sorts: id first, then value descending).
    by_id = torch.argsort(ids.masked_fill(~real, torch.iinfo(torch.int64).max), dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    key = values.masked_fill(~(ids >= 0), float("-inf"))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    return values.gather(1, order), ids, ids >= 0


def dense_rows(x: torch.Tensor, edits: Optional[RowEdits]) -> torch.Tensor:
    """Rows of x with their edits written in, in the accumulation dtype: the rare rows the fused
    paths hand to the exact warpers (ties past what the selection holds)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(acc, copy=True)  # never the caller's logits
    if edits is None or edits.ids.numel() == 0:
        return out
    real = edits.ids >= 0
    r = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(edits.ids)
    out[r[real], edits.ids[real]] = edits.values[real]
    return out
