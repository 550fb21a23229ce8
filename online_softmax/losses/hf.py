"""transformers' causal-LM loss on the online state: ``model.loss_function = causal_lm_loss``.

It takes the arguments of transformers' ``ForCausalLMLoss`` (logits, labels, vocab_size,
num_items_in_batch, ignore_index, shift_labels) and returns the same float32 loss. transformers
first copies the logits to float32; here half-precision logits are read as they are, with float32
accumulation, so no second logits-sized tensor exists.
"""

from typing import Optional

import torch

from .._checks import state_dtype
from .cross_entropy import class_target_loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: Optional[torch.Tensor] = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """The next-token loss: each position predicts the following label (``shift_labels`` when
    given), ``ignore_index`` positions skipped; the mean over them, or the sum divided by
    ``num_items_in_batch`` (gradient accumulation), as transformers computes it."""
    x = logits.reshape(-1, vocab_size)
    t = next_token_targets(labels, ignore_index, shift_labels, x.device)
    # Out of place: the model returns these logits to its caller, who may read them after backward.
    loss, _lse = class_target_loss(x, t, None, ignore_index, loss_reduction(num_items_in_batch), 0.0, 0.0, False)
    return finish_loss(loss, x.dtype, num_items_in_batch)


def next_token_targets(labels: torch.Tensor, ignore_index: int, shift_labels: Optional[torch.Tensor],
                       device) -> torch.Tensor:
    """The flat int64 target of every position, as transformers' ForCausalLMLoss takes them:
    ``shift_labels`` when given, else ``labels`` shifted left by one with ``ignore_index`` last."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return shift_labels.reshape(-1).to(device).long()


def loss_reduction(num_items_in_batch) -> str:
    """The mean, or the sum that ``num_items_in_batch`` divides (gradient accumulation)."""
    return "sum" if num_items_in_batch is not None else "mean"


def finish_loss(loss: torch.Tensor, dtype: torch.dtype, num_items_in_batch) -> torch.Tensor:
    """The reduced loss of ``dtype`` logits as transformers returns it: float32 (float64 for
    float64), divided by ``num_items_in_batch`` when given."""
    loss = loss.to(torch.promote_types(state_dtype(dtype), torch.float32))
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
