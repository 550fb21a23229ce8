"""nn.Module forms of the losses: drop-ins for nn.CrossEntropyLoss, and the linear head + loss."""

from typing import Optional

import torch
from torch import nn

from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss(weight, ignore_index=, reduction=, label_smoothing=)`` computed with
    :func:`online_softmax.losses.cross_entropy`, plus its ``z_loss``, ``softcap`` and
    ``inplace_backward``. The class weights are a buffer, as in torch."""

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False):
        super().__init__()
        if size_average is not None or reduce is not None:
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.inplace_backward = z_loss, softcap, inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward)


class LinearCrossEntropyLoss(nn.Module):
    """A vocabulary head and its cross-entropy in one: ``forward(hidden, target)`` is
    ``cross_entropy(hidden @ weight.T + bias, target)`` without the logits
    (:func:`online_softmax.losses.linear_cross_entropy`). ``weight`` (V, H) and ``bias`` are
    parameters; pass ``weight=`` an existing parameter to share it (a tied embedding)."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, *,
                 weight: Optional[nn.Parameter] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self.weight = weight if weight is not None else \
            nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_classes, device=device, dtype=dtype)) if bias else None
        if weight is None:
            nn.init.normal_(self.weight, std=in_features ** -0.5)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.weight, target, self.bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size)
