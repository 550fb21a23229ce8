"""nn.Module drop-ins for nn.Softmax and nn.LogSoftmax, and for Megatron-LM's FusedScaleMaskSoftmax."""

import enum
from typing import Optional

import torch
from torch import nn

from . import _checks as checks
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


class AttnMaskType(enum.Enum):
    """Megatron-LM's attention mask types (megatron.core.transformer.enums.AttnMaskType), same names
    and values; :class:`FusedScaleMaskSoftmax` also takes Megatron's own members by name."""

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4
    arbitrary = 5


class FusedScaleMaskSoftmax(nn.Module):
    """Megatron-LM's ``FusedScaleMaskSoftmax`` (scale, mask, softmax over attention scores
    (b, heads, sq, sk)) on the online softmax kernels, so that a model written for Megatron switches
    by import. Megatron's conventions, not :func:`~online_softmax.softmax`'s:

    - ``mask`` is bool with **True masked out** (the opposite of ``softmax(mask=...)``, which
      follows ``scaled_dot_product_attention``), any shape that broadcasts to the scores;
    - a row with every key masked gives zeros, as Megatron's fused kernels do (its unfused path,
      which fills -10000, would give a uniform row);
    - ``attn_mask_type``: ``padding`` and ``arbitrary`` apply the mask, ``causal`` masks key j > query
      i (queries at the end of the keys when sq < sk, as Megatron's inference does) and also
      applies a mask if one is given (Megatron's fused causal kernel ignores it; the causal mask it
      is usually given changes nothing), ``padding_causal`` does both, ``no_mask`` ignores the mask.

    ``scale`` multiplies the scores; as in Megatron it needs ``softmax_in_fp32``. float16/bfloat16
    scores are always accumulated in float32 and the result has the input's dtype (Megatron's
    ``softmax_in_fp32=True``; with False, Megatron computes in half precision and this does not).
    ``scaled_masked_softmax_fusion`` and ``mask_func`` are accepted for the constructor's sake: the
    fused path is always taken, and it applies the mask itself.
    """

    def __init__(self, input_in_fp16: bool = False, input_in_bf16: bool = False,
                 attn_mask_type=AttnMaskType.padding, scaled_masked_softmax_fusion: bool = True,
                 mask_func=None, softmax_in_fp32: bool = True, scale: Optional[float] = None):
        super().__init__()
        op = "FusedScaleMaskSoftmax"
        if input_in_fp16 and input_in_bf16:
            raise checks.fail(op, "both fp16 and bf16 flags cannot be active at the same time")
        name = getattr(attn_mask_type, "name", attn_mask_type)
        if name not in AttnMaskType.__members__:
            raise checks.fail(op, f"attn_mask_type must be one of {list(AttnMaskType.__members__)}, got "
                                  f"{attn_mask_type!r}")
        if scale is not None and not softmax_in_fp32:
            raise checks.fail(op, "softmax should be in fp32 when scaled (Megatron's rule)")
        self.input_in_fp16, self.input_in_bf16 = input_in_fp16, input_in_bf16
        self.attn_mask_type = AttnMaskType[name]
        self.scaled_masked_softmax_fusion, self.mask_func = scaled_masked_softmax_fusion, mask_func
        self.softmax_in_fp32 = softmax_in_fp32
        self.scale = None if scale is None else checks.real(scale, "scale", op)

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        kind = self.attn_mask_type
        causal = kind in (AttnMaskType.causal, AttnMaskType.padding_causal)
        keep = None
        if mask is not None and kind is not AttnMaskType.no_mask:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise checks.fail("FusedScaleMaskSoftmax", "mask must be a bool tensor, True where masked out",
                                  TypeError)
            keep = ~mask
        offset = input.shape[-1] - input.shape[-2] if causal and input.dim() >= 2 else 0
        return softmax(input, -1, scale=1.0 if self.scale is None else self.scale, mask=keep, causal=causal,
                       causal_offset=offset)

    def extra_repr(self) -> str:
        return f"attn_mask_type={self.attn_mask_type.name}, scale={self.scale}"
