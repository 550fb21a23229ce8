"""softmax_stats / SoftmaxState / merge_states: the partial state (m, d) as an object."""

import pytest
import torch

import online_softmax as osm
from testlib import FLOAT_DTYPES, random_logits


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((5, 1), -1), ((5, 333), -1), ((2, 100001), -1),
                                       ((4, 50, 19), 1), ((30, 4), 0)])
def test_stats_match_float64(device, dtype, shape, dim):
    x = random_logits(shape, dtype, device)
    st = osm.softmax_stats(x, dim)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert st.max.dtype == want_dtype and st.sumexp.dtype == want_dtype
    x64 = x.cpu().double()
    m = x64.amax(dim)
    d = torch.exp(x64 - m.unsqueeze(dim)).sum(dim)
    torch.testing.assert_close(st.max.cpu().double(), m)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(st.sumexp.cpu().double(), d, rtol=rtol, atol=0)
    torch.testing.assert_close(st.logsumexp().cpu().double(), torch.logsumexp(x64, dim), rtol=rtol, atol=1e-6)


def test_stats_temperature(device):
    x = random_logits((3, 500), torch.float32, device)
    st = osm.softmax_stats(x, temperature=0.5)
    torch.testing.assert_close(st.logsumexp(), torch.logsumexp(x / 0.5, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.normalize(x), torch.softmax(x / 0.5, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 7])
def test_chunks_merge_to_the_whole(device, num_chunks):
    x = random_logits((6, 1000), torch.float32, device, scale=10)
    chunks = torch.tensor_split(x, num_chunks, dim=1)
    states = [osm.softmax_stats(c, dim=1) for c in chunks]
    whole = osm.merge_states(states)
    ref = osm.softmax_stats(x, dim=1)
    torch.testing.assert_close(whole.max, ref.max)
    torch.testing.assert_close(whole.sumexp, ref.sumexp, rtol=1e-5, atol=0)
    out = torch.cat([whole.normalize(c) for c in chunks], dim=1)
    torch.testing.assert_close(out, torch.softmax(x, 1), rtol=1e-5, atol=1e-6)
    out = torch.cat([whole.normalize(c, log=True) for c in chunks], dim=1)
    torch.testing.assert_close(out, torch.log_softmax(x, 1), rtol=1e-5, atol=1e-5)
    # Any merge order gives the same state.
    rev = osm.merge_states(states[::-1])
    torch.testing.assert_close(rev.sumexp, whole.sumexp, rtol=1e-6, atol=0)


def test_empty_state_is_the_identity(device):
    x = random_logits((4, 10), torch.float32, device)
    st = osm.softmax_stats(x)
    empty = osm.softmax_stats(torch.empty(4, 0, device=device))
    assert (empty.max == float("-inf")).all() and (empty.sumexp == 0).all()
    for merged in (st.merge(empty), empty.merge(st)):
        assert torch.equal(merged.max, st.max) and torch.equal(merged.sumexp, st.sumexp)
    both = empty.merge(empty)
    assert not torch.isnan(both.sumexp).any() and (both.sumexp == 0).all()
    assert (both.logsumexp() == float("-inf")).all()
    # An all -inf chunk is empty too.
    ninf = osm.softmax_stats(torch.full((4, 7), float("-inf"), device=device))
    assert torch.equal(ninf.merge(st).sumexp, st.sumexp)


def test_special_values_like_torch_logsumexp(device):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.0, 1.0], [-inf, -inf], [inf, 0.0], [nan, 0.0], [-inf, 2.0]], device=device)
    lse = osm.softmax_stats(x).logsumexp()
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), equal_nan=True)


def test_stats_gradient_is_softmax(device):
    x = random_logits((3, 9), torch.float64, device).requires_grad_()
    st = osm.softmax_stats(x, temperature=1.5)
    (g,) = torch.autograd.grad(st.logsumexp().sum(), x)
    torch.testing.assert_close(g, torch.softmax(x / 1.5, -1) / 1.5)
    assert torch.autograd.gradcheck(lambda t: osm.softmax_stats(t).logsumexp(),
                                    (random_logits((2, 6), torch.float64).requires_grad_(),))


def test_bad_arguments():
    x = torch.randn(3, 4)
    st = osm.softmax_stats(x)
    with pytest.raises(ValueError, match="states"):
        osm.merge_states([])
    with pytest.raises(ValueError, match="dim"):
        st.merge(osm.softmax_stats(x.t(), 0).__class__(st.max, st.sumexp, 0))
    with pytest.raises(ValueError, match="shape"):
        st.merge(osm.softmax_stats(torch.randn(5, 4)))
    with pytest.raises(TypeError, match="other"):
        st.merge((st.max, st.sumexp))
    with pytest.raises(ValueError, match="x_chunk"):
        st.normalize(torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        osm.softmax_stats(torch.arange(4))
    with pytest.raises(IndexError, match="dim"):
        osm.softmax_stats(x, 3)


def test_stats_gradient_zero_dim_and_empty():
    x = torch.tensor(1.5, requires_grad=True)
    osm.softmax_stats(x, temperature=2.0).max.backward()
    assert x.grad.item() == 0.5
    x = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(osm.softmax_stats(x).logsumexp(), x)
    assert g.item() == 1.0
    e = torch.zeros(3, 0, requires_grad=True)
    osm.softmax_stats(e, 1).sumexp.sum().backward()
    assert e.grad.shape == (3, 0)
