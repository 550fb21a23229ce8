"""Fake (meta) kernels for every op in csrc/ops.cpp.

The differentiable ops' autograd is in C++ (csrc/common/*_autograd.cpp: hand-made nodes, which
torch.func transforms accept and which carry forward-mode tangents); their batching rules for vmap
are in batching.py.

Fake kernels give torch.compile the output shapes and dtypes and raise the same exceptions as the
C++ checks (csrc/common/checks.h); the backward formulas call the backward ops, so autograd and
torch.compile only ever see registered ops.
"""

import math

import torch

from . import _checks as checks
from ._checks import reduced_shape, state_dtype, wrap_dim

_ops = torch.ops.online_softmax


# ---- forward / backward ----

@torch.library.register_fake("online_softmax::forward")
def _forward_fake(x, dim, log=False, temperature=1.0, dtype=None):
    if dtype is None:
        checks.floating(x, "x", "forward")
    else:
        checks.float_dtype(dtype, "dtype", "forward")
    wrap_dim(dim, x, "forward")
    checks.temperature(temperature, "forward")
    return x.new_empty(x.shape, dtype=dtype if dtype is not None else x.dtype)


@torch.library.register_fake("online_softmax::backward")
def _backward_fake(grad_out, out, dim, log=False, temperature=1.0, input_dtype=None):
    checks.floating(out, "out", "backward")
    checks.floating(grad_out, "grad_out", "backward")
    if grad_out.shape != out.shape:
        raise ValueError(f"online_softmax.backward: grad_out has shape {list(grad_out.shape)} "
                         f"but out has shape {list(out.shape)}")
    wrap_dim(dim, out, "backward")
    checks.temperature(temperature, "backward")
    return out.new_empty(out.shape, dtype=input_dtype if input_dtype is not None else out.dtype)


@torch.library.register_fake("online_softmax::backward_")
def _backward_inplace_fake(grad_out, out, dim, log=False, temperature=1.0):
    op = "backward_"
    checks.floating(out, "out", op)
    checks.floating(grad_out, "grad_out", op)
    if grad_out.shape != out.shape or grad_out.dtype != out.dtype:
        raise checks.fail(op, f"grad_out ({list(grad_out.shape)}, {grad_out.dtype}) must have out's shape and dtype "
                              f"({list(out.shape)}, {out.dtype})")
    if not (grad_out.is_contiguous() and out.is_contiguous()):
        raise checks.fail(op, "grad_out and out must be contiguous")
    wrap_dim(dim, out, op)
    checks.temperature(temperature, op)


# ---- masked_forward ----

def check_masked_forward(x, mask, causal, dim, scale, dtype, op="masked_forward") -> int:
    """masked_forward's checks (as csrc/common/masked_forward_args.h makes them); returns dim wrapped."""
    checks.tensor(x, "x", op)
    if dtype is None:
        checks.floating(x, "x", op)
    else:
        checks.float_dtype(dtype, "dtype", op)
    d = wrap_dim(dim, x, op)
    if not math.isfinite(scale):
        raise checks.fail(op, f"scale must be finite, got {scale}")
    if causal:
        if x.dim() < 2:
            raise checks.fail(op, f"causal needs x of at least 2 dims (..., queries, keys), got shape {list(x.shape)}")
        if d != x.dim() - 1:
            raise checks.fail(op, "causal masks keys j > i + causal_offset, so the softmax must run over the last "
                                  f"dim (the keys), got dim {dim}")
    if mask is not None:
        checks.tensor(mask, "mask", op)
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise checks.fail(op, "mask must be bool (True takes part) or floating (added to x * scale), got "
                                  f"{mask.dtype}", TypeError)
        checks.mask_layout(mask, x, op, x_name="x")
    return d


@torch.library.register_fake("online_softmax::masked_forward")
def _masked_forward_fake(x, mask=None, causal=False, causal_offset=0, log=False, scale=1.0, dim=-1, dtype=None):
    check_masked_forward(x, mask, causal, dim, scale, dtype)
    return torch.empty_like(x, dtype=x.dtype if dtype is None else dtype, memory_format=torch.contiguous_format)


# ---- stats ----

@torch.library.register_fake("online_softmax::stats")
def _stats_fake(x, dim, temperature=1.0):
    checks.floating(x, "x", "stats")
    dim = wrap_dim(dim, x, "stats")
    checks.temperature(temperature, "stats")
    shape = reduced_shape(x, dim)
    dt = state_dtype(x.dtype)
    return x.new_empty(shape, dtype=dt), x.new_empty(shape, dtype=dt)


# ---- fused softmax + top-k ----

@torch.library.register_fake("online_softmax::softmax_topk")
def _softmax_topk_fake(x, k, dim, log=False, temperature=1.0):
    checks.floating(x, "x", "softmax_topk")
    dim = wrap_dim(dim, x, "softmax_topk")
    checks.temperature(temperature, "softmax_topk")
    size = x.shape[dim] if x.dim() > 0 else 1
    checks.k_in_range(k, size, "softmax_topk")
    vshape = list(x.shape)
    if vshape:
        vshape[dim] = k
    sshape = reduced_shape(x, dim)
    dt = state_dtype(x.dtype)
    return (x.new_empty(vshape), x.new_empty(vshape, dtype=torch.int64),
            x.new_empty(sshape, dtype=dt), x.new_empty(sshape, dtype=dt))


@torch.library.register_fake("online_softmax::softmax_topk_backward")
def _softmax_topk_backward_fake(grad_values, x, indices, max, sumexp, dim, log=False,
                                temperature=1.0):
    checks.floating(x, "x", "softmax_topk_backward")
    wrap_dim(dim, x, "softmax_topk_backward")
    if grad_values.shape != indices.shape:
        raise ValueError("online_softmax.softmax_topk_backward: grad_values has shape "
                         f"{list(grad_values.shape)} but indices has shape {list(indices.shape)}")
    return x.new_empty(x.shape)


# ---- beam-search step ----

@torch.library.register_fake("online_softmax::ngram_banned_tokens")
def _ngram_banned_tokens_fake(sequences, n):
    op = "ngram_banned_tokens"
    if sequences.dtype != torch.int64:
        raise checks.fail(op, f"sequences must be an int64 tensor, got {sequences.dtype}", TypeError)
    if sequences.dim() != 2:
        raise checks.fail(op, f"sequences must be 2-D (rows, length), got shape {list(sequences.shape)}")
    if n < 1:
        raise checks.fail(op, f"n must be >= 1, got {n}")
    return sequences.new_empty((sequences.shape[0], max(sequences.shape[1] - n + 1, 0)))


@torch.library.register_fake("online_softmax::beam_search_advance")
def _beam_search_advance_fake(running, running_scores, running_beam_indices, finished, finished_scores,
                              finished_beam_indices, is_finished, improvable, candidates, candidate_scores,
                              candidate_beams, stopped, cur_len, prompt_len, length_penalty, early_stopping):
    op = "beam_search_advance"
    if running.dim() != 3 or candidates.dim() != 3:
        raise checks.fail(op, "running and candidates must be (batch, beams or keep, max_length)")
    if early_stopping not in (0, 1, 2):
        raise checks.fail(op, f"early_stopping must be 0 (False), 1 (True) or 2 ('never'), got {early_stopping}")
    state = (running, running_scores, running_beam_indices, finished, finished_scores, finished_beam_indices,
             is_finished, improvable)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in state) + (
        running.new_empty((running.shape[0] * running.shape[1],)), is_finished.new_empty(()))


@torch.library.register_fake("online_softmax::beam_search_step")
def _beam_search_step_fake(logits, beam_scores, num_beams, num_candidates, temperature=1.0, banned_tokens=None,
                           penalized_tokens=None, repetition_penalty=1.0):
    op = "beam_search_step"
    checks.floating(logits, "logits", op)
    checks.floating(beam_scores, "beam_scores", op)
    checks.temperature(temperature, op)
    if logits.dim() != 2:
        raise ValueError(f"online_softmax.{op}: logits must be 2-D (batch * num_beams, vocab), got shape "
                         f"{list(logits.shape)}")
    if beam_scores.dim() != 2:
        raise ValueError(f"online_softmax.{op}: beam_scores must be 2-D (batch, num_beams), got shape "
                         f"{list(beam_scores.shape)}")
    if num_beams < 1:
        raise ValueError(f"online_softmax.{op}: num_beams must be >= 1, got {num_beams}")
    if beam_scores.shape[1] != num_beams:
        raise ValueError(f"online_softmax.{op}: beam_scores has {beam_scores.shape[1]} columns but num_beams "
                         f"is {num_beams}")
    batch, vocab = beam_scores.shape[0], logits.shape[1]
    if logits.shape[0] != batch * num_beams:
        raise ValueError(f"online_softmax.{op}: logits has {logits.shape[0]} rows but batch * num_beams is "
                         f"{batch} * {num_beams}")
    if not 1 <= num_candidates <= num_beams * vocab:
        raise ValueError(f"online_softmax.{op}: num_candidates must satisfy 1 <= num_candidates <= num_beams * "
                         f"vocab = {num_beams * vocab}, got {num_candidates}")
    checks.positive_finite(repetition_penalty, "repetition_penalty", op)
    for name, t in (("banned_tokens", banned_tokens), ("penalized_tokens", penalized_tokens)):
        if t is None:
            continue
        if t.dtype != torch.int64:
            raise TypeError(f"online_softmax.{op}: {name} must be an int64 tensor, got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != logits.shape[0]:
            raise ValueError(f"online_softmax.{op}: {name} must be 2-D with one row per logits row "
                             f"({logits.shape[0]}, n), got shape {list(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"online_softmax.{op}: {name} is on {t.device} but logits is on {logits.device}")
    dt = torch.result_type(logits, beam_scores)
    shape = (batch, num_candidates)
    return (logits.new_empty(shape, dtype=dt), logits.new_empty(shape, dtype=torch.int64),
            logits.new_empty(shape, dtype=torch.int64))


# ---- sampling ----

def _check_sample_params(op, x, params):
    checks.floating(x, "x", op)
    if x.dim() != 2:
        raise ValueError(f"online_softmax.{op}: x must be 2-D (rows, vocab), got shape {list(x.shape)}")
    for name, t, dims in params:
        if t is None:
            continue
        if t.dtype != torch.float64:
            raise TypeError(f"online_softmax.{op}: {name} must be a float64 tensor, got {t.dtype}")
        if t.dim() != dims or t.shape[0] != x.shape[0]:
            raise ValueError(f"online_softmax.{op}: {name} must have shape "
                             f"{'(rows,)' if dims == 1 else '(rows, num_samples)'} with rows = {x.shape[0]}")


def _check_sample_edits(op, x, edit_ids, edit_values):
    """The metadata checks of the ops' sparse edits (the values' order and range are checked by the
    kernels' bindings, which can read them)."""
    if (edit_ids is None) != (edit_values is None):
        given, missing = ("edit_ids", "edit_values") if edit_values is None else ("edit_values", "edit_ids")
        raise ValueError(f"online_softmax.{op}: {missing} must be given with {given} (both or neither)")
    if edit_ids is None:
        return
    if edit_ids.dtype != torch.int64:
        raise TypeError(f"online_softmax.{op}: edit_ids must be an int64 tensor, got {edit_ids.dtype}")
    if edit_values.dtype != state_dtype(x.dtype):
        acc = "float64" if state_dtype(x.dtype) == torch.float64 else "float32"
        raise TypeError(f"online_softmax.{op}: edit_values must be {acc} (the accumulation dtype of x), got "
                        f"{edit_values.dtype}")
    if edit_ids.dim() != 2 or edit_ids.shape[0] != x.shape[0]:
        raise ValueError(f"online_softmax.{op}: edit_ids must have shape (rows, num_edits) with rows = "
                         f"{x.shape[0]}, got shape {list(edit_ids.shape)}")
    if edit_values.shape != edit_ids.shape:
        raise ValueError(f"online_softmax.{op}: edit_values must have edit_ids' shape {list(edit_ids.shape)}, "
                         f"got {list(edit_values.shape)}")


@torch.library.register_fake("online_softmax::sample_categorical")
def _sample_categorical_fake(x, temperature, min_log_ratio, uniforms, edit_ids=None, edit_values=None):
    _check_sample_params("sample_categorical", x, (("temperature", temperature, 1),
                                                   ("min_log_ratio", min_log_ratio, 1), ("uniforms", uniforms, 2)))
    _check_sample_edits("sample_categorical", x, edit_ids, edit_values)
    shape = (x.shape[0], uniforms.shape[1])
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=state_dtype(x.dtype))


@torch.library.register_fake("online_softmax::top_p_threshold")
def _top_p_threshold_fake(x, temperature, top_p, edit_ids=None, edit_values=None):
    _check_sample_params("top_p_threshold", x, (("temperature", temperature, 1), ("top_p", top_p, 1)))
    _check_sample_edits("top_p_threshold", x, edit_ids, edit_values)
    return x.new_empty((x.shape[0],), dtype=torch.float64), x.new_empty((x.shape[0],), dtype=torch.int64)


@torch.library.register_fake("online_softmax::rejection_sample")
def _rejection_sample_fake(target_logits, draft_token_ids, draft_probs, num_draft_tokens, temperature,
                           min_log_ratio, uniforms):
    op = "rejection_sample"
    checks.floating(target_logits, "target_logits", op)
    if target_logits.dim() != 3 or target_logits.shape[1] < 1:
        raise checks.fail(op, f"target_logits must be 3-D (batch, n + 1, vocab) with n + 1 >= 1, got shape "
                              f"{list(target_logits.shape)}")
    batch, n1, vocab = target_logits.shape
    expected = (("draft_token_ids", draft_token_ids, torch.int64, (batch, n1 - 1)),
                ("draft_probs", draft_probs, None, (batch, n1 - 1, vocab)),
                ("num_draft_tokens", num_draft_tokens, torch.int64, (batch,)),
                ("temperature", temperature, torch.float64, (batch,)),
                ("min_log_ratio", min_log_ratio, torch.float64, (batch, n1)),
                ("uniforms", uniforms, torch.float64, (batch, n1)))
    for name, t, dtype, shape in expected:
        if t is None:
            continue
        if dtype is not None and t.dtype != dtype:
            raise checks.fail(op, f"{name} must be a {dtype} tensor, got {t.dtype}", TypeError)
        if dtype is None and t.dtype not in (torch.float32, target_logits.dtype):
            raise checks.fail(op, f"draft_probs must be float32 or target_logits' dtype ({target_logits.dtype}), "
                                  f"got {t.dtype}", TypeError)
        if tuple(t.shape) != shape:
            raise checks.fail(op, f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return (target_logits.new_empty((batch, n1), dtype=torch.int64),
            target_logits.new_empty((batch,), dtype=torch.int64),
            target_logits.new_empty((batch, n1), dtype=state_dtype(target_logits.dtype)))


@torch.library.register_fake("online_softmax::token_logprobs")
def _token_logprobs_fake(x, token_ids, top_n=0, temperature=1.0, token_values=None):
    op = "token_logprobs"
    checks.floating(x, "x", op)
    if x.dim() != 2:
        raise checks.fail(op, f"x must be 2-D (rows, vocab), got shape {list(x.shape)}")
    rows, vocab = x.shape
    if token_ids.dtype != torch.int64:
        raise checks.fail(op, f"token_ids must be an int64 tensor, got {token_ids.dtype}", TypeError)
    if tuple(token_ids.shape) != (rows,):
        raise checks.fail(op, f"token_ids must have shape [{rows}] (one token per row of x), got "
                              f"{list(token_ids.shape)}")
    if not 0 <= top_n <= vocab:
        raise checks.fail(op, f"top_n must satisfy 0 <= top_n <= {vocab} (the vocabulary size), got top_n={top_n}")
    acc = state_dtype(x.dtype)
    if token_values is not None:
        if token_values.dtype != acc:
            raise checks.fail(op, f"token_values must be {acc} (the accumulation dtype of x), got "
                                  f"{token_values.dtype}", TypeError)
        if tuple(token_values.shape) != (rows,):
            raise checks.fail(op, f"token_values must have shape [{rows}] (one value per row of x), got "
                                  f"{list(token_values.shape)}")
    per_row = x.new_empty((rows,), dtype=acc)
    return (per_row, x.new_empty((rows,), dtype=torch.int64), x.new_empty((rows, top_n), dtype=torch.int64),
            x.new_empty((rows, top_n), dtype=acc), per_row.new_empty((rows,)), per_row.new_empty((rows,)),
            per_row.new_empty((rows,)))


# ---- cross-entropy ----

_CE_PER_ROW = ("max", "sumexp", "p_scale", "target_scale", "smooth_scale")


def _check_row_gradient(op, x, per_row, ids_name, ids, in_place=False):
    """The checks the elementwise gradient ops (cross_entropy_backward, token_logprobs_backward)
    share: x (rows, classes); per_row: (name, tensor or None) pairs of (rows,) in the accumulation
    dtype; ids: the int64 class or token ids."""
    checks.floating(x, "x", op)
    if x.dim() != 2:
        raise checks.fail(op, f"x must be 2-D (rows, classes), got shape {list(x.shape)}")
    if in_place and not x.is_contiguous():
        raise checks.fail(op, "x must be contiguous to receive its gradient in place")
    acc = state_dtype(x.dtype)
    for name, t in per_row:
        if t is None:
            continue
        if t.dtype != acc:
            raise checks.fail(op, f"{name} must be {acc} (the accumulation dtype of x), got {t.dtype}", TypeError)
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise checks.fail(op, f"{name} must have shape [{x.shape[0]}] (one value per row of x), got "
                                  f"{list(t.shape)}")
    if ids.dtype != torch.int64:
        raise checks.fail(op, f"{ids_name} must be int64, got {ids.dtype}", TypeError)
    if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
        raise checks.fail(op, f"{ids_name} must have shape [{x.shape[0]}], got {list(ids.shape)}")


def _check_cross_entropy_backward(op, x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight):
    _check_row_gradient(op, x, zip(_CE_PER_ROW, (max, sumexp, p_scale, target_scale, smooth_scale)), "target",
                        target)
    acc = state_dtype(x.dtype)
    if weight is not None and (weight.dtype != acc or weight.dim() != 1 or weight.shape[0] != x.shape[1]):
        raise checks.fail(op, f"weight must be {acc} of shape [{x.shape[1]}], got {weight.dtype} {list(weight.shape)}")


@torch.library.register_fake("online_softmax::cross_entropy_backward")
def _cross_entropy_backward_fake(x, max, sumexp, target, p_scale, target_scale, smooth_scale=None, weight=None):
    _check_cross_entropy_backward("cross_entropy_backward", x, max, sumexp, target, p_scale, target_scale,
                                  smooth_scale, weight)
    return x.new_empty(x.shape)


@torch.library.register_fake("online_softmax::cross_entropy_backward_")
def _cross_entropy_backward_inplace_fake(x, max, sumexp, target, p_scale, target_scale, smooth_scale=None,
                                         weight=None):
    op = "cross_entropy_backward_"
    _check_cross_entropy_backward(op, x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight)
    if not x.is_contiguous():
        raise checks.fail(op, "x must be contiguous to receive its gradient in place")


def _cross_entropy_backward_backward(ctx, *grads):
    # Without this registration PyTorch's fallback would return zeros with a warning: say so instead.
    raise NotImplementedError("online_softmax.cross_entropy_backward: double backward (the gradient of this "
                              "gradient op) is not supported; online_softmax.cross_entropy computes second "
                              "derivatives without it (create_graph=True, torch.func)")


torch.library.register_autograd("online_softmax::cross_entropy_backward", _cross_entropy_backward_backward)


# vmap rules of cross_entropy_backward and cross_entropy_backward_, kept beside their fake kernels
# (the other ops' batching rules live in online_softmax/batching.py). The rows are independent, so
# the vmapped dims fold into the rows: x (B, N, C) is called as (B * N, C), each per-row argument
# as (B * N,), an unbatched one expanded first. A batched weight (one per vmapped call) cannot fold
# into the one (C,) weight: those calls run one by one.

def _ce_fold(info, in_dims, args):
    """The arguments with the vmapped dim first and folded into the rows (None where weight is
    batched), and the vmapped size."""
    b = info.batch_size
    x, m, d, target, p_scale, target_scale, smooth, weight = args
    rows, n = x.movedim(in_dims[0], 0).shape[1:] if in_dims[0] is not None else x.shape

    def per_batch(t, dim):
        if t is None:
            return None
        t = t.movedim(dim, 0) if dim is not None else t.expand(b, *t.shape)
        return t.reshape(b * rows, *t.shape[2:])

    folded = [per_batch(t, dim) for t, dim in zip(args[:7], in_dims[:7])]
    return folded, weight, in_dims[7], b, rows, n


def _ce_backward_batched(folded, weight, w_dim, b, rows, n):
    """cross_entropy_backward of the folded arguments, (B, rows, C)."""
    if w_dim is None:
        return _ops.cross_entropy_backward(*folded, weight).view(b, rows, n)
    weights = weight.movedim(w_dim, 0)
    return torch.stack([_ops.cross_entropy_backward(*[t[i * rows:(i + 1) * rows] for t in folded[:6]],
                                                    None if folded[6] is None else
                                                    folded[6][i * rows:(i + 1) * rows], weights[i])
                        for i in range(b)])


@torch.library.register_vmap("online_softmax::cross_entropy_backward")
def _cross_entropy_backward_vmap(info, in_dims, x, max, sumexp, target, p_scale, target_scale, smooth_scale=None,
                                 weight=None):
    folded, w, w_dim, b, rows, n = _ce_fold(info, in_dims, (x, max, sumexp, target, p_scale, target_scale,
                                                             smooth_scale, weight))
    return _ce_backward_batched(folded, w, w_dim, b, rows, n), 0


@torch.library.register_vmap("online_softmax::cross_entropy_backward_")
def _cross_entropy_backward_inplace_vmap(info, in_dims, x, max, sumexp, target, p_scale, target_scale,
                                         smooth_scale=None, weight=None):
    if in_dims[0] is None:
        raise ValueError("online_softmax.cross_entropy_backward_: under vmap, x must be batched to receive "
                         "every vmapped call's gradient in place")
    folded, w, w_dim, b, rows, n = _ce_fold(info, in_dims, (x, max, sumexp, target, p_scale, target_scale,
                                                             smooth_scale, weight))
    x_first = x.movedim(in_dims[0], 0)
    if w_dim is None and x_first.is_contiguous():
        # The folded rows are a view of x itself: the op writes over them.
        _ops.cross_entropy_backward_(x_first.view(b * rows, n), *folded[1:], w)
    else:
        x_first.copy_(_ce_backward_batched(folded, w, w_dim, b, rows, n))
    return None, None


# ---- token_logprobs_backward ----

_TLP_PER_ROW = ("grad_log_probs", "grad_entropy", "max", "sumexp", "entropy")


@torch.library.register_fake("online_softmax::token_logprobs_backward")
def _token_logprobs_backward_fake(grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy, temperature=1.0):
    op = "token_logprobs_backward"
    _check_row_gradient(op, x, zip(_TLP_PER_ROW, (grad_log_probs, grad_entropy, max, sumexp, entropy)), "token_ids",
                        token_ids)
    checks.temperature(temperature, op)
    return x.new_empty(x.shape)


@torch.library.register_fake("online_softmax::token_logprobs_backward_")
def _token_logprobs_backward_inplace_fake(x, grad_log_probs, grad_entropy, token_ids, max, sumexp, entropy,
                                          temperature=1.0):
    op = "token_logprobs_backward_"
    _check_row_gradient(op, x, zip(_TLP_PER_ROW, (grad_log_probs, grad_entropy, max, sumexp, entropy)), "token_ids",
                        token_ids, in_place=True)
    checks.temperature(temperature, op)


# vmap rules of token_logprobs_backward and token_logprobs_backward_: the rows are independent, so
# the vmapped dim folds into the rows (as cross_entropy_backward's), an unbatched argument expanded.

def _tlp_fold(info, in_dims, args):
    """args (x first, then the per-row tensors, None where absent) with the vmapped dim first and
    folded into the rows, and (B, rows, V)."""
    b = info.batch_size
    x = args[0]
    rows, n = x.movedim(in_dims[0], 0).shape[1:] if in_dims[0] is not None else x.shape

    def fold(t, dim):
        if t is None:
            return None
        t = t.movedim(dim, 0) if dim is not None else t.expand(b, *t.shape)
        return t.reshape(b * rows, *t.shape[2:])

    return [fold(t, dim) for t, dim in zip(args, in_dims)], (b, rows, n)


@torch.library.register_vmap("online_softmax::token_logprobs_backward")
def _token_logprobs_backward_vmap(info, in_dims, grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy,
                                  temperature=1.0):
    dims = (in_dims[2], in_dims[0], in_dims[1]) + tuple(in_dims[3:7])
    (x, g, gh, ids, m, d, h), shape = _tlp_fold(info, dims, (x, grad_log_probs, grad_entropy, token_ids, max, sumexp,
                                                             entropy))
    return _ops.token_logprobs_backward(g, gh, x, ids, m, d, h, temperature).view(shape), 0


@torch.library.register_vmap("online_softmax::token_logprobs_backward_")
def _token_logprobs_backward_inplace_vmap(info, in_dims, x, grad_log_probs, grad_entropy, token_ids, max, sumexp,
                                          entropy, temperature=1.0):
    if in_dims[0] is None:
        raise ValueError("online_softmax.token_logprobs_backward_: under vmap, x must be batched to receive "
                         "every vmapped call's gradient in place")
    folded, shape = _tlp_fold(info, in_dims[:7], (x, grad_log_probs, grad_entropy, token_ids, max, sumexp, entropy))
    x_first = x.movedim(in_dims[0], 0)
    if x_first.is_contiguous():
        # The folded rows are a view of x itself: the op writes over them.
        _ops.token_logprobs_backward_(x_first.view(shape[0] * shape[1], shape[2]), *folded[1:], temperature)
    else:
        x_first.copy_(_ops.token_logprobs_backward(folded[1], folded[2], folded[0], *folded[3:], temperature)
                      .view(shape))
    return None, None


# ---- distillation_forward, distillation_backward(_) ----

DISTILLATION_KINDS = ("kl", "reverse_kl", "jsd")
DISTILLATION_STATS = 7  # the columns of distillation_forward's stats (csrc/ops.cpp)


def check_distillation(op, student, teacher, target, kind, beta, temperature, hard_weight, in_place=False,
                       student_name="student", teacher_name="teacher"):
    """The checks of the distillation ops (as csrc/common/op_args.h makes them), also those of the
    public distillation_loss (which names its arguments student_logits, teacher_logits)."""
    checks.floating(student, student_name, op)
    checks.floating(teacher, teacher_name, op)
    if student.dim() != 2:
        raise checks.fail(op, f"{student_name} must be 2-D (rows, vocab), got shape {list(student.shape)}")
    if teacher.dtype != student.dtype:
        raise checks.fail(op, f"{teacher_name} must have the dtype of {student_name} ({student.dtype}), got "
                              f"{teacher.dtype}", TypeError)
    if teacher.shape != student.shape:
        raise checks.fail(op, f"{teacher_name} must have the shape of {student_name} {list(student.shape)}, got "
                              f"{list(teacher.shape)}")
    if in_place and not student.is_contiguous():
        raise checks.fail(op, f"{student_name} must be contiguous to receive its gradient in place")
    check_distillation_options(op, kind, beta, temperature, hard_weight)
    if target is not None:
        if target.dtype != torch.int64:
            raise checks.fail(op, f"target must be int64, got {target.dtype}", TypeError)
        if tuple(target.shape) != (student.shape[0],):
            raise checks.fail(op, f"target must have shape [{student.shape[0]}], got {list(target.shape)}")


def check_distillation_options(op, kind, beta, temperature, hard_weight):
    if not isinstance(kind, str):
        raise checks.fail(op, f"kind must be a str, got {type(kind).__name__}", TypeError)
    if kind not in DISTILLATION_KINDS:
        raise checks.fail(op, f"kind must be one of 'kl', 'reverse_kl', 'jsd', got {kind!r}")
    beta = checks.real(beta, "beta", op)
    if kind == "jsd" and not 0 < beta < 1:
        raise checks.fail(op, f"beta must satisfy 0 < beta < 1 for kind='jsd', got {beta}")
    checks.temperature(temperature, op)
    hard_weight = checks.real(hard_weight, "hard_weight", op)
    if not 0 <= hard_weight <= 1:
        raise checks.fail(op, f"hard_weight must lie in [0, 1], got {hard_weight}")


def _check_distillation_backward(op, grad_loss, student, teacher, target, stats, kind, beta, temperature,
                                 hard_weight, in_place=False):
    check_distillation(op, student, teacher, target, kind, beta, temperature, hard_weight, in_place)
    acc = state_dtype(student.dtype)
    rows = student.shape[0]
    if grad_loss.dtype != acc:
        raise checks.fail(op, f"grad_loss must be {acc} (the accumulation dtype of student), got {grad_loss.dtype}",
                          TypeError)
    if tuple(grad_loss.shape) != (rows,):
        raise checks.fail(op, f"grad_loss must have shape [{rows}] (one value per row of student), got "
                              f"{list(grad_loss.shape)}")
    if stats.dtype != acc:
        raise checks.fail(op, f"stats must be {acc} (the accumulation dtype of student), got {stats.dtype}", TypeError)
    if tuple(stats.shape) != (rows, DISTILLATION_STATS):
        raise checks.fail(op, f"stats must have shape [{rows}, {DISTILLATION_STATS}] (distillation_forward's), got "
                              f"{list(stats.shape)}")


@torch.library.register_fake("online_softmax::distillation_forward")
def _distillation_forward_fake(student, teacher, target=None, kind="kl", beta=0.5, temperature=1.0, hard_weight=0.0,
                               ignore_index=-100):
    check_distillation("distillation_forward", student, teacher, target, kind, beta, temperature, hard_weight)
    acc = state_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, DISTILLATION_STATS), dtype=acc)


@torch.library.register_fake("online_softmax::distillation_backward")
def _distillation_backward_fake(grad_loss, student, teacher, target, stats, kind="kl", beta=0.5, temperature=1.0,
                                hard_weight=0.0, ignore_index=-100):
    _check_distillation_backward("distillation_backward", grad_loss, student, teacher, target, stats, kind, beta,
                                 temperature, hard_weight)
    return student.new_empty(student.shape)


@torch.library.register_fake("online_softmax::distillation_backward_")
def _distillation_backward_inplace_fake(student, grad_loss, teacher, target, stats, kind="kl", beta=0.5,
                                        temperature=1.0, hard_weight=0.0, ignore_index=-100):
    _check_distillation_backward("distillation_backward_", grad_loss, student, teacher, target, stats, kind, beta,
                                 temperature, hard_weight, in_place=True)


def _distillation_forward_backward(ctx, *grads):
    raise NotImplementedError("online_softmax.distillation_forward: the op has no derivative of its own; "
                              "differentiate online_softmax.distillation_loss, whose backward runs "
                              "distillation_backward")


torch.library.register_autograd("online_softmax::distillation_forward", _distillation_forward_backward)


def _distillation_backward_backward(ctx, *grads):
    raise NotImplementedError("online_softmax.distillation_backward: double backward (the gradient of this gradient "
                              "op) is not supported; online_softmax.distillation_loss computes second derivatives "
                              "without it (create_graph=True, torch.func)")


torch.library.register_autograd("online_softmax::distillation_backward", _distillation_backward_backward)


# vmap rules: the rows are independent, so the vmapped dim folds into the rows (_tlp_fold), an
# unbatched argument expanded.

@torch.library.register_vmap("online_softmax::distillation_forward")
def _distillation_forward_vmap(info, in_dims, student, teacher, target=None, kind="kl", beta=0.5, temperature=1.0,
                               hard_weight=0.0, ignore_index=-100):
    (s, t, tgt), (b, rows, _n) = _tlp_fold(info, in_dims[:3], (student, teacher, target))
    loss, stats = _ops.distillation_forward(s, t, tgt, kind, beta, temperature, hard_weight, ignore_index)
    return (loss.view(b, rows), stats.view(b, rows, DISTILLATION_STATS)), (0, 0)


@torch.library.register_vmap("online_softmax::distillation_backward")
def _distillation_backward_vmap(info, in_dims, grad_loss, student, teacher, target, stats, kind="kl", beta=0.5,
                                temperature=1.0, hard_weight=0.0, ignore_index=-100):
    dims = (in_dims[1], in_dims[0], in_dims[2], in_dims[3], in_dims[4])
    (s, g, t, tgt, st), shape = _tlp_fold(info, dims, (student, grad_loss, teacher, target, stats))
    return _ops.distillation_backward(g, s, t, tgt, st, kind, beta, temperature, hard_weight,
                                      ignore_index).view(shape), 0


@torch.library.register_vmap("online_softmax::distillation_backward_")
def _distillation_backward_inplace_vmap(info, in_dims, student, grad_loss, teacher, target, stats, kind="kl", beta=0.5,
                                        temperature=1.0, hard_weight=0.0, ignore_index=-100):
    if in_dims[0] is None:
        raise ValueError("online_softmax.distillation_backward_: under vmap, student must be batched to receive "
                         "every vmapped call's gradient in place")
    (s, g, t, tgt, st), shape = _tlp_fold(info, in_dims[:5], (student, grad_loss, teacher, target, stats))
    options = (kind, beta, temperature, hard_weight, ignore_index)
    s_first = student.movedim(in_dims[0], 0)
    if s_first.is_contiguous():
        # The folded rows are a view of student itself: the op writes over them.
        _ops.distillation_backward_(s_first.view(shape[0] * shape[1], shape[2]), g, t, tgt, st, *options)
    else:
        s_first.copy_(_ops.distillation_backward(g, s, t, tgt, st, *options).view(shape))
    return None, None
