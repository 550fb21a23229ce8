"""The transformers integration, under one name:

- ``model.generate(..., custom_generate=online_softmax.hf.generate)``: generate()'s decoding loop
  on the fused ops (online_softmax/decoding/hf.py);
- ``online_softmax.hf.apply(model)`` / ``revert(model)`` / ``with applied(model):``: a causal LM
  whose labelled forward computes its loss with ``linear_cross_entropy`` and never materializes
  its logits (online_softmax/losses/hf_patch.py).

transformers is imported only when one of these runs: ``import online_softmax`` never needs it.
"""

from .decoding.hf import generate
from .losses.hf_patch import applied, apply, revert

__all__ = ["generate", "apply", "revert", "applied"]
