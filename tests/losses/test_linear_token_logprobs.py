"""linear_token_logprobs: the token log-probabilities and entropies of hidden @ weight.T + bias and
the gradients of hidden, weight and bias, against the float64 unfused composition (F.linear +
log_softmax + gather, entropy -sum p log p), at chunk sizes that do not divide the sizes; derivatives,
hostile scales, bad input and peak memory."""

import pytest
import torch
import torch.nn.functional as F

import online_softmax as osm
from testlib import head_peak_rise_mib

V, H = 37, 8


def inputs(dtype, bias=True, seed=0, shape=(2, 13), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(device).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() if bias else None
    t = torch.randint(0, V, shape, generator=g).to(device)
    return h, w, b, t


def unfused(h, w, b, t, temperature=1.0, dtype=torch.float64):
    """(log_probs, entropy) over the whole logits: F.linear in the inputs' dtype (as ours), then
    log_softmax in `dtype`."""
    log_p = torch.log_softmax(F.linear(h, w, b).to(dtype) / temperature, -1)
    p = log_p.exp()
    return log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(p * log_p).sum(-1)


def reference(h, w, b, t, temperature=1.0):
    """The float64 composition of the float64 inputs (gradients flow to h, w, b)."""
    return unfused(h.double(), w.double(), None if b is None else b.double(), t, temperature)


def weights(shape, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64).to(device),
            torch.randn(shape, generator=g, dtype=torch.float64).to(device))


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 26, 1000, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_three_gradients_equal_unfused_float64(chunk_size, temperature, bias):
    h, w, b, t = inputs(torch.float64, bias)
    lp, ent = osm.linear_token_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True,
                                        chunk_size=chunk_size)
    want_lp, want_ent = reference(h, w, b, t, temperature)
    assert lp.dtype == ent.dtype == torch.float64 and lp.shape == ent.shape == t.shape
    torch.testing.assert_close(lp, want_lp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-12)
    params = [p for p in (h, w, b) if p is not None]
    adv, c = weights(t.shape)
    got = torch.autograd.grad((lp * adv).sum() + (ent * c).sum(), params)
    want = torch.autograd.grad((want_lp * adv).sum() + (want_ent * c).sum(), params)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_float64(dtype):
    """float32 and bfloat16 inputs: float32 results; values and gradients no worse than twice torch's
    unfused composition in that dtype, plus a few roundings of the dtype: grad_weight sums the
    chunks in the inputs' dtype (as linear_cross_entropy), one rounding per chunk."""
    h, w, b, t = inputs(dtype, shape=(3, 11), seed=2)
    lp, ent = osm.linear_token_logprobs(h, w, t, bias=b, temperature=0.8, return_entropy=True, chunk_size=4)
    assert lp.dtype == ent.dtype == torch.float32
    want_lp, want_ent = reference(h, w, b, t, 0.8)
    torch_lp, torch_ent = unfused(h, w, b, t, 0.8, dtype=torch.float32)
    adv, c = weights(t.shape)
    params = (h, w, b)
    got = torch.autograd.grad((lp * adv).sum() + (ent * c).sum(), params)
    want = torch.autograd.grad((want_lp * adv).sum() + (want_ent * c).sum(), params)
    torch_g = torch.autograd.grad((torch_lp * adv.float()).sum() + (torch_ent * c.float()).sum(), params)
    for ours, ref, theirs in zip((lp, ent) + got, (want_lp, want_ent) + want, (torch_lp, torch_ent) + torch_g):
        assert ours.dtype == theirs.dtype
        err = (ours.double() - ref).abs().max().item()
        budget = (theirs.double() - ref).abs().max().item() * 2 + 4 * torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= budget, (err, budget)


def test_odd_sizes_and_a_single_token():
    for shape, v, hidden in (((1,), 1, 3), ((5,), 2, 1), ((3, 1, 7), 129, 5)):
        g = torch.Generator().manual_seed(v)
        h = torch.randn(*shape, hidden, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(v, hidden, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, v, shape, generator=g)
        lp, ent = osm.linear_token_logprobs(h, w, t, return_entropy=True, chunk_size=2)
        want_lp, want_ent = reference(h, w, None, t)
        torch.testing.assert_close(lp, want_lp)
        torch.testing.assert_close(ent, want_ent)
        g_ours = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
        for a, r in zip(g_ours, torch.autograd.grad(want_lp.sum() + want_ent.sum(), (h, w))):
            torch.testing.assert_close(a, r)


def test_entropy_alone_and_log_probs_alone_get_their_gradients():
    h, w, b, t = inputs(torch.float64)
    lp, ent = osm.linear_token_logprobs(h, w, t, bias=b, return_entropy=True, chunk_size=5)
    want_lp, want_ent = reference(h, w, b, t)
    for ours, ref in ((ent, want_ent), (lp, want_lp)):
        for a, r in zip(torch.autograd.grad(ours.sum(), (h, w, b), retain_graph=True),
                        torch.autograd.grad(ref.sum(), (h, w, b), retain_graph=True)):
            torch.testing.assert_close(a, r)


def test_gradcheck_and_gradgradcheck_float64():
    h, w, b, t = inputs(torch.float64, shape=(4,), seed=3)

    def fn(h, w, b):
        return osm.linear_token_logprobs(h, w, t, bias=b, temperature=0.9, return_entropy=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (h, w, b))
    assert torch.autograd.gradgradcheck(fn, (h, w, b))


def test_only_some_inputs_need_gradients_and_no_grad_saves_nothing():
    h, w, b, t = inputs(torch.float64)
    w.requires_grad_(False)
    lp = osm.linear_token_logprobs(h, w, t, bias=b, chunk_size=3)
    gh, gb = torch.autograd.grad(lp.sum(), (h, b))
    want = reference(h, w, b, t)[0]
    for a, r in zip((gh, gb), torch.autograd.grad(want.sum(), (h, b))):
        torch.testing.assert_close(a, r)
    with torch.no_grad():
        lp = osm.linear_token_logprobs(h, w, t, bias=b)
    assert lp.grad_fn is None
    torch.testing.assert_close(lp, want.detach())


def test_hostile_scales_keep_their_digits():
    """1e4-scale hidden states (logits in the thousands): the log-probabilities come from each row's
    saved state, so they match the float64 composition of the same float32 logits to float32's
    resolution at that scale, and the gradients stay finite and equal the composition's."""
    g = torch.Generator().manual_seed(4)
    h = (torch.randn(9, H, generator=g, dtype=torch.float64) * 1e4).float().requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.05).float().requires_grad_()
    t = torch.randint(0, V, (9,), generator=g)
    lp, ent = osm.linear_token_logprobs(h, w, t, return_entropy=True, temperature=3.0, chunk_size=4)
    logits = F.linear(h, w).double()  # the same float32 logits, then float64
    log_p = torch.log_softmax(logits / 3.0, -1)
    want_lp = log_p.gather(-1, t[:, None]).squeeze(-1)
    scale = logits.abs().max().item() / 3.0
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=4e-7 * scale)
    p = log_p.exp()
    torch.testing.assert_close(ent.double(), -(p * log_p.masked_fill(p == 0, 0)).sum(-1), rtol=0, atol=4e-7 * scale)
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    r_lp, r_ent = unfused(hd, wd, None, t, 3.0)
    rh, rw = torch.autograd.grad(r_lp.sum() + r_ent.sum(), (hd, wd))
    torch.testing.assert_close(gh.double(), rh, rtol=1e-3, atol=1e-3 * rh.abs().max().item())
    torch.testing.assert_close(gw.double(), rw, rtol=1e-3, atol=1e-3 * rw.abs().max().item())


def test_errors_name_the_argument():
    h, w, b, t = inputs(torch.float32)
    with pytest.raises(ValueError, match="must share H"):
        osm.linear_token_logprobs(h, w[:, :5], t)
    with pytest.raises(ValueError, match="bias must have shape"):
        osm.linear_token_logprobs(h, w, t, bias=b[:4])
    with pytest.raises(TypeError, match="token_ids must be int64"):
        osm.linear_token_logprobs(h, w, t.int())
    with pytest.raises(ValueError, match="token_ids must have hidden's shape"):
        osm.linear_token_logprobs(h, w, t[0])
    for bad in (V, -1):
        with pytest.raises(IndexError, match=rf"token_ids must lie in \[0, {V}\).*got {bad}"):
            osm.linear_token_logprobs(h, w, t.masked_fill(t == t[0, 0], bad))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            osm.linear_token_logprobs(h, w, t, temperature=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        osm.linear_token_logprobs(h, w, t, chunk_size=0)


def test_torch_func_and_meta_use_the_composition():
    h, w, b, t = inputs(torch.float64, shape=(5,))

    def f(h):
        return osm.linear_token_logprobs(h, w.detach(), t, bias=b.detach(), chunk_size=2).sum()

    torch.testing.assert_close(torch.func.grad(f)(h.detach()),
                               torch.autograd.grad(reference(h, w, b, t)[0].sum(), h)[0])
    hm = torch.empty(2, 5, H, device="meta", requires_grad=True)
    wm = torch.empty(V, H, device="meta", requires_grad=True)
    lp, ent = osm.linear_token_logprobs(hm, wm, torch.empty(2, 5, dtype=torch.int64, device="meta"),
                                        return_entropy=True)
    assert lp.device.type == "meta" and lp.shape == ent.shape == (2, 5) and lp.dtype == torch.float32


def test_on_device_against_float64(device):
    h, w, b, t = inputs(torch.float32, device=device, seed=6)
    lp, ent = osm.linear_token_logprobs(h, w, t, bias=b, return_entropy=True, temperature=1.1, chunk_size=7)
    assert lp.device.type == device
    want_lp, want_ent = reference(h, w, b, t, 1.1)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    adv, c = weights(t.shape, device=device)
    got = torch.autograd.grad((lp * adv.float()).sum() + (ent * c.float()).sum(), (h, w, b))
    want = torch.autograd.grad((want_lp * adv).sum() + (want_ent * c).sum(), (h, w, b))
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-4, atol=1e-4)


def test_peak_memory_stays_far_below_the_logits():
    """8192 tokens x hidden 1024 x vocabulary 32000 in float32: the logits would take 1000 MiB. The
    forward and backward together may raise the peak RSS above the inputs, weights and gradients
    by less than 10% of that."""
    rise = head_peak_rise_mib("lp, ent = osm.linear_token_logprobs(h, w, t, return_entropy=True); ((lp * adv).sum() + 0.01 * ent.sum()).backward()")
    logits_mib = 8192 * 32000 * 4 / 2 ** 20
    assert rise < 0.10 * logits_mib, (rise, logits_mib)
