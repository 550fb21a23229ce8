"""Training losses on the online (m, d) state: cross-entropy without the stored log-softmax,
linear + cross-entropy and linear + token log-probabilities (policy gradients) without the logits,
their modules, transformers' causal-LM loss, and knowledge distillation from logits. The vocabulary-parallel form is
``online_softmax.distributed.cross_entropy``."""

from .cross_entropy import cross_entropy
from .distillation import distillation_loss
from .hf import causal_lm_loss
from .linear_cross_entropy import linear_cross_entropy
from .linear_token_logprobs import linear_token_logprobs
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["cross_entropy", "distillation_loss", "linear_cross_entropy", "linear_token_logprobs", "CrossEntropyLoss", "LinearCrossEntropyLoss",
           "causal_lm_loss"]
