"""Decoding on the online softmax: the fused beam-search step, a beam-search decoder over any
next-token model, transformers' processors as fused edits, fused sampling, speculative
decoding's verification, and prompt log-probabilities."""

from .beam_search import BeamStep, beam_search_step
from .decoder import BeamSearchDecoder, BeamSearchOutput
from .logprobs import TokenLogprobs, token_logprobs
from .sampling import Sample, sample
from .speculative import RejectionSample, rejection_sample

__all__ = ["beam_search_step", "BeamStep", "BeamSearchDecoder", "BeamSearchOutput", "sample", "Sample",
           "rejection_sample", "RejectionSample", "token_logprobs", "TokenLogprobs"]
