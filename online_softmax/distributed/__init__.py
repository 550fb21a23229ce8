"""The softmax dimension split across ranks of torch.distributed (NCCL on GPUs, Gloo on CPUs).

Two ways in, one merge underneath (``collectives``: each rank's per-row (max, sumexp) state, and
for a top-k its k candidates, gathered in one call and merged locally; never the rows):

- ``process_group``: plain tensors, each rank's shard of the softmax dim and a process group —
  ``softmax``, ``log_softmax``, ``logsumexp``, ``softmax_topk``, ``beam_search_step``,
  ``global_state``, ``communication_bytes``; ``vocab_parallel``: ``cross_entropy``.
- ``dtensor``: DTensors. The ops (``torch.ops.online_softmax.*``) and the Python API
  (``online_softmax.softmax``, ``log_softmax``, ``softmax_topk``, ``softmax_stats``,
  ``cross_entropy``, ``linear_cross_entropy``) take DTensors and return DTensors: a tensor sharded
  along the softmax dimension merges states across its mesh dimension, any other placement runs
  the local op without communication. The rules are installed when this package is imported, and
  by ``import online_softmax`` as soon as torch.distributed.tensor is imported.
"""

from .process_group import (CommStats, beam_search_step, communication_bytes, global_state, log_softmax, logsumexp,
                            softmax, softmax_topk)
from .vocab_parallel import cross_entropy

__all__ = ["softmax", "log_softmax", "logsumexp", "softmax_topk", "beam_search_step", "cross_entropy",
           "global_state", "communication_bytes", "CommStats"]
