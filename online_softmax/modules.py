"""nn.Module drop-ins for nn.Softmax and nn.LogSoftmax."""

import torch
from torch import nn

from .api import log_softmax, softmax


class OnlineSoftmax(nn.Module):
    """Like ``nn.Softmax(dim)``, computed with the online softmax kernels."""

    def __init__(self, dim: int = -1, temperature: float = 1.0):
        super().__init__()
        self.dim = dim
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.dim, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + ("" if self.temperature == 1.0 else f", temperature={self.temperature}")


class OnlineLogSoftmax(OnlineSoftmax):
    """Like ``nn.LogSoftmax(dim)``, computed with the online softmax kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_softmax(x, self.dim, temperature=self.temperature)
