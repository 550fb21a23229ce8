"""Argument checks shared by every public function, so one mistake raises one exception everywhere.

As torch does: ``TypeError`` for a value of the wrong type, ``ValueError`` for a value of the right
type that is out of range, ``IndexError`` for a dim out of range. Every message starts with
``online_softmax.<where>:`` and names the argument. The C++ ops make the same checks
(csrc/common/checks.h); the fake kernels in ops.py call these so that torch.compile raises alike.
"""

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _where(op: str) -> str:
    return op if op.startswith("online_softmax") else f"online_softmax.{op}"


def fail(op: str, message: str, kind=ValueError):
    """The exception for a bad argument of ``op``, prefixed like every other one."""
    return kind(f"{_where(op)}: {message}")


def tensor(value, name: str, op: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise fail(op, f"{name} must be {what}, got {type(value).__name__}", TypeError)


def floating(t: torch.Tensor, name: str, op: str) -> None:
    """A tensor the kernels read: float32, float64, float16 or bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        raise fail(op, f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
                       f"got {t.dtype}", TypeError)


def float_dtype(dtype, name: str, op: str, *, optional: bool = True) -> None:
    """A dtype argument naming one of the four floating dtypes (or None where optional)."""
    if dtype is None and optional:
        return
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise fail(op, f"{name} must be a floating dtype (float32, float64, float16 or bfloat16), got {dtype!r}",
                   TypeError)


def integer(value, name: str, op: str, *, minimum: int) -> int:
    """An int (never a bool) of at least ``minimum``; a symbolic one (torch.export, dynamic shapes)
    too."""
    if isinstance(value, torch.Tensor) and torch.jit.is_tracing() and value.dim() == 0 \
            and not value.is_floating_point():
        value = int(value)  # jit.trace gives sizes as 0-d tensors; the trace records the value it saw
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise fail(op, f"{name} must be an int, got {type(value).__name__}", TypeError)
    if value < minimum:
        raise fail(op, f"{name} must be >= {minimum}, got {value}")
    return value


def positive_int(value, name: str, op: str) -> int:
    return integer(value, name, op, minimum=1)


def nonnegative_int(value, name: str, op: str) -> int:
    return integer(value, name, op, minimum=0)


def real(value, name: str, op: str) -> float:
    """A Python number (int or float, never a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(op, f"{name} must be a number, got {type(value).__name__}", TypeError)
    return float(value)


def positive_finite(value, name: str, op: str) -> float:
    value = real(value, name, op)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument may be a
    # SymFloat, which math.isfinite does not take (NaN fails both comparisons).
    if not (0 < value < math.inf):
        raise fail(op, f"{name} must be a finite number > 0, got {value}")
    return value


def temperature(value, op: str, name: str = "temperature") -> float:
    """A temperature t > 0 whose reciprocal fits in float32 (the kernels multiply by 1 / t)."""
    t = positive_finite(value, name, op)
    if 1.0 / t > 3.0e38:
        raise fail(op, f"{name} must be at least 3.4e-39 (1 / {name} must fit in float32), got {t}")
    return t


def dim_type(dim, op: str) -> int:
    """A dim argument's type; its range is checked against the tensor (wrap_dim, or the op)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise fail(op, f"dim must be an int, got {type(dim).__name__}", TypeError)
    return dim


def wrap_dim(dim, x: torch.Tensor, op: str) -> int:
    """``dim`` counted from the front; a 0-d tensor has the one dim 0 (or -1), as in torch."""
    return wrap_dim_of(dim, x.dim(), op)


def wrap_dim_of(dim, dims: int, op: str) -> int:
    """``dim`` counted from the front for a tensor of ``dims`` dimensions."""
    dim_type(dim, op)
    ndim = max(dims, 1)
    if not -ndim <= dim < ndim:
        raise fail(op, f"dim={dim} is out of range for a tensor with {dims} dimension(s) "
                       f"(expected {-ndim} <= dim <= {ndim - 1})", IndexError)
    return dim % ndim


def k_in_range(k: int, size: int, op: str) -> None:
    if not 1 <= k <= size:
        raise fail(op, f"k must satisfy 1 <= k <= {size} (the size of the softmax dim), got k={k}")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of (max, sumexp) and of the accumulation: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduced_shape(x: torch.Tensor, dim: int) -> list:
    shape = list(x.shape)
    if shape:
        del shape[dim]
    return shape


def generator(value: Optional[torch.Generator], op: str) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise fail(op, f"generator must be a torch.Generator, got {type(value).__name__}", TypeError)


def mask_layout(mask, x: torch.Tensor, op: str, x_name: str = "input") -> None:
    """A mask tensor on x's device whose shape broadcasts to x's (its dtype: the caller's check)."""
    tensor(mask, "mask", op)
    if mask.device != x.device:
        raise fail(op, f"mask must be on {x_name}'s device {x.device}, got {mask.device}")
    if mask.dim() > x.dim() or any(m not in (1, n) for m, n in zip(reversed(mask.shape), reversed(x.shape))):
        raise fail(op, f"mask of shape {list(mask.shape)} does not broadcast to {x_name}'s shape {list(x.shape)}")


def bool_mask(mask, x: torch.Tensor, op: str) -> None:
    """A bool mask (True takes part) that broadcasts to x, on x's device."""
    tensor(mask, "mask", op)
    if mask.dtype != torch.bool:
        raise fail(op, f"mask must be a bool tensor (True takes part), got {mask.dtype}", TypeError)
    mask_layout(mask, x, op)
