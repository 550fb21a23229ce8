"""Test oracles and benchmark peers, apart from the production code, which never calls them.

- :mod:`.textbook`: the textbook softmax algorithms in plain PyTorch (naive, safe, online, block,
  merge of partial states, online top-k), the documentation of the math the kernels implement;
- :mod:`.unfused`: the unfused torch sequences the fused ops replace (beam-search step, sampling);
- :mod:`.speculative`: speculative decoding's verification, as the op's float64 oracle and as the
  torch sequence serving engines write.
"""

from .textbook import *  # noqa: F401,F403
from .textbook import __all__ as _textbook_all
from .speculative import rejection_sample_reference, unfused_rejection_sample
from .unfused import unfused_beam_search_step, unfused_sample

__all__ = list(_textbook_all) + ["unfused_beam_search_step", "unfused_sample", "rejection_sample_reference",
                                  "unfused_rejection_sample"]
