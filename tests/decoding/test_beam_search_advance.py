"""The beam_search_advance op (beam search's bookkeeping after a step): the device's op (the CPU
kernel; on CUDA the composite) against the composite on the CPU, which is transformers' vectorized
beam search in tensor ops term for term (the decoders' tests check the whole loop against
transformers' generate())."""

import pytest
import torch

from testlib import beam_state, beam_step_inputs

ops = torch.ops.online_softmax
NAMES = ("running", "running_scores", "running_beam_indices", "finished", "finished_scores",
         "finished_beam_indices", "is_finished", "improvable", "beam_idx", "keep_going")


def composite(*args):
    return ops.beam_search_advance.default._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args)


def cpu(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def drive(batch, nb, keep, prompt, max_length, length_penalty, early_stopping, *, dtype=torch.float32,
          stop_prob=0.2, ties=False, seed=0, device="cpu"):
    """Steps until the state says stop (or max_length), the device's op and the CPU composite
    compared at every step; returns the steps run and how many hypotheses finished."""
    state = beam_state(batch, nb, prompt, max_length, dtype=dtype, seed=seed, device=device)
    cur_len = prompt
    while True:
        cand, scores, beams, stopped = beam_step_inputs(state, keep, cur_len, stop_prob=stop_prob, ties=ties,
                                                        seed=seed * 1000 + cur_len)
        args = state + (cand, scores, beams, stopped, cur_len, prompt, length_penalty, early_stopping)
        got, want = ops.beam_search_advance(*args), composite(*cpu(args))
        for name, a, b in zip(NAMES, got, want):
            assert a.device == state[0].device, name
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a.cpu(), b), (name, cur_len, a, b)
        state, cur_len = tuple(got[:8]), cur_len + 1
        if not bool(got[9]):
            return cur_len - prompt, int(got[6].sum())
        assert cur_len < max_length, "keep_going must be False once every candidate hit max_length"


@pytest.mark.parametrize("early_stopping", [0, 1, 2])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_kernel_equals_composite_through_a_search(device, early_stopping, length_penalty):
    steps, finished = drive(3, 4, 8, 5, 20, length_penalty, early_stopping, seed=early_stopping + 7, device=device)
    assert steps >= 1 and finished >= 1


@pytest.mark.parametrize("batch,nb,keep,prompt,max_length", [(1, 1, 2, 1, 4), (2, 3, 9, 4, 11), (5, 2, 4, 0, 30),
                                                             (1, 6, 12, 3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_ties(device, batch, nb, keep, prompt, max_length, dtype):
    for ties in (False, True):
        for stop_prob in (0.0, 0.5, 1.0):
            drive(batch, nb, keep, prompt, max_length, 1.0, 0, dtype=dtype, stop_prob=stop_prob, ties=ties,
                  seed=batch * 31 + nb, device=device)


def test_the_step_records_beams_and_lengths(device):
    """Hand-checked: the parents' flat indices, the length-normalized finished score."""
    state = beam_state(2, 2, 3, 6, device=device)
    cand, scores, beams, stopped = beam_step_inputs(state, 4, 3, stop_prob=0.0, seed=1)
    stopped[1, 0] = True  # entry 1's best candidate ends
    out = cpu(ops.beam_search_advance(*state, cand, scores, beams, stopped, 3, 3, 2.0, 0))
    cand, scores, beams = cpu((cand, scores, beams))
    assert torch.equal(out[8], torch.tensor([0 + beams[0, 0], 0 + beams[0, 1], 2 + beams[1, 1], 2 + beams[1, 2]]))
    assert torch.equal(out[0][1, 0], cand[1, 1]) and out[1][1, 0] == scores[1, 1]
    assert bool(out[6][1, 0]) and not bool(out[6][0].any())
    assert out[4][1, 0] == scores[1, 0] / 1.0 ** 2.0  # one generated token
    assert out[5][1, 0, 0] == 2 + beams[1, 0] and (out[5][1, 0, 1:] == -1).all()


def test_bad_arguments():
    state = beam_state(2, 2, 3, 6)
    cand, scores, beams, stopped = beam_step_inputs(state, 4, 3, seed=1)
    good = state + (cand, scores, beams, stopped, 3, 3, 1.0, 0)

    def call(i, value):
        args = list(good)
        args[i] = value
        return ops.beam_search_advance(*args)

    cases = [(10, beams + 5, ValueError, "candidate_beams must be in"),
             (10, beams.int(), TypeError, "candidate_beams must be Long"),
             (9, scores.double(), TypeError, "candidate_scores must be Float"),
             (8, cand[:, :1], ValueError, "candidates must be"),
             (1, state[1][:, :1], ValueError, "running_scores must have shape"),
             (11, stopped.int(), TypeError, "stopped must be Bool"),
             (12, 6, ValueError, "cur_len must be in"),
             (13, 4, ValueError, "cur_len must be in"),
             (15, 3, ValueError, "early_stopping must be")]
    for i, value, err, match in cases:
        with pytest.raises(err, match=match):
            call(i, value)
        if i != 10 or err is TypeError:  # the composite reaches an out-of-range beam through its own gather
            with pytest.raises(err, match=match):
                composite(*[value if j == i else a for j, a in enumerate(good)])


def test_opcheck_and_compile(device):
    state = beam_state(2, 3, 4, 9, seed=3, device=device)
    cand, scores, beams, stopped = beam_step_inputs(state, 6, 4, seed=3)
    args = state + (cand, scores, beams, stopped, 4, 4, 1.0, 1)
    torch.library.opcheck(ops.beam_search_advance.default, args)
    f = torch.compile(lambda *a: ops.beam_search_advance(*a), fullgraph=True)
    for a, b in zip(f(*args), ops.beam_search_advance(*args)):
        assert torch.equal(a, b)
