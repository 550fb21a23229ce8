"""The Python API: drop-ins for torch.softmax / torch.log_softmax and the fused softmax + top-k."""

from typing import NamedTuple, Optional

import torch

_ops = torch.ops.online_softmax


class SoftmaxTopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def _check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"online_softmax.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")


def softmax(x: torch.Tensor, dim: int = -1, *, dtype: Optional[torch.dtype] = None,
            temperature: float = 1.0) -> torch.Tensor:
    """softmax(x / temperature) along ``dim``, like ``torch.softmax(x, dim, dtype=dtype)``.

    ``dtype`` is the result dtype; float16/bfloat16 input with ``dtype=torch.float32`` is converted
    while it is read. Accumulation is float32 (float64 for float64). Differentiable.
    """
    _check_tensor(x, "x", "softmax")
    return _ops.forward(x, dim, False, float(temperature), dtype)


def log_softmax(x: torch.Tensor, dim: int = -1, *, dtype: Optional[torch.dtype] = None,
                temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(x / temperature) along ``dim``, like ``torch.log_softmax(x, dim, dtype=dtype)``."""
    _check_tensor(x, "x", "log_softmax")
    return _ops.forward(x, dim, True, float(temperature), dtype)


def softmax_topk(x: torch.Tensor, k: int, dim: int = -1, *, log: bool = False, temperature: float = 1.0,
                 renormalize: bool = False, dtype: Optional[torch.dtype] = None) -> SoftmaxTopK:
    """The k largest entries of softmax(x / temperature) (or log_softmax with ``log=True``).

    Reads x once and never materializes the softmax: the online (max, sumexp) and a per-thread
    top-k are built in the same pass. Values are sorted descending, ties go to the lower index,
    indices are int64, and k sits at ``dim`` in the outputs as in ``torch.topk``. Differentiable with
    respect to x (the backward recomputes probabilities from x and the per-row state).

    ``renormalize=True`` divides the k probabilities by their sum (the routing weights of a
    Mixtral-style MoE router: ``softmax(x).topk(k)`` then ``w / w.sum()``); with ``log=True`` it
    gives their log. ``dtype`` is the values' dtype (default x's): routers keep float32 weights for
    bfloat16 logits. Either one recomputes the k values from x's k selected logits in float32
    (float64 for float64), so a float32 result is not a rounded bfloat16 one.
    """
    _check_tensor(x, "x", "softmax_topk")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"online_softmax.softmax_topk: k must be an int, got {type(k).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"online_softmax.softmax_topk: dtype must be a floating torch.dtype, got {dtype!r}")
    values, indices, m, d = _ops.softmax_topk(x, k, dim, log, float(temperature))
    out_dtype = x.dtype if dtype is None else dtype
    if not renormalize and out_dtype == x.dtype:
        return SoftmaxTopK(values, indices)
    acc = torch.promote_types(torch.promote_types(m.dtype, out_dtype), torch.float32)
    z = x.gather(dim, indices).to(acc)
    if temperature != 1.0:
        z = z / float(temperature)
    if renormalize:
        # The full row's normalizer cancels: the weights are the softmax of the k logits.
        w = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
        return SoftmaxTopK(w.to(out_dtype), indices)
    m, d = m.unsqueeze(dim).to(acc), d.unsqueeze(dim).to(acc)
    exact = (z - m - d.log()) if log else torch.exp(z - m) / d
    # The value from the row's state; the gradient through the op's own backward (the state's
    # outputs carry none).
    cast = values.to(out_dtype)
    return SoftmaxTopK(exact.detach().to(out_dtype) + (cast - cast.detach()), indices)
