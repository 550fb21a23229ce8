"""linear_cross_entropy: the loss and the gradients of hidden, weight and bias against the unfused
F.linear + cross-entropy, at chunk sizes that do not divide the sizes; and its peak memory."""

import sys

import pytest
import torch
import torch.nn.functional as F

import online_softmax as osm
from online_softmax.losses import cross_entropy
from testlib import head_peak_rise_mib

V, H = 37, 8


def inputs(dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(2, 13, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (2, 13), generator=g)
    t[0, 3] = -100
    t[1, 7] = -100
    return h, w, b, t


def unfused(h, w, b, t, class_weight=None, **kw):
    logits = F.linear(h, w, b)
    return cross_entropy(logits.movedim(-1, 1), t, class_weight, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 26, 1000, None])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
                                     dict(weighted=True, label_smoothing=0.2)])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_three_gradients_equal_unfused(reduction, chunk_size, options, bias):
    opts = dict(options)
    cw = torch.rand(V, dtype=torch.float64) + 0.1 if opts.pop("weighted", False) else None
    h, w, b, t = inputs(torch.float64, bias)
    got = osm.linear_cross_entropy(h, w, t, b, class_weight=cw, reduction=reduction, chunk_size=chunk_size, **opts)
    want = unfused(h, w, b, t, cw, reduction=reduction, **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [p for p in (h, w, b) if p is not None]
    g_out = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad((got * g_out).sum(), params)
    for a, c in zip(got_grads, torch.autograd.grad((want * g_out).sum(), params)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_like_linear_then_cross_entropy(dtype):
    h, w, b, t = inputs(dtype)
    got = osm.linear_cross_entropy(h, w, t, b, chunk_size=4)
    want = unfused(h, w, b, t)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for a, c in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), c.float(), rtol=tol, atol=tol)


def test_only_some_inputs_need_gradients_and_lse():
    h, w, b, t = inputs(torch.float64)
    w.requires_grad_(False)
    loss, lse = osm.linear_cross_entropy(h, w, t, b, chunk_size=3, return_lse=True)
    gh, gb = torch.autograd.grad(loss, (h, b))
    wh, wb = torch.autograd.grad(unfused(h, w, b, t), (h, b))
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gb, wb)
    torch.testing.assert_close(lse, torch.logsumexp(F.linear(h, w, b), -1))
    with torch.no_grad():
        torch.testing.assert_close(osm.linear_cross_entropy(h, w, t, b), unfused(h, w, b, t))


def test_module_with_a_tied_weight():
    emb = torch.nn.Embedding(V, H, dtype=torch.float64)
    head = osm.LinearCrossEntropyLoss(H, V, weight=emb.weight, chunk_size=6)
    h, _w, _b, t = inputs(torch.float64, bias=False)
    loss = head(h, t)
    loss.backward()
    ref_w = emb.weight.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(h.detach(), ref_w).movedim(-1, 1), t).backward()
    torch.testing.assert_close(emb.weight.grad, ref_w.grad)


def test_errors_name_the_argument():
    h, w, b, t = inputs(torch.float32)
    with pytest.raises(ValueError, match="must share H"):
        osm.linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(ValueError, match="bias must have shape"):
        osm.linear_cross_entropy(h, w, t, b[:4])
    with pytest.raises(TypeError, match="class indices"):
        osm.linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="target must have hidden's shape"):
        osm.linear_cross_entropy(h, w, t[0])
    with pytest.raises(IndexError, match="Target 40 is out of bounds"):
        osm.linear_cross_entropy(h, w, t.masked_fill(t == -100, 40))
    with pytest.raises(ValueError, match="chunk_size"):
        osm.linear_cross_entropy(h, w, t, chunk_size=0)


def test_peak_memory_stays_far_below_the_logits():
    """8192 tokens x hidden 1024 x vocabulary 32000 in float32: the logits would take 1000 MiB. The
    forward and backward together may raise the peak RSS above the inputs, weights and gradients
    by less than 10% of that."""
    rise = head_peak_rise_mib("osm.linear_cross_entropy(h, w, t).backward()")
    logits_mib = 8192 * 32000 * 4 / 2 ** 20
    assert rise < 0.10 * logits_mib, (rise, logits_mib)


# ---- numerics, derivatives, transforms, cost, meta, export, devices ----

def torch_unfused(h, w, b, t, **kw):
    return F.cross_entropy(F.linear(h, w, b).movedim(-1, 1), t, **kw)


def test_large_logits_do_not_cancel():
    """A bias of 1e4 puts every logit near 1e4: the loss and the gradients are the float32
    composition's (through a rounded lse they lost 4.7e-4 per row)."""
    h, w, b, t = inputs(torch.float32)
    b = (b.detach() + 1e4).requires_grad_()
    for kw in (dict(), dict(label_smoothing=0.1)):
        got = osm.linear_cross_entropy(h, w, t, b, chunk_size=5, **kw)
        want = F.cross_entropy(F.linear(h, w, b).flatten(0, 1), t.flatten(), **kw)
        ref = F.cross_entropy(F.linear(h.double(), w.double(), b.double()).flatten(0, 1), t.flatten(), **kw)
        assert abs(float(got) - float(ref)) <= max(2 * abs(float(want) - float(ref)), 2e-6)
        for a, c in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_equals_the_composition(reduction):
    """create_graph=True: the gradient is differentiable, with the loss's own Hessian."""
    h, w, b, t = inputs(torch.float64)
    up = torch.rand(2, 13, dtype=torch.float64) if reduction == "none" else torch.tensor(0.8, dtype=torch.float64)

    def penalty(fn):
        loss = fn(h, w, b, t, reduction=reduction)
        gs = torch.autograd.grad(loss, (h, w, b), up, create_graph=True)
        return gs + torch.autograd.grad(sum((g * g).sum() for g in gs), (h, w, b))

    def ours(hh, ww, bb, tt, **kw):
        return osm.linear_cross_entropy(hh, ww, tt, bb, chunk_size=5, label_smoothing=0.1, **kw)

    def composed(hh, ww, bb, tt, **kw):
        return torch_unfused(hh, ww, bb, tt, label_smoothing=0.1, **kw)

    for a, c in zip(penalty(ours), penalty(composed)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_torch_func_grad_vjp_jacrev_and_vmap():
    from torch.func import grad, jacrev, vjp, vmap

    h, w, b, t = inputs(torch.float64)
    h, w, b = h.detach(), w.detach(), b.detach()

    def ours(hh, ww):
        return osm.linear_cross_entropy(hh, ww, t, b, chunk_size=5)

    def ref(hh, ww):
        return torch_unfused(hh, ww, b, t)

    for a, c in zip(grad(ours, argnums=(0, 1))(h, w), grad(ref, argnums=(0, 1))(h, w)):
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(jacrev(ours)(h, w), jacrev(ref)(h, w))
    _, f = vjp(ours, h, w)
    _, r = vjp(ref, h, w)
    for a, c in zip(f(torch.tensor(1.5, dtype=torch.float64)), r(torch.tensor(1.5, dtype=torch.float64))):
        torch.testing.assert_close(a, c)
    hs = torch.randn(3, 2, 13, H, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda x: ours(x, w))(hs), vmap(lambda x: ref(x, w))(hs))
    bad = t.masked_fill(t == -100, V)
    with pytest.raises(IndexError, match=f"Target {V} is out of bounds"):
        vmap(lambda x: osm.linear_cross_entropy(x, w, bad))(hs)
    torch.testing.assert_close(torch.func.hessian(lambda x: osm.linear_cross_entropy(x, w, t[0, :3], b))(h[0, :3]),
                               torch.func.hessian(lambda x: torch_unfused(x, w, b, t[0, :3]))(h[0, :3]))


def test_no_gradient_is_computed_without_grad_mode(monkeypatch):
    """Under no_grad and inference_mode the forward computes the loss only (it computed every
    gradient when the weight required grad)."""
    lce = sys.modules["online_softmax.losses.linear_cross_entropy"]
    calls = []
    real = lce.row_grad
    monkeypatch.setattr(lce, "row_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, b, t = inputs(torch.float32)
    want = unfused(h.detach(), w.detach(), b.detach(), t)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = osm.linear_cross_entropy(h, w, t, b, chunk_size=5)
        torch.testing.assert_close(got, want)
        assert calls == [] and not got.requires_grad
    osm.linear_cross_entropy(h, w, t, b, chunk_size=5)
    assert calls  # with grad mode on it does


def test_meta_tensors():
    h = torch.empty(2, 5, H, device="meta", requires_grad=True)
    w = torch.empty(V, H, device="meta", requires_grad=True)
    t = torch.empty(2, 5, dtype=torch.int64, device="meta")
    for reduction, shape in (("mean", ()), ("none", (2, 5))):
        loss, lse = osm.linear_cross_entropy(h, w, t, reduction=reduction, return_lse=True)
        assert loss.device.type == "meta" and loss.shape == shape and lse.shape == (2, 5)
    loss = osm.linear_cross_entropy(h, w, t)
    loss.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    module = osm.LinearCrossEntropyLoss(H, V, bias=True, device="meta")
    assert module(h, t).shape == ()


def test_module_exports_with_a_dynamic_batch():
    from torch.export import Dim, export

    torch.manual_seed(0)
    module = osm.LinearCrossEntropyLoss(H, V, bias=True, label_smoothing=0.1, dtype=torch.float64)
    h, _w, _b, t = inputs(torch.float64)
    h = h.detach().flatten(0, 1)
    t = t.flatten()
    tokens = Dim("tokens", min=2)
    program = export(module, (h, t), dynamic_shapes=({0: tokens}, {0: tokens}))
    for n in (26, 7, 40):
        hn = torch.randn(n, H, dtype=torch.float64)
        tn = torch.randint(0, V, (n,))
        want = F.cross_entropy(F.linear(hn, module.weight, module.bias), tn, label_smoothing=0.1)
        torch.testing.assert_close(program.module()(hn, tn), want)


def test_class_weight_that_requires_grad_raises():
    h, w, b, t = inputs(torch.float64)
    with pytest.raises(RuntimeError, match="class_weight cannot have requires_grad"):
        osm.linear_cross_entropy(h, w, t, b, class_weight=torch.rand(V, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_on_device_against_float64(device, reduction):
    h, w, b, t = inputs(torch.float32)
    hd, wd, bd = (p.detach().to(device).requires_grad_() for p in (h, w, b))
    got = osm.linear_cross_entropy(hd, wd, t.to(device), bd, reduction=reduction, chunk_size=7, label_smoothing=0.1)
    h64, w64, b64 = (p.detach().double().requires_grad_() for p in (h, w, b))
    want = unfused(h64, w64, b64, t, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    up = torch.rand(want.shape, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(got, (hd, wd, bd), up.float().to(device)),
                    torch.autograd.grad(want, (h64, w64, b64), up)):
        torch.testing.assert_close(a.double().cpu(), c, rtol=1e-4, atol=1e-5)
