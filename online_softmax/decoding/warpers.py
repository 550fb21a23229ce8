"""transformers' sampling warpers on materialized scores, and the exact draw from them.

``sample`` (sampling.py) draws from the same distribution without materializing it. It falls back
to :func:`exact_draw` on the rare rows the fused selection cannot settle exactly (more logits tied
with the k-th than it holds, or a top-p cut inside a group of equal logits), so this module is
production code; the tests also check :func:`warped_probs` against transformers' own warpers.
"""

import torch


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor):
    """For rows of nonnegative weights (rows, K) and uniforms (rows, S): the first position whose
    cumulative weight exceeds u * total, never past the last positive weight (rounding). Returns
    (positions, totals (rows, 1))."""
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    pos = torch.searchsorted(cdf, u * total, right=True)
    last = weights.shape[1] - 1 - (weights.flip(-1) > 0).int().argmax(-1, keepdim=True)
    return torch.minimum(pos, last), total


def warped_probs(x: torch.Tensor, temperature, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """The probabilities transformers samples from (rows, vocab), as its warpers compute them:
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, then softmax.
    Parameters are numbers or per-row tensors."""
    return torch.softmax(warped_scores(x, temperature, top_k, top_p, min_p), -1)


def warped_scores(x: torch.Tensor, temperature, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """The scores after transformers' warpers (-inf where a cut removed a token), before the softmax."""
    rows, vocab = x.shape

    def col(v, dtype):
        return (v if isinstance(v, torch.Tensor) else torch.full((rows,), v)).to(x.device, dtype)[:, None]

    scores = x / col(temperature, x.dtype)
    neg = float("-inf")
    if top_k is not None:
        k = col(top_k, torch.int64).clamp(max=vocab)
        on = k > 0
        top = torch.topk(scores, int(k.max().clamp_min(1)), dim=-1).values  # TopKLogitsWarper's topk
        kth = top.gather(1, (k - 1).clamp_min(0))
        scores = torch.where(on & (scores < kth), neg, scores)
    if top_p is not None:
        tp = col(top_p, scores.dtype)
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = (cum <= 1 - tp) & (tp < 1)
        remove[:, -1] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), neg)
    if min_p is not None:
        mp = col(min_p, scores.dtype)
        probs = torch.softmax(scores, -1)
        remove = probs < mp * probs.amax(-1, keepdim=True)
        sorted_idx = torch.argsort(scores, descending=True, dim=-1)
        sorted_remove = remove.gather(1, sorted_idx)
        sorted_remove[:, 0] = False
        scores = scores.masked_fill(sorted_remove.scatter(1, sorted_idx, sorted_remove), neg)
    return scores


def exact_draw(x, t, k, top_p, min_p, u):
    """Rows whose k-th logit has more ties than the fused selection holds: the exact warpers on the
    whole row, then the same inverse-CDF draw (over token ids in order)."""
    probs = warped_probs(x.to(torch.promote_types(x.dtype, torch.float32)), t, k, top_p, min_p)
    pos, _ = inverse_cdf(probs, u)
    return pos, probs.gather(1, pos).log()
