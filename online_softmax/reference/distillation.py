"""Knowledge distillation densely: the float64 oracle of the distillation losses and the torch
sequence a trainer writes (the benchmark peer). Production code never calls this module.

For a row of student logits ``s`` and teacher logits ``t`` at temperature ``T``, with
``p = softmax(s / T)`` (the student) and ``q = softmax(t / T)`` (the teacher):

- ``kind="kl"``: the forward KL divergence ``KL(q || p) = sum q (log q - log p)``, Hinton's
  distillation loss (without his ``T**2`` factor; multiply by it where wanted);
- ``kind="reverse_kl"``: ``KL(p || q) = sum p (log p - log q)``, mode-seeking;
- ``kind="jsd"``: the generalized Jensen-Shannon divergence with the mixture
  ``m = beta q + (1 - beta) p``: ``beta KL(q || m) + (1 - beta) KL(p || m)`` (TRL's GKD form,
  0 < beta < 1).

A term whose weight is a zero probability is 0 (``0 log 0 = 0``); a row where either distribution
does not exist (NaN, +inf, all -inf logits, no class) gives NaN. With a ``target`` (class indices),
the row's loss is ``hard_weight * CE(s, target) + (1 - hard_weight) * divergence``, the
cross-entropy taken at temperature 1, and a row whose target is ``ignore_index`` has loss 0 and
counts for neither the loss nor the mean.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

KINDS = ("kl", "reverse_kl", "jsd")


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    def kl(log_a, log_b):  # sum a (log a - log b), a zero-probability term being 0 (a NaN one stays NaN)
        a = log_a.exp()
        return torch.where(a == 0, torch.zeros_like(a), a * (log_a - log_b)).sum(-1)

    if kind == "kl":
        return kl(log_q, log_p)
    if kind == "reverse_kl":
        return kl(log_p, log_q)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(torch.tensor(beta, dtype=log_q.dtype)),
                                             log_p + torch.log1p(torch.tensor(-beta, dtype=log_p.dtype))]), dim=0)
        return beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def distillation_rows_reference(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                                kind: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                                hard_weight: float = 0.5, ignore_index: int = -100) -> torch.Tensor:
    """Each row's loss (rows,) in float64 from ``student`` and ``teacher`` (rows, vocab): the
    divergence of their softmaxes at ``temperature``, mixed with the student's cross-entropy against
    ``target`` when one is given (see the module docstring). Differentiable (float64 autograd is
    the gradient oracle)."""
    s, t = student.double(), teacher.double()
    if s.shape[-1] == 0:  # no class: neither distribution exists
        s, t = s.new_full(s.shape[:-1] + (1,), float("nan")), t.new_full(t.shape[:-1] + (1,), float("nan"))
    inv_t = 1.0 / temperature
    div = _divergence(torch.log_softmax(s * inv_t, -1), torch.log_softmax(t * inv_t, -1), kind, beta)
    if target is None:
        return div
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target)).long()
    ce = torch.logsumexp(s, -1) - s.gather(-1, safe[:, None])[:, 0]
    loss = hard_weight * ce + (1 - hard_weight) * div
    return torch.where(keep, loss, torch.zeros_like(loss))


def reduce_rows(rows: torch.Tensor, target: Optional[torch.Tensor], ignore_index: int, reduction: str):
    """``reduction`` of the rows' losses: "mean" over the rows that count (every row without a
    target), "sum", or "none"."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if target is None else (target != ignore_index).sum()
    return rows.sum() / count


def linear_distillation_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *,
                                  student_bias=None, teacher_bias=None, kind="kl", beta=0.5, temperature=1.0,
                                  hard_weight=0.5, ignore_index=-100, reduction="mean") -> torch.Tensor:
    """``linear_distillation_loss`` in float64 with both models' whole logits."""
    def logits(h, w, b):
        return F.linear(h.double(), w.double(), None if b is None else b.double())

    s = logits(student_hidden, student_weight, student_bias)
    t = logits(teacher_hidden, teacher_weight, teacher_bias)
    vocab = s.shape[-1]
    tgt = None if target is None else target.reshape(-1)
    rows = distillation_rows_reference(s.reshape(-1, vocab), t.reshape(-1, vocab), tgt, kind=kind, beta=beta,
                                       temperature=temperature, hard_weight=hard_weight, ignore_index=ignore_index)
    out = reduce_rows(rows, tgt, ignore_index, reduction)
    return out.reshape(student_hidden.shape[:-1]) if reduction == "none" else out


def unfused_linear_distillation(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *,
                                kind="kl", beta=0.5, temperature=1.0, hard_weight=0.5, ignore_index=-100):
    """The torch sequence a distillation trainer runs (TRL's GKD loss with a hard-label term): both
    models' whole logits, their log-softmaxes, the divergence with ``F.kl_div`` and the mean over the
    positions that count. The benchmark peer of ``linear_distillation_loss``."""
    with torch.no_grad():
        t = F.linear(teacher_hidden, teacher_weight)
    s = F.linear(student_hidden, student_weight)
    vocab = s.shape[-1]
    log_p = torch.log_softmax(s.float().reshape(-1, vocab) / temperature, -1)
    log_q = torch.log_softmax(t.float().reshape(-1, vocab) / temperature, -1)
    if kind == "kl":
        div = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":
        div = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        div = (beta * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
               + (1 - beta) * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1))
    if target is None:
        return div.mean()
    tgt = target.reshape(-1)
    keep = tgt != ignore_index
    ce = F.cross_entropy(s.float().reshape(-1, vocab), tgt, ignore_index=ignore_index, reduction="none")
    rows = hard_weight * ce + (1 - hard_weight) * torch.where(keep, div, torch.zeros_like(div))
    return rows.sum() / keep.sum()
