"""One mistake, one exception, wherever it is made: TypeError for a value of the wrong type,
ValueError for a value out of range, IndexError for a dim out of range (as torch), each naming
the argument. Every public function that takes the argument is listed here."""

import numpy as np
import pytest
import torch

import online_softmax as osm
import online_softmax.distributed as osd
from testlib import random_logits

X = random_logits((4, 12), torch.float32)
CHUNKS = [X[:, :5], X[:, 5:]]
SCORES = torch.zeros(2, 2)

# name -> callables of one value of that argument (everything else valid)
TAKES = {
    "k": [
        lambda v: osm.softmax_topk(X, v),
        lambda v: osm.chunked_softmax_topk(CHUNKS, v),
        lambda v: osd.softmax_topk(X, v),
    ],
    "num_beams": [
        lambda v: osm.beam_search_step(X, SCORES, v),
        lambda v: osm.BeamSearchDecoder(v, 5),
        lambda v: osd.beam_search_step(X, SCORES, v),
    ],
    "num_candidates": [
        lambda v: osm.beam_search_step(X, SCORES, 2, num_candidates=v),
        lambda v: osd.beam_search_step(X, SCORES, 2, num_candidates=v),
    ],
    "chunk_size": [
        lambda v: osm.ArrayChunks(np.zeros((2, 8), np.float32), v),
    ],
    "num_samples": [
        lambda v: osm.sample(X, num_samples=v),
    ],
    "max_new_tokens": [
        lambda v: osm.BeamSearchDecoder(2, v),
    ],
}

WRONG_TYPE = [2.0, "3", True, None]
OUT_OF_RANGE = [0, -1]


@pytest.mark.parametrize("name", list(TAKES))
@pytest.mark.parametrize("value", WRONG_TYPE, ids=repr)
def test_a_count_of_the_wrong_type_is_a_type_error(name, value):
    if name == "num_candidates" and value is None:
        value = 2.0  # None means the default, 2 * num_beams
    for call in TAKES[name]:
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            call(value)


@pytest.mark.parametrize("name", list(TAKES))
@pytest.mark.parametrize("value", OUT_OF_RANGE)
def test_a_count_out_of_range_is_a_value_error(name, value):
    for call in TAKES[name]:
        with pytest.raises(ValueError, match=name):
            call(value)


TEMPERATURE = [
    lambda t: osm.softmax(X, -1, temperature=t),
    lambda t: osm.log_softmax(X, -1, temperature=t),
    lambda t: osm.softmax_topk(X, 2, temperature=t),
    lambda t: osm.softmax_stats(X, temperature=t),
    lambda t: osm.beam_search_step(X, SCORES, 2, temperature=t),
    lambda t: osm.BeamSearchDecoder(2, 5, temperature=t),
    lambda t: list(osm.chunked_softmax(CHUNKS, temperature=t)),
    lambda t: osm.chunked_softmax_topk(CHUNKS, 2, temperature=t),
    lambda t: osm.token_logprobs(X, torch.zeros(4, dtype=torch.int64), temperature=t),
    lambda t: osm.distillation_loss(X, X.flip(-1), temperature=t),
]


@pytest.mark.parametrize("call", range(len(TEMPERATURE)))
def test_temperature_errors(call):
    fn = TEMPERATURE[call]
    for wrong in ("hot", None, torch.float32):
        with pytest.raises(TypeError, match="temperature must be a number"):
            fn(wrong)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fn(bad)


DIM = [
    lambda d: osm.softmax(X, d),
    lambda d: osm.softmax_topk(X, 2, d),
    lambda d: osm.softmax_stats(X, d),
    lambda d: list(osm.chunked_softmax(CHUNKS, d)),
]


@pytest.mark.parametrize("call", range(len(DIM)))
def test_dim_errors(call):
    fn = DIM[call]
    with pytest.raises(TypeError, match="dim must be an int"):
        fn(1.5)
    with pytest.raises(IndexError, match="dim=5"):
        fn(5)


@pytest.mark.parametrize("value", WRONG_TYPE + [-1], ids=repr)
def test_top_n_may_be_zero_but_must_be_a_nonnegative_int(value):
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError if value != -1 else ValueError, match="top_n must be"):
        osm.token_logprobs(X, ids, top_n=value)
    assert osm.token_logprobs(X, ids, top_n=0).top_token_ids.shape == (4, 0)


def test_messages_name_the_function():
    with pytest.raises(TypeError, match=r"^online_softmax\.softmax_topk: k must be an int"):
        osm.softmax_topk(X, 2.0)
    with pytest.raises(TypeError, match=r"^online_softmax\.distributed\.softmax_topk: k must be an int"):
        osd.softmax_topk(X, 2.0)
    with pytest.raises(ValueError, match=r"^online_softmax\.BeamSearchDecoder: num_beams must be >= 1"):
        osm.BeamSearchDecoder(0, 5)
