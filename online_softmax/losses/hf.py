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
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    x = logits.reshape(-1, vocab_size)
    t = shift_labels.reshape(-1).to(x.device).long()
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # Out of place: the model returns these logits to its caller, who may read them after backward.
    loss, _lse = class_target_loss(x, t, None, ignore_index, reduction, 0.0, 0.0, False)
    loss = loss.to(torch.promote_types(state_dtype(x.dtype), torch.float32))
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
