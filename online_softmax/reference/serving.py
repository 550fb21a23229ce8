"""A serving engine's sampler, densely: the float64 oracle of ``sample``'s edits and log-probability
fields, and the torch sequence vLLM runs (the benchmark peer).

Both apply the edits the way vLLM's sampler does, over the whole (rows, vocab) logits: a mask for
the allowed tokens, -inf for bad words and min_tokens' stop tokens, the logit bias, then the
repetition, frequency and presence penalties from per-token counts of the prompt and the output.
"""

from typing import Optional

import torch

from ..decoding.warpers import warped_scores


def _lists(value, rows):
    if value is None:
        return [None] * rows
    if isinstance(value, torch.Tensor):
        return [[v for v in row if v >= 0] for row in value.tolist()]
    return [None if v is None else (v.tolist() if isinstance(v, torch.Tensor) else list(v)) for v in value]


def _per_row(value, rows, neutral):
    if value is None:
        return torch.full((rows,), float(neutral), dtype=torch.float64)
    if isinstance(value, torch.Tensor):
        return value.double().cpu().reshape(-1).expand(rows)
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.float64)
    return torch.full((rows,), float(value), dtype=torch.float64)


def _counts(lists, rows, vocab):
    counts = torch.zeros(rows, vocab, dtype=torch.int64)
    for r, ids in enumerate(lists):
        for v in ids or ():
            counts[r, v] += 1
    return counts


def edited_logits(logits: torch.Tensor, *, allowed_token_ids=None, bad_words=None, min_tokens=None,
                  stop_token_ids=None, logit_bias=None, presence_penalty=None, frequency_penalty=None,
                  repetition_penalty=None, output_token_ids=None, prompt_token_ids=None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The logits (rows, vocab) after the serving edits, in vLLM's order and formulas, as a dense
    tensor of ``dtype`` (float64: the oracle; float32: as vLLM computes them)."""
    x = logits.to(dtype=dtype, copy=True).cpu()
    rows, vocab = x.shape
    outputs = _lists(output_token_ids, rows)
    neg = float("-inf")
    if allowed_token_ids is not None:
        for r, allowed in enumerate(_lists(allowed_token_ids, rows)):
            if allowed is not None:
                banned = torch.ones(vocab, dtype=torch.bool)
                banned[list(allowed)] = False
                x[r, banned] = neg
    if bad_words is not None:
        for r, words in enumerate(bad_words):
            for w in words or ():
                w = list(w)
                past = outputs[r] or []
                if len(w) > len(past) + 1:
                    continue
                if not w[:-1] or past[len(past) - len(w) + 1:] == w[:-1]:
                    x[r, w[-1]] = neg
    if min_tokens is not None:
        mins = min_tokens if isinstance(min_tokens, (list, tuple)) else [min_tokens] * rows
        for r, (least, stops) in enumerate(zip(mins, _lists(stop_token_ids, rows))):
            if least is not None and len(outputs[r] or []) < least and stops:
                x[r, list(stops)] = neg
    if logit_bias is not None:
        for r, biases in enumerate(logit_bias):
            for tok, b in (biases or {}).items():
                x[r, tok] += b
    out_counts = _counts(outputs, rows, vocab)
    if repetition_penalty is not None:
        seen = (out_counts > 0) | (_counts(_lists(prompt_token_ids, rows), rows, vocab) > 0)
        penalty = torch.where(seen, _per_row(repetition_penalty, rows, 1.0)[:, None].to(dtype), torch.ones((), dtype=dtype))
        x = x * torch.where(x > 0, 1.0 / penalty, penalty)
    if frequency_penalty is not None:
        x = x - _per_row(frequency_penalty, rows, 0.0)[:, None].to(dtype) * out_counts.to(dtype)
    if presence_penalty is not None:
        x = x - _per_row(presence_penalty, rows, 0.0)[:, None].to(dtype) * (out_counts > 0).to(dtype)
    return x.to(logits.device)


def _rank_and_top(v: torch.Tensor, log_probs: torch.Tensor, tokens: torch.Tensor, n: int):
    """Ranks of tokens (rows, S) by counting the values ahead (larger, NaN first, equal values by
    the lower id) and the top n by a stable descending sort, with their log-probabilities."""
    rows, vocab = v.shape
    ids = torch.arange(vocab, device=v.device)
    safe = tokens.clamp_min(0)
    mine = v.gather(1, safe)[:, :, None]
    vv = v[:, None, :]
    ahead = ((vv != vv) & (mine == mine)) | (vv > mine) | ((vv == mine) & (ids < safe[:, :, None]))
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :n]
    return log_probs.gather(1, safe), ahead.sum(-1) + 1, order, log_probs.gather(1, order)


def sample_fields_reference(logits: torch.Tensor, tokens: torch.Tensor, *, temperature=1.0, top_k=None,
                            top_p=None, min_p=None, logprobs: int = 0, logprobs_mode: str = "raw",
                            **edits) -> dict:
    """The float64 oracle of ``sample``: the distribution drawn from (``probs``, rows x vocab) and,
    for drawn ``tokens`` (rows, S), the log-probability fields under ``logprobs_mode``."""
    x = logits.reshape(-1, logits.shape[-1])
    v = edited_logits(x, **edits) if edits else x.double()
    scores = warped_scores(v, temperature, top_k, top_p, min_p)
    probs = torch.softmax(scores, -1)
    if logprobs_mode == "raw":
        scored, lp = x.double(), torch.log_softmax(x.double(), -1)
    else:  # log_softmax, not log(probs): a kept token's log-probability below float64's exp range is finite
        scored, lp = v, torch.log_softmax(scores, -1)
    tlp, rank, top_ids, top_lp = _rank_and_top(scored, lp, tokens.reshape(x.shape[0], -1), logprobs)
    return dict(probs=probs, token_log_probs=tlp, rank=rank, top_token_ids=top_ids, top_log_probs=top_lp)


def unfused_serving_sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, logprobs: Optional[int] = None,
                           generator: Optional[torch.Generator] = None, output_counts: Optional[torch.Tensor] = None,
                           prompt_mask: Optional[torch.Tensor] = None, logit_bias: Optional[torch.Tensor] = None,
                           presence_penalty=None, frequency_penalty=None, repetition_penalty=None):
    """The steps vLLM's sampler runs, in torch ops (the benchmark's peer): raw log-probabilities
    (a full log_softmax and a topk), a float32 copy of the logits, the dense logit bias and
    penalties from (rows, vocab) counts and masks, temperature, top-k and top-p by a sort, the
    softmax and an exponential race for the draw, and the drawn tokens' ranks by counting."""
    raw_lp = top = None
    if logprobs is not None:
        raw_lp = torch.log_softmax(logits, -1, dtype=torch.float32)
        top = raw_lp.topk(logprobs, -1)
    x = logits.to(torch.float32)
    if logit_bias is not None:
        x = x + logit_bias
    if repetition_penalty is not None:
        seen = prompt_mask | (output_counts > 0)
        penalty = torch.where(seen, repetition_penalty[:, None], 1.0)
        x = x * torch.where(x > 0, 1.0 / penalty, penalty)
    if frequency_penalty is not None:
        x = x - frequency_penalty[:, None] * output_counts
    if presence_penalty is not None:
        x = x - presence_penalty[:, None] * (output_counts > 0)
    x = x / temperature[:, None]
    sorted_x, order = x.sort(-1, descending=False)
    kth = sorted_x.gather(1, (x.shape[1] - top_k).clamp_min(0)[:, None])
    sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    cum = sorted_x.softmax(-1).cumsum(-1)
    cut = cum <= 1 - top_p[:, None]
    cut[:, -1] = False
    sorted_x = sorted_x.masked_fill(cut, float("-inf"))
    x = sorted_x.scatter(-1, order, sorted_x)
    probs = x.softmax(-1)
    q = torch.empty_like(probs).exponential_(generator=generator)
    tokens = probs.div(q).argmax(-1)
    if raw_lp is None:
        return tokens
    token_lp = raw_lp.gather(1, tokens[:, None])
    rank = (raw_lp > token_lp).sum(-1) + 1
    return tokens, token_lp, rank, top.indices, top.values
