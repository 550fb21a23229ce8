"""Decoding on the online softmax: the fused beam-search step, a beam-search decoder over any
next-token model, transformers' processors as fused edits, and fused sampling."""

from .beam_search import BeamStep, beam_search_step
from .decoder import BeamSearchDecoder, BeamSearchOutput
from .sampling import Sample, sample

__all__ = ["beam_search_step", "BeamStep", "BeamSearchDecoder", "BeamSearchOutput", "sample", "Sample"]
