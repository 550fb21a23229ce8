"""The Python API: drop-ins for torch.softmax / torch.log_softmax and the fused softmax + top-k.

Naming rule for every public function of the package:

- a function that mirrors a torch function takes that function's argument names and order
  (``input``, ``dim``, ``dtype``; ``k`` as in ``torch.topk``); a function whose input is a
  decoder's next-token scores (beam search, sampling) calls it ``logits``;
- a full softmax comes as two functions named like torch's (``softmax``, ``log_softmax``); a
  function that returns selected probabilities (a top-k) takes ``log=True`` for their logarithm;
- options beyond torch's (``temperature``, ``renormalize``, ...) are keyword-only.
"""

import warnings
from typing import NamedTuple, Optional

import torch

from . import _checks as checks
from ._dtensor import check_input, is_dtensor

_ops = torch.ops.online_softmax


class SoftmaxTopK(NamedTuple):
    """What :func:`softmax_topk` returns: the k largest probabilities (or log-probabilities) along
    the dim, sorted descending, and their int64 indices (ties to the lower index), both with k at
    the softmax dim as in ``torch.topk``."""

    values: torch.Tensor
    indices: torch.Tensor


def _legacy_dim(name: str, ndim: int, stacklevel: int) -> int:
    # torch.nn.functional's rule and warning for dim=None, word for word.
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  "Change the call to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


_forward = _ops.forward.default
# The C++ function behind OpOverload.__call__: calling it directly saves a Python frame, about
# 0.3 us of a 4-us call. torch.compile cannot trace it, so it is given the OpOverload in its place.
_forward_call = _forward._op


@torch.compiler.substitute_in_graph(_forward_call, skip_signature_check=True)
def _forward_traced(x, dim, log, temperature, dtype):
    return _forward(x, dim, log, temperature, dtype)


# The common call, softmax(x, dim) with every option at its default, goes straight to the op: there
# is nothing for Python to check that the op does not check itself (dim's range, x's dtype), and a
# small softmax is a few microseconds, of which these checks were a quarter. The test is written
# out in each function (a helper call costs 0.1 us): x a plain Tensor (subclasses and
# __torch_function__ go through the checks), dim an int, the third position not torch.softmax's
# dtype, and every keyword at its default.


def _dropin(op: str, input, dim, stacklevel, dtype, temperature, log: bool, mask=None, causal=False,
            causal_offset=0, scale=None) -> torch.Tensor:
    checks.tensor(input, "input", op)
    check_input(input, op)
    if isinstance(stacklevel, torch.dtype):
        # torch.softmax(input, dim, dtype): the third position is torch.softmax's dtype, and
        # torch.nn.functional.softmax's _stacklevel.
        if dtype is not None:
            raise checks.fail(op, "dtype given twice (by position and by name)", TypeError)
        stacklevel, dtype = 3, stacklevel
    if dim is None:
        dim = _legacy_dim(op, input.dim(), stacklevel + 1)
    elif isinstance(dim, bool) or not isinstance(dim, int):
        raise checks.fail(op, f"dim must be an int or None, got {type(dim).__name__}", TypeError)
    if dtype is not None:
        checks.float_dtype(dtype, "dtype", op)
    temperature = checks.real(temperature, "temperature", op)
    if mask is None and not causal and scale is None:
        return _ops.forward(input, dim, log, temperature, dtype)
    if not isinstance(causal, bool):
        raise checks.fail(op, f"causal must be a bool, got {type(causal).__name__}", TypeError)
    causal_offset = checks.integer(causal_offset, "causal_offset", op, minimum=-(2 ** 62))
    checks.tensor(mask, "mask", op, optional=True)
    if scale is None:
        scale = 1.0 / checks.temperature(temperature, op)
    elif temperature != 1.0:
        raise checks.fail(op, "give temperature or scale, not both (scale multiplies: scale = 1 / temperature)")
    else:
        scale = checks.real(scale, "scale", op)
    return _ops.masked_forward(input, mask, causal, causal_offset, log, scale, dim, dtype)


def softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None, *, temperature: float = 1.0, scale: Optional[float] = None,
            mask: Optional[torch.Tensor] = None, causal: bool = False, causal_offset: int = 0) -> torch.Tensor:
    """softmax(input / temperature) along ``dim``: ``torch.softmax`` and
    ``torch.nn.functional.softmax`` with their call forms (``softmax(x, 1)``,
    ``softmax(x, 1, torch.float64)``, ``softmax(input=x, dim=1, dtype=...)``, and ``dim=None``
    with torch's legacy choice of dim and its deprecation warning).

    ``dtype`` is the result dtype; float16/bfloat16 input with ``dtype=torch.float32`` is converted
    while it is read. Accumulation is float32 (float64 for float64). Differentiable.

    As attention calls it, in the same single pass (the ``masked_forward`` op):

    - ``scale``: multiplies the input (attention's ``1 / sqrt(head_dim)``); give it or
      ``temperature``, not both.
    - ``mask``: any shape that broadcasts to the input, read through its broadcast strides (never
      expanded in memory). **bool: True takes part**, as in ``scaled_dot_product_attention``
      (``torch._masked_softmax`` and Megatron use the opposite; see
      :class:`~online_softmax.modules.FusedScaleMaskSoftmax`); floating: added to
      ``input * scale``, a ``-inf`` entry takes its position out.
    - ``causal=True``: over the last two dims (queries, keys; ``dim`` must be the last), key ``j``
      of query ``i`` takes part only where ``j <= i + causal_offset`` (for queries at the end of a
      KV cache of length S_k, ``causal_offset = S_k - S_q``).

    Masked positions are 0. A row in which no position takes part gives zeros (padded rows do not
    poison the backward with NaN, as in Megatron and ``torch._masked_softmax``), while a row whose
    positions taking part are all -inf is NaN there, as in ``torch.softmax``. The gradient needs
    only the output (masked positions have zero probability); an additive mask that requires grad
    gets one too.
    """
    if (type(input) is torch.Tensor and type(dim) is int and type(_stacklevel) is int and dtype is None
            and mask is None and scale is None and causal is False and type(temperature) is float
            and temperature == 1.0):
        return _forward_call(input, dim, False, 1.0, None)
    return _dropin("softmax", input, dim, _stacklevel, dtype, temperature, False, mask, causal, causal_offset,
                   scale)


def log_softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None, *, temperature: float = 1.0, scale: Optional[float] = None,
                mask: Optional[torch.Tensor] = None, causal: bool = False, causal_offset: int = 0) -> torch.Tensor:
    """log_softmax(input / temperature) along ``dim``: ``torch.log_softmax`` and
    ``torch.nn.functional.log_softmax`` with their call forms, and ``scale``, ``mask``, ``causal``
    as :func:`softmax` takes them: masked positions and rows with no position taking part are
    -inf, and pass no gradient."""
    if (type(input) is torch.Tensor and type(dim) is int and type(_stacklevel) is int and dtype is None
            and mask is None and scale is None and causal is False and type(temperature) is float
            and temperature == 1.0):
        return _forward_call(input, dim, True, 1.0, None)
    return _dropin("log_softmax", input, dim, _stacklevel, dtype, temperature, True, mask, causal, causal_offset,
                   scale)


def softmax_topk(input: torch.Tensor, k: int, dim: int = -1, *, log: bool = False, temperature: float = 1.0,
                 renormalize: bool = False, dtype: Optional[torch.dtype] = None,
                 mask: Optional[torch.Tensor] = None) -> SoftmaxTopK:
    """The k largest entries of softmax(input / temperature) (or log_softmax with ``log=True``).

    Reads the input once and never materializes the softmax: the online (max, sumexp) and a
    per-thread top-k are built in the same pass. Values are sorted descending, ties go to the lower
    index, indices are int64, and k sits at ``dim`` in the outputs as in ``torch.topk``.
    Differentiable with respect to the input (the backward recomputes probabilities from the input
    and the per-row state).

    ``renormalize=True`` divides the k probabilities by their sum (the routing weights of a
    Mixtral-style MoE router: ``softmax(x).topk(k)`` then ``w / w.sum()``); with ``log=True`` it
    gives their log. ``dtype`` is the values' dtype (default the input's): routers keep float32
    weights for bfloat16 logits. Either one recomputes the k values from the k selected logits in
    float32 (float64 for float64), so a float32 result is not a rounded bfloat16 one (for a DTensor,
    from the k values in the input's dtype: gathering its logits would gather the rows).

    ``mask``: a bool tensor that broadcasts to the input, True where a position takes part (as in
    :func:`softmax`). Masked positions count as probability 0 and are never selected: where fewer
    than k positions of a row take part, the rest of its top-k is index -1 with value 0 (-inf with
    ``log``). It costs one pass more than the unmasked call (the masked input is built first).
    """
    op = "softmax_topk"
    checks.tensor(input, "input", op)
    check_input(input, op)
    checks.positive_int(k, "k", op)
    checks.dim_type(dim, op)
    checks.float_dtype(dtype, "dtype", op)
    temperature = checks.real(temperature, "temperature", op)  # its range: the op's own check
    if mask is not None:
        checks.bool_mask(mask, input, op)
        top = softmax_topk(input.masked_fill(~mask, float("-inf")), k, dim, log=log, temperature=temperature,
                           renormalize=renormalize, dtype=dtype)
        taken = mask.expand(input.shape).gather(dim, top.indices)
        return SoftmaxTopK(top.values.masked_fill(~taken, float("-inf") if log else 0.0),
                           top.indices.masked_fill(~taken, -1))
    values, indices, m, d = _ops.softmax_topk(input, k, dim, log, temperature)
    out_dtype = input.dtype if dtype is None else dtype
    if not renormalize and out_dtype == input.dtype:
        return SoftmaxTopK(values, indices)
    acc = torch.promote_types(torch.promote_types(m.dtype, out_dtype), torch.float32)
    if is_dtensor(input):
        # Gathering the k logits of a DTensor split along dim would redistribute (gather) its rows:
        # the k values come from the op, rounded to the input's dtype.
        p = values.to(acc).exp() if log else values.to(acc)
        if renormalize:
            p = p / p.sum(dim, keepdim=True)
        return SoftmaxTopK((p.log() if log else p).to(out_dtype), indices)
    z = input.gather(dim, indices).to(acc)
    if temperature != 1.0:
        z = z / temperature
    if renormalize:
        # The full row's normalizer cancels: the weights are the softmax of the k logits.
        w = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
        return SoftmaxTopK(w.to(out_dtype), indices)
    m, d = m.unsqueeze(dim).to(acc), d.unsqueeze(dim).to(acc)
    exact = (z - m - d.log()) if log else torch.exp(z - m) / d
    # The value from the row's state; the derivatives through the op's own (the state's outputs
    # carry none).
    return SoftmaxTopK(_ValueWithDerivativeOf.apply(exact.detach().to(out_dtype), values), indices)


class _ValueWithDerivativeOf(torch.autograd.Function):
    """``value``, differentiated as ``carrier`` (the same quantity in another dtype): the derivatives
    of every mode go to ``carrier``. Unlike ``value + (carrier - carrier.detach())`` it never makes
    NaN where carrier is infinite (a log-probability of 0)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value, carrier):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.carrier_dtype, ctx.value_dtype = inputs[1].dtype, inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.carrier_dtype)

    @staticmethod
    def jvp(ctx, _value_tangent, carrier_tangent):
        return None if carrier_tangent is None else carrier_tangent.to(ctx.value_dtype)
