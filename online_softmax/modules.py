"""nn.Module drop-ins for nn.Softmax and nn.LogSoftmax."""

from typing import Optional

import torch
from torch import nn

from .api import log_softmax, softmax


class OnlineSoftmax(nn.Module):
    """Like ``nn.Softmax(dim)``, computed with the online softmax kernels. ``dim=None`` takes
    torch's legacy implicit dim, with its warning, as ``nn.Softmax(dim=None)`` does; the default is
    the last dim (``nn.Softmax``'s default is None)."""

    def __init__(self, dim: Optional[int] = -1, temperature: float = 1.0):
        super().__init__()
        self.dim = dim
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.dim, _stacklevel=5, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + ("" if self.temperature == 1.0 else f", temperature={self.temperature}")


class OnlineLogSoftmax(OnlineSoftmax):
    """Like ``nn.LogSoftmax(dim)``, computed with the online softmax kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_softmax(x, self.dim, _stacklevel=5, temperature=self.temperature)
