"""The CUDA launch plan of a shape, readable on any machine.

``cuda_plan(op, shape, dtype)`` returns what the CUDA launchers would run for that call: each
kernel launch with its grid, block, dynamic shared memory, how many threads share a row, and the
global bytes it reads and writes — a model that counts every byte a kernel loads or stores once.
The plan comes from ``csrc/kernels/launch_plan.h``, the very header the launchers run, compiled into
every build of the extension (CPU-only ones too); nothing here re-implements its rules.

The model's time is ``dram_bytes / hbm_bytes_per_s``: a roofline, not a measurement. ``dram_bytes``
counts a re-read (the split paths read x twice) as served by L2 when the input fits in L2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _C

OPS = ("forward", "stats", "backward", "softmax_topk", "softmax_topk_backward", "sample_categorical",
       "top_p_threshold", "cross_entropy_backward", "masked_forward", "rejection_sample", "token_logprobs",
       "token_logprobs_backward", "distillation_forward", "distillation_backward")
_SAMPLING_OPS = ("sample_categorical", "top_p_threshold")

# Public figures of the SXM parts: SMs, the opt-in shared memory per block, L2, compute capability,
# HBM bandwidth.
PRESETS = {
    "h100": {"sm_count": 132, "max_smem_per_block": 227 * 1024, "l2_bytes": 50 * 2**20, "cc": (9, 0),
             "hbm_bytes_per_s": 3.35e12},
    "h200": {"sm_count": 132, "max_smem_per_block": 227 * 1024, "l2_bytes": 50 * 2**20, "cc": (9, 0),
             "hbm_bytes_per_s": 4.8e12},
    "a100": {"sm_count": 108, "max_smem_per_block": 163 * 1024, "l2_bytes": 40 * 2**20, "cc": (8, 0),
             "hbm_bytes_per_s": 2.039e12},
}

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: int
    block: tuple
    smem: int
    threads_per_row: int
    rows_per_block: int
    bytes_read: int
    bytes_written: int
    bytes_reread: int


@dataclass(frozen=True)
class CudaPlan:
    """What :func:`cuda_plan` returns: the path the CUDA launchers would take for a shape, each
    launch (kernel, grid, block, shared memory, bytes read and written), and the totals a roofline
    model needs (``bytes_read``, ``bytes_written``, ``dram_bytes``, ``roofline_seconds``)."""

    op: str
    shape: tuple
    dtype: torch.dtype
    dim: int
    k: int | None
    device: dict
    path: str
    launches: list = field(default_factory=list)
    workspace_bytes: int = 0
    chunks: int = 1
    chunk: int = 0
    num_samples: int | None = None

    @property
    def bytes_read(self) -> int:
        return sum(launch.bytes_read for launch in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(launch.bytes_written for launch in self.launches)

    @property
    def input_bytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        per = self.dtype.itemsize
        return numel * per * (2 if self.op == "backward" else 1)

    @property
    def dram_bytes(self) -> int:
        """Modelled HBM traffic: a re-read is served by L2 when the input fits in it."""
        reread = sum(launch.bytes_reread for launch in self.launches)
        fits_l2 = self.input_bytes <= self.device.get("l2_bytes", 0)
        return self.bytes_read + self.bytes_written - (reread if fits_l2 else 0)

    @property
    def roofline_seconds(self) -> float | None:
        """dram_bytes at the device's HBM bandwidth (None when the bandwidth is not known)."""
        bw = self.device.get("hbm_bytes_per_s")
        return self.dram_bytes / bw if bw else None

    def summary(self) -> str:
        """One line per launch: kernel, grid x block, shared memory, threads per row, bytes."""
        lines = [f"{self.op} {tuple(self.shape)} {str(self.dtype).replace('torch.', '')} dim={self.dim}"
                 + (f" k={self.k}" if self.k is not None else "")
                 + (f" num_samples={self.num_samples}" if self.num_samples is not None else "") + f": path {self.path}"]
        for launch in self.launches:
            lines.append(f"  {launch.kernel}: grid {launch.grid} x block {launch.block[0]}x{launch.block[1]}, "
                         f"smem {launch.smem} B, {launch.threads_per_row} threads/row, "
                         f"reads {launch.bytes_read / 1e6:.3f} MB, writes {launch.bytes_written / 1e6:.3f} MB")
        t = self.roofline_seconds
        if t is not None:
            lines.append(f"  model: {self.dram_bytes / 1e6:.3f} MB of HBM traffic, {t * 1e6:.2f} us at "
                         f"{self.device['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
        return "\n".join(lines)


def _gpu_limits(index: int) -> dict:
    """The limits of GPU `index`, as torch reports them."""
    props = torch.cuda.get_device_properties(index)
    limits = {"sm_count": props.multi_processor_count,
              "max_smem_per_block": getattr(props, "shared_memory_per_block_optin", 48 * 1024),
              "l2_bytes": getattr(props, "L2_cache_size", 0), "cc": (props.major, props.minor)}
    for name, preset in PRESETS.items():  # a known part: borrow its bandwidth for the model
        if name in props.name.lower():
            limits["hbm_bytes_per_s"] = preset["hbm_bytes_per_s"]
    return limits


def _cuda_device_index(device) -> int | None:
    """The GPU index `device` names ("cuda", "cuda:N" or a torch.device of type cuda; "cuda" is the
    current GPU, as torch means it), or None when it names no GPU."""
    if isinstance(device, str):
        if not device.lower().startswith("cuda"):
            return None
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"online_softmax.cuda_plan: device={device!r} is not a CUDA device name "
                             "('cuda' or 'cuda:N')") from None
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(f"online_softmax.cuda_plan: device={str(device)!r} names a GPU, but torch sees none; pass "
                           f"a preset name {sorted(PRESETS)} or a dict of limits instead")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"online_softmax.cuda_plan: device={str(device)!r} but torch sees "
                         f"{torch.cuda.device_count()} GPU(s)")
    return index


def _device_limits(device) -> dict:
    if device is None:
        return _gpu_limits(torch.cuda.current_device()) if torch.cuda.is_available() else dict(PRESETS["h100"])
    index = _cuda_device_index(device)
    if index is not None:
        return _gpu_limits(index)
    if isinstance(device, str):
        if device.lower() not in PRESETS:
            raise ValueError(f"online_softmax.cuda_plan: device preset {device!r} is not one of {sorted(PRESETS)}")
        return dict(PRESETS[device.lower()])
    if isinstance(device, dict):
        missing = [key for key in ("sm_count", "max_smem_per_block", "l2_bytes", "cc") if key not in device]
        if missing:
            raise ValueError(f"online_softmax.cuda_plan: device dict lacks {missing}")
        for key in ("sm_count", "max_smem_per_block"):
            if not isinstance(device[key], int) or device[key] < 1:
                raise ValueError(f"online_softmax.cuda_plan: device[{key!r}] must be a positive int, got {device[key]!r}")
        return dict(device)
    raise TypeError("online_softmax.cuda_plan: device must be None, 'cuda', 'cuda:N', a torch.device, a preset name "
                    f"or a dict, got {type(device).__name__}")


def cuda_plan(op: str, shape, dtype: torch.dtype = torch.float32, dim: int = -1, *, k: int | None = None,
              device=None, out_dtype: torch.dtype | None = None, num_samples: int | None = None,
              min_log_ratio: bool = False, smooth_scale: bool = False, weight: bool = False,
              mask_shape=None, mask_dtype: torch.dtype = torch.bool,
              draft_dtype: torch.dtype | None = None, token_values: bool = False,
              grad_entropy: bool = False, num_edits: int = 0, target: bool = False,
              kind: str = "kl") -> CudaPlan:
    """The launch plan the CUDA kernels would run for ``op`` on a contiguous tensor of ``shape``.

    op: one of ``OPS``. ``dtype`` is the input's (for backward: the forward output's); ``out_dtype``
    is forward's ``dtype=`` cast (float32 output of float16/bfloat16 input) or backward's
    ``input_dtype``. ``k`` is required for the top-k ops. The sampling ops take x of shape (rows,
    vocab) along its last dim; ``num_samples`` (default 1) is sample_categorical's draws per row and
    ``min_log_ratio`` whether the call passes a cut (min-p, top-p). cross_entropy_backward takes x of
    shape (rows, classes) along its last dim; ``smooth_scale`` and ``weight`` say whether the call passes
    them (they add to the bytes read, not to the launches). token_logprobs_backward takes x of shape
    (rows, vocab) along its last dim; ``grad_entropy`` says whether the call passes it (it and the
    entropy add to the bytes read). masked_forward runs over ``dim`` moved
    last; ``mask_shape`` (the mask as stored, before broadcasting; None for no mask) and
    ``mask_dtype`` (bool, or floating: read in the accumulation dtype) add the mask's bytes to the
    bytes read (causal masking reads nothing). rejection_sample takes ``shape`` = target_logits' (batch,
    n + 1, vocab), along its last dim; ``min_log_ratio`` says whether the call passes the cuts (a max
    pass first: the target rows are read twice) and ``draft_dtype`` is draft_probs' dtype (float32 or
    ``dtype``), None for a call without them (one-hot drafts); its bytes assume every row verifies all
    n drafts and ends in a rejection, the most a call reads. token_logprobs takes x of shape (rows,
    vocab) along its last dim, ``k`` its top_n (default 0) and ``token_values`` whether the call passes
    them (read instead of the token's logit). distillation_forward and distillation_backward take the
    student's shape (rows, vocab) along its last dim (the teacher has the same), ``target`` whether
    the call passes hard labels and ``kind`` the divergence ("jsd" reads the rows twice). ``num_edits`` is the width of the sampling ops'
    edit_ids (their sparse logit edits, read with x; 0 without). ``device`` is a preset name ("h100",
    "h200", "a100"), a dict of limits (sm_count, max_smem_per_block, l2_bytes, cc; optional
    hbm_bytes_per_s), "cuda" (the current GPU), "cuda:N" or a torch.device of a GPU, or None: the
    current GPU, else h100.
    """
    if op not in OPS:
        raise ValueError(f"online_softmax.cuda_plan: op must be one of {OPS}, got {op!r}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"online_softmax.cuda_plan: dtype must be a floating dtype, got {dtype}")
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"online_softmax.cuda_plan: shape {shape} has a negative size")
    view = shape if shape else (1,)  # a 0-d tensor is one row of one element
    if not -len(view) <= dim < len(view):
        raise IndexError(f"online_softmax.cuda_plan: dim={dim} is out of range for shape {shape}")
    d = dim % len(view)
    outer = 1
    for s in view[:d]:
        outer *= s
    inner = 1
    for s in view[d + 1:]:
        inner *= s
    size = view[d]
    limits = _device_limits(device)
    topk = op.startswith("softmax_topk")
    mask_bytes = 0
    if op == "masked_forward":
        outer, inner = outer * inner, 1  # the binding moves the softmax dim last
        if mask_shape is not None:
            numel = 1
            for s in mask_shape:
                numel *= int(s)
            mask_bytes = numel * (1 if mask_dtype == torch.bool else (8 if dtype == torch.float64 else 4))
    elif mask_shape is not None:
        raise ValueError(f"online_softmax.cuda_plan: mask_shape is only for masked_forward, not {op!r}")
    if topk:
        if k is None:
            raise ValueError(f"online_softmax.cuda_plan: op {op!r} needs k")
        if not 0 <= k <= size:
            raise ValueError(f"online_softmax.cuda_plan: k={k} must lie in [0, {size}] (the size of dim {dim})")
        # The binding moves the softmax dim last: rows of `size` contiguous elements.
        outer, inner = outer * inner, 1
    elif op == "token_logprobs":
        if len(shape) != 2 or d != 1:
            raise ValueError(f"online_softmax.cuda_plan: {op} works along the last dim of a 2-D x (rows, vocab), got "
                             f"shape {shape} and dim={dim}")
        k = 0 if k is None else k
        if not 0 <= k <= size:
            raise ValueError(f"online_softmax.cuda_plan: k={k} (top_n) must lie in [0, {size}] (the vocabulary size)")
        if out_dtype is not None:
            raise ValueError(f"online_softmax.cuda_plan: {op} writes the accumulation dtype, got out_dtype={out_dtype}")
    elif k is not None:
        raise ValueError(f"online_softmax.cuda_plan: k is only for the top-k ops and token_logprobs, not {op!r}")
    if token_values and op != "token_logprobs":
        raise ValueError(f"online_softmax.cuda_plan: token_values is only for token_logprobs, not {op!r}")
    if op in _SAMPLING_OPS:
        if len(shape) != 2 or d != 1:
            raise ValueError(f"online_softmax.cuda_plan: {op} draws along the last dim of a 2-D x (rows, vocab), got "
                             f"shape {shape} and dim={dim}")
        if shape[1] == 0 and shape[0] > 0:
            raise ValueError(f"online_softmax.cuda_plan: {op} needs x with at least one column to draw from, got "
                             f"shape {shape}")
    if not isinstance(num_edits, int) or isinstance(num_edits, bool) or num_edits < 0:
        raise ValueError(f"online_softmax.cuda_plan: num_edits must be an int >= 0, got {num_edits!r}")
    if num_edits and op not in _SAMPLING_OPS:
        raise ValueError(f"online_softmax.cuda_plan: num_edits is only for {_SAMPLING_OPS}, not {op!r}")
    if op == "sample_categorical":
        num_samples = 1 if num_samples is None else num_samples
        if not isinstance(num_samples, int) or isinstance(num_samples, bool):
            raise TypeError(f"online_softmax.cuda_plan: num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 0:
            raise ValueError(f"online_softmax.cuda_plan: num_samples={num_samples} must be >= 0")
    elif num_samples is not None or (min_log_ratio and op != "rejection_sample"):
        raise ValueError(f"online_softmax.cuda_plan: num_samples is only for sample_categorical, and min_log_ratio "
                         f"only for sample_categorical and rejection_sample, not {op!r}")
    if op == "rejection_sample":
        if len(shape) != 3 or d != 2 or shape[1] < 1:
            raise ValueError(f"online_softmax.cuda_plan: {op} takes target_logits' shape (batch, n + 1, vocab) with "
                             f"n + 1 >= 1, along its last dim, got shape {shape} and dim={dim}")
        if shape[2] == 0 and shape[0] > 0:
            raise ValueError(f"online_softmax.cuda_plan: {op} needs at least one vocabulary entry, got shape {shape}")
        if draft_dtype is not None and draft_dtype not in (torch.float32, dtype):
            raise TypeError(f"online_softmax.cuda_plan: draft_dtype must be float32 or dtype ({dtype}), got "
                            f"{draft_dtype}")
        if out_dtype is not None:
            raise ValueError(f"online_softmax.cuda_plan: {op} writes its log-probabilities in the accumulation dtype, "
                             f"got out_dtype={out_dtype}")
    elif draft_dtype is not None:
        raise ValueError(f"online_softmax.cuda_plan: draft_dtype is only for rejection_sample, not {op!r}")
    if op in ("cross_entropy_backward", "token_logprobs_backward"):
        if len(shape) != 2 or d != 1:
            raise ValueError(f"online_softmax.cuda_plan: {op} works along the last dim of a 2-D x (rows, classes), "
                             f"got shape {shape} and dim={dim}")
        if out_dtype is not None and out_dtype != dtype:
            raise ValueError(f"online_softmax.cuda_plan: {op} writes x's dtype, got out_dtype={out_dtype}")
    elif smooth_scale or weight:
        raise ValueError(f"online_softmax.cuda_plan: smooth_scale and weight are only for cross_entropy_backward, "
                         f"not {op!r}")
    if op in ("distillation_forward", "distillation_backward"):
        if len(shape) != 2 or d != 1:
            raise ValueError(f"online_softmax.cuda_plan: {op} works along the last dim of a 2-D student (rows, vocab), "
                             f"got shape {shape} and dim={dim}")
        if kind not in ("kl", "reverse_kl", "jsd"):
            raise ValueError(f"online_softmax.cuda_plan: kind must be one of 'kl', 'reverse_kl', 'jsd', got {kind!r}")
        if out_dtype is not None and out_dtype != dtype:
            raise ValueError(f"online_softmax.cuda_plan: {op} writes student's dtype or the accumulation dtype, got "
                             f"out_dtype={out_dtype}")
    elif target or kind != "kl":
        raise ValueError(f"online_softmax.cuda_plan: target and kind are only for the distillation ops, not {op!r}")
    if grad_entropy and op != "token_logprobs_backward":
        raise ValueError(f"online_softmax.cuda_plan: grad_entropy is only for token_logprobs_backward, not {op!r}")
    out = out_dtype or dtype
    acc = 8 if dtype == torch.float64 else 4
    cc = limits["cc"]
    cc_int = cc[0] * 10 + cc[1] if isinstance(cc, tuple) else int(cc)
    # The two trailing flags only where they matter, so the other ops plan with an extension built
    # before they existed.
    extra = (bool(smooth_scale), bool(weight)) if op == "cross_entropy_backward" else ()
    if op == "token_logprobs_backward":  # the smooth flag's slot carries grad_entropy
        extra = (bool(grad_entropy), False)
    jsd = op == "distillation_forward" and kind == "jsd"  # carried by the min_log_ratio slot
    if op in ("distillation_forward", "distillation_backward"):  # the smooth flag's slot carries target
        extra = (bool(target), False)
    if op == "masked_forward":
        extra = (False, False, mask_bytes)
    if op == "rejection_sample":  # rows of the batch, each with n + 1 target positions
        outer = shape[0]
        extra = (False, False, 0, shape[1], draft_dtype.itemsize if draft_dtype is not None else 0)
    if num_edits:
        extra = (False, False, 0, 1, 0, num_edits)
    raw = _C._cuda_plan(op, outer, size, inner, dtype.itemsize, out.itemsize, acc, k or 0, num_samples or 0,
                        bool(min_log_ratio or token_values or jsd), limits["sm_count"], limits["max_smem_per_block"], int(limits["l2_bytes"]),
                        cc_int, *extra)
    if topk and k == 0:  # nothing to select: the binding writes zeros / empty results, no launch
        raw = {"path": "nothing", "launches": [], "workspace_bytes": 0, "chunks": 1, "chunk": 0}
    return CudaPlan(op=op, shape=shape, dtype=dtype, dim=dim, k=k, device=limits, path=raw["path"],
                    launches=[Launch(**launch) for launch in raw["launches"]],
                    workspace_bytes=raw["workspace_bytes"], chunks=raw["chunks"], chunk=raw["chunk"],
                    num_samples=num_samples)
