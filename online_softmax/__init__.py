"""online_softmax: softmax, log-softmax and fused softmax + top-k computed with the online
normalizer (running max m and normalizer d, merged across threads, chunks and ranks).

Ops live under ``torch.ops.online_softmax``; this package loads them and adds the Python API.
Every public name is importable from here; the modules behind them are grouped by purpose:
``api``, ``modules``, ``state`` and ``streaming`` (softmax as torch has it, the (m, d) state,
streamed chunks), ``distributed`` (vocabulary shards over torch.distributed), ``decoding`` (beam
search, generate()'s processors, sampling), ``losses`` (cross-entropy, linear + cross-entropy,
transformers' causal-LM loss), ``hf`` (transformers: ``generate``, ``apply``/``revert``),
``reference`` (test oracles and unfused peers, never called by the rest), ``ops`` (fake kernels
and autograd) and ``_checks`` (every argument check).
"""

import torch  # noqa: F401  (loads libtorch, which the extension links against)

from ._version import __version__
from ._torch_check import load_extension

_C = load_extension()  # the shared object, which registers the ops; checked against the running torch
from . import ops  # noqa: F401,E402  (fake kernels)
from . import batching  # noqa: F401,E402  (vmap rules)
from .api import SoftmaxTopK, log_softmax, softmax, softmax_topk
from .modules import AttnMaskType, FusedScaleMaskSoftmax, OnlineLogSoftmax, OnlineSoftmax
from .state import SoftmaxState, merge_states, softmax_stats
from .build import build_info
from .cuda_plan import CudaPlan, cuda_plan
from .decoding import (BeamSearchDecoder, BeamSearchOutput, BeamStep, RejectionSample, Sample, TokenLogprobs,
                       beam_search_step, rejection_sample, sample, token_logprobs)
from .losses import (CrossEntropyLoss, LinearCrossEntropyLoss, cross_entropy, distillation_loss,  # noqa: E402
                     linear_cross_entropy, linear_distillation_loss, linear_token_logprobs)
from . import hf  # noqa: E402  (generate, apply, revert; imports transformers lazily)
from ._dtensor import install_rules as _install_dtensor_rules
from .streaming import ArrayChunks, FileChunks, chunk_state, chunked_log_softmax, chunked_softmax, chunked_softmax_topk

__all__ = [
    "softmax",
    "log_softmax",
    "softmax_topk",
    "SoftmaxTopK",
    "softmax_stats",
    "SoftmaxState",
    "merge_states",
    "OnlineSoftmax",
    "OnlineLogSoftmax",
    "FusedScaleMaskSoftmax",
    "AttnMaskType",
    "build_info",
    "cuda_plan",
    "CudaPlan",
    "beam_search_step",
    "BeamStep",
    "BeamSearchDecoder",
    "BeamSearchOutput",
    "sample",
    "Sample",
    "rejection_sample",
    "RejectionSample",
    "token_logprobs",
    "TokenLogprobs",
    "cross_entropy",
    "distillation_loss",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "linear_distillation_loss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "chunked_softmax",
    "chunked_log_softmax",
    "chunked_softmax_topk",
    "chunk_state",
    "ArrayChunks",
    "FileChunks",
]

_install_dtensor_rules()  # the ops' DTensor rules (torch.distributed.tensor is imported by now anyway)
