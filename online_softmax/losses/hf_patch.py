"""A transformers causal LM whose labelled forward never materializes its logits:
``online_softmax.hf.apply(model)``.

Nothing of a family's forward is copied. Three attributes of the instance are replaced, and
:func:`revert` puts each back exactly:

- ``model.forward``: a wrapper (the original's signature, which generate() and Trainer inspect).
  Without labels it calls the original as it is. With labels it marks the call, runs the original
  and returns its output without logits (a new output of the same class, or the shorter tuple of
  ``return_dict=False``).
- the output head's ``forward`` (``model.get_output_embeddings()``, a ``torch.nn.Linear``): during a
  labelled call it records the hidden states it is given (already sliced by ``logits_to_keep``,
  already scaled by whatever the family does before its head) and returns a tiny probe, P fixed
  values per position, instead of the (..., V) logits. Otherwise it is the head.
- ``model.loss_function`` (transformers' property stores it in ``_loss_function``): the family
  calls it with ``f(probe)``, where ``f`` is whatever the family does to its logits (nothing,
  Gemma 2/3's ``cap * tanh(x / cap)``, Cohere's ``* logit_scale``, Granite's ``/ logits_scaling``).
  ``f`` is modelled as a scale ``s`` and a softcap ``c`` read from the model at apply time; the
  probe shows whether the family did exactly that (checked on the first call per dtype and device),
  so a family doing anything else raises NotImplementedError rather than a wrong loss. The loss is
  then ``linear_cross_entropy(hidden * s, weight, target, bias * s, softcap=c)`` with the targets,
  ``ignore_index`` and ``num_items_in_batch`` of transformers' ``ForCausalLMLoss``.

The replaced attributes are bound methods and callable objects of one ``_Patch`` rather than
closures, so ``copy.deepcopy`` of a patched model gives a patched copy that drives the copy.

Under ``torch.compile`` the recording and the loss run eagerly (``torch.compiler.disable``, a graph
break each): the chunked loss keeps its memory bound, where a traced one would be the whole-logits
composition. ``keep_logits=True`` leaves the head alone: the logits are the family's own, and the
loss is computed from them by :func:`online_softmax.losses.causal_lm_loss` (so any family works).
"""

import contextlib
import functools
import inspect

import torch

from .. import _checks as checks
from .hf import causal_lm_loss, finish_loss, loss_reduction, next_token_targets
from .linear_cross_entropy import loss_and_lse

_OP = "online_softmax.hf.apply"
# Where a labelled forward's output head returns these, per position, in place of the logits. Wide
# enough that a softcap (tanh's curve at +-30 and 90) or any scale moves them visibly.
PROBE = (-30.0, -3.0, -0.5, 0.0, 0.7, 2.0, 25.0, 90.0)
_STATE = "_online_softmax_hf_patch"
_MISSING = object()


def apply(model, *, keep_logits: bool = False):
    """Make ``model(..., labels=labels)`` compute its loss with
    :func:`online_softmax.linear_cross_entropy` from the final hidden states and the output head,
    ``outputs.logits`` None (``keep_logits=True``: the family's logits, at their cost). Forwards
    without labels and ``generate()`` are unchanged. Returns ``model``. Applying twice raises;
    :func:`revert` undoes it."""
    _check_model(model)
    if _STATE in model.__dict__:
        raise checks.fail(_OP, f"it is applied to this {type(model).__name__} already; online_softmax.hf.revert(model) "
                               "first to apply it with other options", RuntimeError)
    if not isinstance(keep_logits, bool):
        raise checks.fail(_OP, f"keep_logits must be a bool, got {type(keep_logits).__name__}", TypeError)
    head = model.get_output_embeddings()
    _check_head(model, head)
    original_loss = model.loss_function
    if not _is_causal_lm_loss(original_loss):
        raise checks.fail(_OP, f"{type(model).__name__}'s loss_function is {_name(original_loss)}, not transformers' "
                               "ForCausalLMLoss: only a causal LM's next-token loss is computed here",
                          NotImplementedError)
    patch = _Patch(model, head, original_loss, keep_logits)
    model.__dict__[_STATE] = patch
    model.forward = patch.forward
    model.loss_function = patch.loss_function
    if not keep_logits:
        head.forward = patch.head_forward
    return model


def revert(model):
    """Undo :func:`apply`: ``model.forward``, the head's ``forward`` and ``model.loss_function``
    are again exactly what they were (attributes that were never set are unset again).

    Where ``model.forward`` was wrapped again after apply (accelerate's mixed precision does so
    under Trainer's ``bf16=True``), that wrapper stays and the wrapper of apply inside it becomes a
    plain call of the original forward: the model computes as it did before apply."""
    op = "online_softmax.hf.revert"
    patch = model.__dict__.get(_STATE) if isinstance(model, torch.nn.Module) else None
    if patch is None:
        raise checks.fail(op, f"online_softmax.hf.apply was not applied to this {type(model).__name__}", RuntimeError)
    replaced = [(model, "_loss_function", patch.loss_function)]
    if not patch.keep_logits:
        replaced.append((patch.head, "forward", patch.head_forward))
    for obj, name, ours in replaced:
        if obj.__dict__.get(name) != ours:
            raise checks.fail(op, f"{type(obj).__name__}.{name} was replaced after online_softmax.hf.apply; put it "
                                  "back before reverting", RuntimeError)
    if model.__dict__.get("forward") is patch.forward:
        replaced.insert(0, (model, "forward", patch.forward))
    else:
        patch.saved.pop(0)
        patch.forward.labelled = None
    for (obj, name, _ours), saved in zip(replaced, patch.saved):
        if saved is _MISSING:
            del obj.__dict__[name]
        else:
            obj.__dict__[name] = saved
    del model.__dict__[_STATE]
    return model


class applied:
    """``with online_softmax.hf.applied(model): ...``: :func:`apply` on entry, :func:`revert` on
    exit (also when the block raises)."""

    def __init__(self, model, *, keep_logits: bool = False):
        self.model, self.keep_logits = model, keep_logits

    def __enter__(self):
        return apply(self.model, keep_logits=self.keep_logits)

    def __exit__(self, *exc):
        revert(self.model)
        return False


def _check_model(model):
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(type(model), "loss_function", None), property):
        raise checks.fail(_OP, f"model must be a transformers PreTrainedModel (with a loss_function), got "
                               f"{type(model).__name__}", TypeError)
    if not callable(getattr(model, "get_output_embeddings", None)):
        raise checks.fail(_OP, f"{type(model).__name__} has no get_output_embeddings()", TypeError)


def _check_head(model, head):
    name = type(model).__name__
    if head is None:
        raise checks.fail(_OP, f"{name} has no output head (get_output_embeddings() is None): it is not a causal LM "
                               "with a vocabulary head", TypeError)
    # Exactly F.linear(hidden, weight, bias): a subclass may compute something else (LoRA, quantized).
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise checks.fail(_OP, f"{name}'s output head is a {type(head).__name__}, not a torch.nn.Linear: its logits "
                               "cannot be computed from its weight and bias alone", NotImplementedError)


def _is_causal_lm_loss(fn) -> bool:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return fn is ForCausalLMLoss or fn is causal_lm_loss


def _name(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _logit_transform(model):
    """(scale, softcap): what the families known here do to the head's logits before the loss."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None:
        logit_scale = getattr(text, "logit_scale", None)
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        scale *= float(logit_scale)  # Cohere
    logits_scaling = getattr(text, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling:
        scale /= float(logits_scaling)  # Granite
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma 2 and 3
    return scale, (float(softcap) if softcap else None)


class _Call:
    """One labelled forward in flight: what the head was given, and whether the loss ran."""

    def __init__(self):
        self.hidden = None
        self.loss_called = False


class _Forward:
    """``model.forward`` while applied; ``inspect.signature`` sees the original's (``__wrapped__``)."""

    def __init__(self, patch, original):
        # None once reverted while wrapped by someone else: a plain call of the original.
        self.labelled, self.original = patch.labelled, original
        functools.update_wrapper(self, original)
        params = list(inspect.signature(original).parameters.values())
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.labels_at = names.index("labels") if "labels" in names else None

    def __call__(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and self.labels_at is not None and len(args) > self.labels_at:
            labels = args[self.labels_at]
        if labels is None or self.labelled is None:
            return self.original(*args, **kwargs)
        return self.labelled(self.original, args, kwargs)


class _Patch:
    def __init__(self, model, head, original_loss, keep_logits):
        self.model, self.head, self.original_loss, self.keep_logits = model, head, original_loss, keep_logits
        self.scale, self.softcap = _logit_transform(model)
        self.family = type(model).__name__
        self.calls = []
        self.checked = set()
        self.probes = {}
        # What apply() replaces, as it was: instance attributes or nothing (the class's).
        self.saved = [model.__dict__.get("forward", _MISSING), model.__dict__.get("_loss_function", _MISSING)]
        if not keep_logits:
            self.saved.append(head.__dict__.get("forward", _MISSING))
        self.head_original = head.forward
        self.forward = _Forward(self, model.forward)

    def labelled(self, original, args, kwargs):
        call = _Call()
        self.calls.append(call)
        try:
            out = original(*args, **kwargs)
        except Exception as e:
            if call.hidden is not None and not call.loss_called:
                raise NotImplementedError(
                    f"{_OP}: {self.family}'s forward failed between its output head and model.loss_function: it "
                    f"uses the logits in a way the probe of {len(PROBE)} values per position cannot stand for "
                    f"(or computes its loss without model.loss_function): {type(e).__name__}: {e}") from e
            raise
        finally:
            self.calls.pop()
        if not call.loss_called:
            raise checks.fail(_OP, f"{self.family}'s forward was given labels but did not call model.loss_function "
                                   "(it computes its loss itself): not supported", NotImplementedError)
        if self.keep_logits:
            return out
        if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...) without the Nones
            return out[:1] + out[2:]
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})

    def head_forward(self, hidden, *args, **kwargs):
        if not self.calls or args or kwargs:
            return self.head_original(hidden, *args, **kwargs)
        return self._record(hidden)

    @torch.compiler.disable
    def _record(self, hidden):
        self.calls[-1].hidden = hidden
        key = (_compute_dtype(hidden.device, self.head.weight.dtype), hidden.device)
        if key not in self.probes:  # made once: a host-to-device copy per step would be a sync on a GPU
            self.probes[key] = torch.tensor(PROBE, dtype=key[0], device=key[1])
        # Contiguous: a family may transform its logits in place.
        return self.probes[key].expand(*hidden.shape[:-1], len(PROBE)).contiguous()

    @torch.compiler.disable
    def loss_function(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        call = self.calls[-1] if self.calls else None
        if call is None:  # called by someone else than the forward: the loss it stands for
            return self.original_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                      ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        call.loss_called = True
        if self.keep_logits:
            return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
        hidden = call.hidden
        if hidden is None:
            raise checks.fail(_OP, f"{self.family}'s forward computed its logits without calling its output head "
                                   f"({type(self.head).__name__}.forward): not supported", NotImplementedError)
        self._check_probe(logits, hidden)
        weight, bias = self.head.weight, self.head.bias
        if vocab_size != weight.shape[0]:
            raise checks.fail(_OP, f"{self.family} passes vocab_size={vocab_size} to its loss but its head has "
                                   f"{weight.shape[0]} rows", ValueError)
        h = hidden.reshape(-1, hidden.shape[-1])
        t = next_token_targets(labels, ignore_index, shift_labels, h.device)
        if t.numel() != h.shape[0]:
            raise checks.fail(_OP, f"the labels give {t.numel()} targets for {h.shape[0]} positions (with "
                                   "logits_to_keep, labels must have the kept length)", ValueError)
        device = h.device.type
        autocast = torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            if autocast:  # what autocast makes of the head's matmul; the loop's out= matmuls are not autocast
                dtype = torch.get_autocast_dtype(device)
                h, weight = h.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            if self.scale != 1.0:
                h = h * self.scale
                bias = None if bias is None else bias * self.scale
            loss, _lse = loss_and_lse(h, weight, t, bias, ignore_index=ignore_index,
                                      reduction=loss_reduction(num_items_in_batch), softcap=self.softcap)
        return finish_loss(loss, h.dtype, num_items_in_batch)

    def _check_probe(self, logits, hidden):
        want_shape = (*hidden.shape[:-1], len(PROBE))
        if not torch.is_tensor(logits) or tuple(logits.shape) != want_shape:
            got = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise checks.fail(_OP, f"{self.family} changes the shape of its logits before its loss (the head's "
                                   f"{list(want_shape)} became {got}): not supported", NotImplementedError)
        key = (logits.dtype, logits.device)
        if key in self.checked:
            return
        x = torch.tensor(PROBE, dtype=logits.dtype).double()
        want = x * self.scale
        if self.softcap is not None:
            want = self.softcap * torch.tanh(want / self.softcap)
        got = logits.reshape(-1, len(PROBE)).detach().double().cpu()
        tol = dict(rtol=1e-5, atol=1e-5) if logits.dtype in (torch.float32, torch.float64) else \
            dict(rtol=2e-2, atol=2e-3)
        if not torch.allclose(got, want.expand_as(got), **tol):
            made = ", ".join(f"{a:g} -> {b:.6g}" for a, b in zip(x.tolist(), got[0].tolist()))
            modelled = f"scale {self.scale:g}" + ("" if self.softcap is None else f", softcap {self.softcap:g}")
            raise checks.fail(_OP, f"{self.family} transforms its head's logits in a way not modelled here "
                                   f"({modelled}): {made}", NotImplementedError)
        self.checked.add(key)


def _compute_dtype(device, dtype):
    """The dtype of the head's F.linear: autocast's where it is on."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype

