"""Test oracles and benchmark peers, apart from the production code, which never calls them.

- :mod:`.textbook`: the textbook softmax algorithms in plain PyTorch (naive, safe, online, block,
  merge of partial states, online top-k), the documentation of the math the kernels implement;
- :mod:`.unfused`: the unfused torch sequences the fused ops replace (beam-search step, sampling);
- :mod:`.speculative`: speculative decoding's verification, as the op's float64 oracle and as the
  torch sequence serving engines write;
- :mod:`.serving`: a serving engine's sampler densely: vLLM's edits over the whole vocabulary, the
  float64 oracle of ``sample``'s log-probability fields, and vLLM's torch sequence;
- :mod:`.distillation`: the distillation losses (KL, reverse KL, generalized JSD, mixed with the
  hard-label cross-entropy) in float64 from both models' whole logits, and a trainer's torch sequence.
"""

from .textbook import *  # noqa: F401,F403
from .textbook import __all__ as _textbook_all
from .distillation import distillation_rows_reference, linear_distillation_reference, \
    unfused_linear_distillation
from .serving import edited_logits, sample_fields_reference, unfused_serving_sample
from .speculative import rejection_sample_reference, unfused_rejection_sample
from .unfused import unfused_beam_search_step, unfused_sample

__all__ = list(_textbook_all) + ["unfused_beam_search_step", "unfused_sample", "rejection_sample_reference",
                                  "unfused_rejection_sample", "edited_logits", "sample_fields_reference",
                                  "unfused_serving_sample", "distillation_rows_reference",
                                  "linear_distillation_reference", "unfused_linear_distillation"]
