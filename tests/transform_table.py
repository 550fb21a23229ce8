"""What every differentiable public function does under each PyTorch transform, as one table: the
matrix test (tests/ops/test_transform_matrix.py) runs every cell against torch's own composition
in float64, and docs/transforms.md shows the same table to users (a test keeps them equal).

A cell is either "yes" (equal to torch's composition) or a documented error: the exception type
and a phrase its message contains. A new public function gets its row by adding a Case.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import online_softmax as osm

# The columns, in the order the docs show them.
TRANSFORMS = {
    "reverse": "`backward()` / `autograd.grad`",
    "double_backward": "double backward (`create_graph=True`)",
    "forward_ad": "forward-mode AD (dual tensors)",
    "jvp": "`torch.func.jvp`",
    "grad": "`torch.func.grad`",
    "jacrev": "`torch.func.jacrev`",
    "jacfwd": "`torch.func.jacfwd`",
    "hessian": "`torch.func.hessian`",
    "vmap": "`torch.vmap` (a non-last dim)",
    "nested_vmap": "nested `vmap`",
    "vmap_grad": "`vmap(grad(...))`",
    "checkpoint": "`checkpoint` (both kinds)",
    "compile": "`torch.compile(fullgraph=True, dynamic=True)`",
    "export": "`torch.export` (dynamic batch)",
    "meta": "meta tensors",
    "threads": "1 vs 3 threads (same bits)",
}


def _classes(x):
    """A target for rows of x (..., C), built from x's shape so it follows vmap and export."""
    n = x.shape[0]
    return torch.arange(n, device=x.device) * 7 % x.shape[-1]


def _keep(x):
    """A bool mask over x's last dim (True takes part), built from its shape."""
    return (torch.arange(x.shape[-1], device=x.device) % 3 != 1)


_HEAD = torch.randn(11, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _head(x):
    """A fixed output head for linear_cross_entropy: (V, H) with H = x's last dim (made once: a
    random op inside vmap or a compiled region is refused)."""
    return _HEAD[:, :x.shape[-1]].to(x.device, x.dtype)


def _additive(x):
    return torch.where(_keep(x), 0.0, float("-inf")).to(x.dtype) + torch.linspace(-0.5, 0.5, x.shape[-1],
                                                                                    dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class Case:
    name: str  # as the docs show it
    ours: Callable
    ref: Callable
    shape: tuple = (3, 7)  # batch first; softmax over the last dim
    long_shape: tuple = (2, 70001)  # rows long and few enough to be split across threads
    # Transforms this row raises for (the documented error): {transform: (exception, phrase)}.
    raises: dict = None


def _token_logprobs(x):
    """linear_token_logprobs' log-probabilities plus half its entropy (both outputs in one row)."""
    lp, ent = osm.linear_token_logprobs(x, _head(x), _classes(x) % 11, temperature=0.8, return_entropy=True)
    return lp + 0.5 * ent


def _token_logprobs_ref(x):
    log_p = torch.log_softmax(x @ _head(x).t() / 0.8, -1)
    return log_p.gather(-1, (_classes(x) % 11).unsqueeze(-1)).squeeze(-1) - 0.5 * (log_p.exp() * log_p).sum(-1)


def _teacher(x):
    """Fixed teacher logits of x's shape (built from it, so they follow vmap and export)."""
    return torch.sin(torch.arange(x.shape[-1], device=x.device, dtype=x.dtype) * 0.7).expand(x.shape)


def _distillation_ref(x):
    """distillation_loss(kind="jsd", beta=0.3, temperature=0.8): the mean over rows of
    0.3 KL(q || m) + 0.7 KL(p || m), m = 0.3 q + 0.7 p."""
    log_p = torch.log_softmax(x / 0.8, -1)
    log_q = torch.log_softmax(_teacher(x) / 0.8, -1)
    log_m = torch.logaddexp(log_q + math.log(0.3), log_p + math.log(0.7))
    rows = 0.3 * (log_q.exp() * (log_q - log_m)).sum(-1) + 0.7 * (log_p.exp() * (log_p - log_m)).sum(-1)
    return rows.mean()


def _topk_ref(x, k, log=False, renormalize=False):
    p = torch.softmax(x, -1)
    v, i = p.topk(k, -1)
    if renormalize:
        v = v / v.sum(-1, keepdim=True)
        return v.log() if log else v
    return torch.log_softmax(x, -1).gather(-1, i) if log else v


CASES = [
    Case("softmax", lambda x: osm.softmax(x, -1), lambda x: torch.softmax(x, -1)),
    Case("log_softmax", lambda x: osm.log_softmax(x, -1), lambda x: torch.log_softmax(x, -1)),
    Case("softmax(dim=0)", lambda x: osm.softmax(x, 0), lambda x: torch.softmax(x, 0), long_shape=(70001, 2)),
    Case("softmax(temperature=)", lambda x: osm.softmax(x, -1, temperature=0.7),
         lambda x: torch.softmax(x / 0.7, -1)),
    Case("OnlineLogSoftmax", lambda x: osm.OnlineLogSoftmax(dim=-1)(x), lambda x: torch.log_softmax(x, -1)),
    Case("softmax(scale=)", lambda x: osm.softmax(x, -1, scale=0.5), lambda x: torch.softmax(x * 0.5, -1)),
    Case("softmax(mask=bool)", lambda x: osm.softmax(x, -1, scale=0.5, mask=_keep(x)),
         lambda x: torch.softmax((x * 0.5).masked_fill(~_keep(x), float("-inf")), -1)),
    Case("log_softmax(mask=additive)", lambda x: osm.log_softmax(x, -1, mask=_additive(x)).clamp_min(-1e30),
         lambda x: torch.log_softmax(x + _additive(x), -1).clamp_min(-1e30)),
    Case("softmax(causal=True)", lambda x: osm.softmax(x, -1, scale=0.5, causal=True),
         lambda x: torch.softmax((x * 0.5).masked_fill(
             torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).triu(1), float("-inf")), -1),
         shape=(2, 3, 5, 5), long_shape=(1, 2, 300, 300)),
    Case("FusedScaleMaskSoftmax(causal)",
         lambda x: osm.FusedScaleMaskSoftmax(attn_mask_type=osm.AttnMaskType.causal, scale=0.5)(x),
         lambda x: torch.softmax((x * 0.5).masked_fill(
             torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).triu(1), float("-inf")), -1),
         shape=(2, 3, 5, 5), long_shape=(1, 2, 300, 300)),
    Case("softmax_stats(...).logsumexp()", lambda x: osm.softmax_stats(x, -1).logsumexp(),
         lambda x: torch.logsumexp(x, -1)),
    Case("softmax_stats(...).sumexp", lambda x: osm.softmax_stats(x, -1, temperature=0.8).sumexp,
         lambda x: torch.exp(x / 0.8 - (x / 0.8).amax(-1, keepdim=True)).sum(-1)),
    Case("merge_states(...).normalize()",
         lambda x: osm.merge_states(osm.softmax_stats(c, -1) for c in x.split([3, x.shape[-1] - 3], -1)).normalize(x),
         lambda x: torch.softmax(x, -1)),
    Case("softmax_topk(...).values", lambda x: osm.softmax_topk(x, 3).values, lambda x: _topk_ref(x, 3)),
    Case("softmax_topk(log=True)", lambda x: osm.softmax_topk(x, 3, log=True).values,
         lambda x: _topk_ref(x, 3, log=True)),
    Case("softmax_topk(renormalize=True)", lambda x: osm.softmax_topk(x, 2, renormalize=True).values,
         lambda x: _topk_ref(x, 2, renormalize=True)),
    Case("cross_entropy", lambda x: osm.cross_entropy(x, _classes(x)), lambda x: F.cross_entropy(x, _classes(x))),
    Case("cross_entropy(label_smoothing, none)",
         lambda x: osm.cross_entropy(x, _classes(x), label_smoothing=0.1, reduction="none"),
         lambda x: F.cross_entropy(x, _classes(x), label_smoothing=0.1, reduction="none")),
    Case("linear_cross_entropy", lambda x: osm.linear_cross_entropy(x, _head(x), _classes(x) % 11),
         lambda x: F.cross_entropy(x @ _head(x).t(), _classes(x) % 11), shape=(5, 4), long_shape=(300, 64)),
    Case("distillation_loss(kind=jsd)",
         lambda x: osm.distillation_loss(x, _teacher(x), kind="jsd", beta=0.3, temperature=0.8), _distillation_ref),
    Case("linear_token_logprobs(return_entropy=True)", _token_logprobs, _token_logprobs_ref, shape=(5, 4),
         long_shape=(300, 64)),
]


def render_markdown():
    """The table as docs/transforms.md shows it: one row per transform, saying which functions
    raise under it (and what) and that every other equals torch's composition."""
    lines = ["| transform | result |", "|---|---|"]
    for key, label in TRANSFORMS.items():
        raising = [c for c in CASES if key in (c.raises or {})]
        if not raising:
            result = "every function"
        else:
            notes = "; ".join(f"`{c.name}` raises `{c.raises[key][0].__name__}` (\"{c.raises[key][1]}\")"
                              for c in raising)
            result = f"every function but these: {notes}"
        lines.append(f"| {label} | {result} |")
    functions = ", ".join(f"`{c.name}`" for c in CASES)
    return "\n".join(lines) + f"\n\nThe functions (each a row of the test): {functions}.\n"
