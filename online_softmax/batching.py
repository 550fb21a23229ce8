"""Batching rules: how each op runs under ``torch.vmap`` (and so under ``jacrev``, ``jacfwd``,
``hessian`` and ``vmap(grad(...))``, which vmap the ops' derivatives).

Every op works on rows along one dim (or on a batch of rows), so a vmapped call is one call of the
op itself on the physical tensor: the vmapped dim moved to the front, the op's dim shifted past
it, unbatched operands expanded (a view) where the op needs every operand batched alike. No op
falls back to PyTorch's per-sample loop. ``beam_search_advance`` keeps state across a whole
batch (its flat beam indices, its one ``keep_going``): vmap raises for it, naming the transform.
"""

import torch

from . import _checks as checks

_LIB = "online_softmax::"


def _front(t, bdim):
    """A batched operand with its vmapped dim first (unbatched: None)."""
    return None if t is None or bdim is None else t.movedim(bdim, 0)


def _batched(t, bdim, size):
    """An operand with the vmapped dim first, expanded to ``size`` where it was not batched."""
    if t is None:
        return None
    if bdim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _row_dim(dim: int, logical_dims: int, op: str) -> int:
    """The op's dim on the physical tensor (the vmapped dim in front); a logical 0-d tensor has
    been given a trailing dim of one."""
    return checks.wrap_dim_of(dim, logical_dims, op) + 1


def _scalar_rows(t, logical_dims):
    """A logical 0-d operand as one row of one element (the ops' 0-d case, batched)."""
    return t.unsqueeze(-1) if t is not None and logical_dims == 0 else t


def _register(name):
    def register(rule):
        # in_dims covers the arguments the call passed: the dispatcher drops trailing defaults.
        torch.library.register_vmap(_LIB + name, lambda info, in_dims, *args: rule(info, in_dims + (None,) * 16,
                                                                                   *args))
        return rule
    return register


@_register("forward")
def _forward_vmap(info, in_dims, x, dim, log=False, temperature=1.0, dtype=None):
    x = _front(x, in_dims[0])
    logical = x.dim() - 1
    out = torch.ops.online_softmax.forward(_scalar_rows(x, logical), _row_dim(dim, logical, "forward"), log,
                                           temperature, dtype)
    return (out.squeeze(-1) if logical == 0 else out), 0


@_register("backward")
def _backward_vmap(info, in_dims, grad_out, out, dim, log=False, temperature=1.0, input_dtype=None):
    grad_out, out = _batched(grad_out, in_dims[0], info.batch_size), _batched(out, in_dims[1], info.batch_size)
    logical = out.dim() - 1
    dx = torch.ops.online_softmax.backward(_scalar_rows(grad_out, logical), _scalar_rows(out, logical),
                                           _row_dim(dim, logical, "backward"), log, temperature, input_dtype)
    return (dx.squeeze(-1) if logical == 0 else dx), 0


@_register("backward_")
def _backward_inplace_vmap(info, in_dims, grad_out, out, dim, log=False, temperature=1.0):
    # Computed out of place on the physical tensors and copied over grad_out: the batched layout
    # need not be the contiguous one the op writes into.
    if in_dims[0] is None:
        raise ValueError("online_softmax.backward_: under vmap, grad_out must be batched to receive every vmapped "
                         "call's gradient in place")
    grad_out = grad_out.movedim(in_dims[0], 0)
    out = _batched(out, in_dims[1], info.batch_size)
    logical = out.dim() - 1
    dx = torch.ops.online_softmax.backward(_scalar_rows(grad_out, logical), _scalar_rows(out, logical),
                                           _row_dim(dim, logical, "backward_"), log, temperature, None)
    grad_out.copy_(dx.squeeze(-1) if logical == 0 else dx)
    return None, None


@_register("masked_forward")
def _masked_forward_vmap(info, in_dims, x, mask=None, causal=False, causal_offset=0, log=False, scale=1.0, dim=-1,
                         dtype=None):
    x = _batched(x, in_dims[0], info.batch_size)
    logical = x.dim() - 1
    if mask is not None and in_dims[1] is not None:
        # A batched mask lines up with x's logical dims from the right, behind the vmapped dim.
        mask = _front(mask, in_dims[1])
        for _ in range(logical - (mask.dim() - 1)):
            mask = mask.unsqueeze(1)
        mask = _scalar_rows(mask, logical)
    elif mask is not None and logical == 0:
        mask = mask.reshape(1)
    out = torch.ops.online_softmax.masked_forward(_scalar_rows(x, logical), mask, causal, causal_offset, log, scale,
                                                  _row_dim(dim, logical, "masked_forward"), dtype)
    return (out.squeeze(-1) if logical == 0 else out), 0


@_register("stats")
def _stats_vmap(info, in_dims, x, dim, temperature=1.0):
    x = _front(x, in_dims[0])
    logical = x.dim() - 1
    m, d = torch.ops.online_softmax.stats(_scalar_rows(x, logical), _row_dim(dim, logical, "stats"), temperature)
    return (m, d), (0, 0)


@_register("softmax_topk")
def _softmax_topk_vmap(info, in_dims, x, k, dim, log=False, temperature=1.0):
    x = _front(x, in_dims[0])
    logical = x.dim() - 1
    values, indices, m, d = torch.ops.online_softmax.softmax_topk(
        _scalar_rows(x, logical), k, _row_dim(dim, logical, "softmax_topk"), log, temperature)
    if logical == 0:
        values, indices = values.squeeze(-1), indices.squeeze(-1)
    return (values, indices, m, d), (0, 0, 0, 0)


@_register("softmax_topk_backward")
def _softmax_topk_backward_vmap(info, in_dims, grad_values, x, indices, max, sumexp, dim, log=False,
                                temperature=1.0):
    size = info.batch_size
    grad_values, x, indices, max, sumexp = (_batched(t, b, size) for t, b in
                                            zip((grad_values, x, indices, max, sumexp), in_dims))
    logical = x.dim() - 1
    dx = torch.ops.online_softmax.softmax_topk_backward(
        _scalar_rows(grad_values, logical), _scalar_rows(x, logical), _scalar_rows(indices, logical), max, sumexp,
        _row_dim(dim, logical, "softmax_topk_backward"), log, temperature)
    return (dx.squeeze(-1) if logical == 0 else dx), 0


def _rows_of(t, bdim, size, rows_dims: int, op: str, name: str):
    """An operand whose leading dim is the op's rows, batched as (size * rows, ...): the rows of
    every vmapped entry one after the other (the ops treat rows independently)."""
    if t is None:
        return None
    t = _batched(t, bdim, size)
    if t.dim() - 1 != rows_dims:
        raise checks.fail(op, f"{name} must have {rows_dims} dims, got shape {list(t.shape[1:])} (under vmap)")
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _unrows(t, size):
    return t.reshape(size, t.shape[0] // size, *t.shape[1:])


@_register("sample_categorical")
def _sample_categorical_vmap(info, in_dims, x, temperature, min_log_ratio, uniforms, edit_ids=None,
                             edit_values=None):
    op, n = "sample_categorical", info.batch_size
    tokens, log_probs = torch.ops.online_softmax.sample_categorical(
        _rows_of(x, in_dims[0], n, 2, op, "x"), _rows_of(temperature, in_dims[1], n, 1, op, "temperature"),
        _rows_of(min_log_ratio, in_dims[2], n, 1, op, "min_log_ratio"),
        _rows_of(uniforms, in_dims[3], n, 2, op, "uniforms"), _rows_of(edit_ids, in_dims[4], n, 2, op, "edit_ids"),
        _rows_of(edit_values, in_dims[5], n, 2, op, "edit_values"))
    return (_unrows(tokens, n), _unrows(log_probs, n)), (0, 0)


@_register("top_p_threshold")
def _top_p_threshold_vmap(info, in_dims, x, temperature, top_p, edit_ids=None, edit_values=None):
    op, n = "top_p_threshold", info.batch_size
    log_ratio, status = torch.ops.online_softmax.top_p_threshold(
        _rows_of(x, in_dims[0], n, 2, op, "x"), _rows_of(temperature, in_dims[1], n, 1, op, "temperature"),
        _rows_of(top_p, in_dims[2], n, 1, op, "top_p"), _rows_of(edit_ids, in_dims[3], n, 2, op, "edit_ids"),
        _rows_of(edit_values, in_dims[4], n, 2, op, "edit_values"))
    return (_unrows(log_ratio, n), _unrows(status, n)), (0, 0)


@_register("rejection_sample")
def _rejection_sample_vmap(info, in_dims, target_logits, draft_token_ids, draft_probs, num_draft_tokens,
                           temperature, min_log_ratio, uniforms):
    op, n = "rejection_sample", info.batch_size
    outs = torch.ops.online_softmax.rejection_sample(
        _rows_of(target_logits, in_dims[0], n, 3, op, "target_logits"),
        _rows_of(draft_token_ids, in_dims[1], n, 2, op, "draft_token_ids"),
        _rows_of(draft_probs, in_dims[2], n, 3, op, "draft_probs"),
        _rows_of(num_draft_tokens, in_dims[3], n, 1, op, "num_draft_tokens"),
        _rows_of(temperature, in_dims[4], n, 1, op, "temperature"),
        _rows_of(min_log_ratio, in_dims[5], n, 2, op, "min_log_ratio"),
        _rows_of(uniforms, in_dims[6], n, 2, op, "uniforms"))
    return tuple(_unrows(t, n) for t in outs), (0, 0, 0)


@_register("token_logprobs")
def _token_logprobs_vmap(info, in_dims, x, token_ids, top_n=0, temperature=1.0, token_values=None):
    op, n = "token_logprobs", info.batch_size
    outs = torch.ops.online_softmax.token_logprobs(
        _rows_of(x, in_dims[0], n, 2, op, "x"), _rows_of(token_ids, in_dims[1], n, 1, op, "token_ids"), top_n,
        temperature, _rows_of(token_values, in_dims[4], n, 1, op, "token_values"))
    return tuple(_unrows(t, n) for t in outs), (0,) * 7


@_register("ngram_banned_tokens")
def _ngram_banned_tokens_vmap(info, in_dims, sequences, n):
    size = info.batch_size
    out = torch.ops.online_softmax.ngram_banned_tokens(
        _rows_of(sequences, in_dims[0], size, 2, "ngram_banned_tokens", "sequences"), n)
    return _unrows(out, size), 0


@_register("beam_search_step")
def _beam_search_step_vmap(info, in_dims, logits, beam_scores, num_beams, num_candidates, temperature=1.0,
                           banned_tokens=None, penalized_tokens=None, repetition_penalty=1.0):
    # The logits' rows are (batch, beam) in order, so the vmapped entries' batches simply follow
    # one another.
    op, n = "beam_search_step", info.batch_size
    scores, token_ids, beam_ids = torch.ops.online_softmax.beam_search_step(
        _rows_of(logits, in_dims[0], n, 2, op, "logits"), _rows_of(beam_scores, in_dims[1], n, 2, op, "beam_scores"),
        num_beams, num_candidates, temperature, _rows_of(banned_tokens, in_dims[5], n, 2, op, "banned_tokens"),
        _rows_of(penalized_tokens, in_dims[6], n, 2, op, "penalized_tokens"), repetition_penalty)
    return (_unrows(scores, n), _unrows(token_ids, n), _unrows(beam_ids, n)), (0, 0, 0)


@_register("beam_search_advance")
def _beam_search_advance_vmap(info, in_dims, *args):
    raise NotImplementedError(
        "online_softmax.beam_search_advance does not support torch.vmap: its state spans the whole batch "
        "(flat beam indices, one keep_going); stack the searches along the batch dim instead")
