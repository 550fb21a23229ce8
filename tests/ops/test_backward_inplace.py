"""The softmax backward written over the incoming gradient (the backward_ op) where autograd hands
the node a gradient nothing else references, and out of place everywhere else: the gradient the
user passed, a retained or hooked gradient, views, a gradient shared by two branches, retain_graph,
create_graph, compiled autograd, torch.func. Which op ran is read from the profiler's record."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import online_softmax as osm
from testlib import random_logits

ops = torch.ops.online_softmax


class BackwardOps:
    """The backward ops that ran (backward: out of place; backward_: in place), from the profiler's
    record of the dispatcher: a dispatch mode would itself hold references to the gradients."""

    def __enter__(self):
        self.profile = profile(activities=[ProfilerActivity.CPU])
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)
        names = ("online_softmax::backward", "online_softmax::backward_")
        self.calls = [e.name.split("::")[1] for e in self.profile.events() if e.name in names]


def reference_grad(fn, x, *others):
    xr = x.detach().double().requires_grad_()
    fn(xr, *[o.double() if o.is_floating_point() else o for o in others]).backward()
    return xr.grad


def softmax_times(x, w):
    return (osm.softmax(x, -1) * w).sum()


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape,dim", [((7, 33), -1), ((5, 12, 9), 1), ((2, 300_001), -1), ((1, 1), 0)])
def test_an_owned_gradient_takes_the_result(shape, dim, log):
    x = random_logits(shape, torch.float32, "cpu").requires_grad_()
    w = torch.randn(shape)
    f = osm.log_softmax if log else osm.softmax
    y = f(x, dim)
    with BackwardOps() as mode:
        (y * w).sum().backward()
    assert mode.calls == ["backward_"]
    # The same bits as the out-of-place op (the incoming gradient is w itself: ones * w), and near
    # the float64 gradient.
    assert torch.equal(x.grad, ops.backward(w, y.detach(), dim, log, 1.0, None))
    want = reference_grad(lambda a, b: ((torch.log_softmax if log else torch.softmax)(a, dim) * b).sum(), x, w)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-4, atol=1e-5)


def test_the_users_gradient_is_never_written():
    x = random_logits((6, 40), torch.float32, "cpu").requires_grad_()
    g = torch.randn(6, 40)
    kept = g.clone()
    with BackwardOps() as mode:
        osm.softmax(x, -1).backward(g)
    assert mode.calls == ["backward"]
    assert torch.equal(g, kept)
    torch.testing.assert_close(x.grad, torch.func.vjp(lambda a: torch.softmax(a, -1), x.detach())[1](g)[0])


def test_retained_and_hooked_gradients_keep_their_values():
    x = random_logits((4, 25), torch.float32, "cpu").requires_grad_()
    w = torch.randn(4, 25)
    y = osm.softmax(x, -1)
    y.retain_grad()
    seen = []
    y.register_hook(lambda g: seen.append(g))  # keeps a reference: the gradient is not the node's alone
    with BackwardOps() as mode:
        (y * w).sum().backward()
    assert mode.calls == ["backward"]
    torch.testing.assert_close(y.grad, w)
    torch.testing.assert_close(seen[0], w)
    torch.testing.assert_close(x.grad, reference_grad(softmax_times, x, w).float())


def test_a_retained_gradient_alone_still_allows_it():
    # retain_grad stores a copy of the gradient: the node may still write over its own.
    x = random_logits((4, 25), torch.float32, "cpu").requires_grad_()
    w = torch.randn(4, 25)
    y = osm.softmax(x, -1)
    y.retain_grad()
    with BackwardOps() as mode:
        (y * w).sum().backward()
    torch.testing.assert_close(y.grad, w)
    torch.testing.assert_close(x.grad, reference_grad(softmax_times, x, w).float())
    assert mode.calls == ["backward_"]


def test_views_of_a_gradient_are_not_written():
    # cat's backward hands each input a slice (a view) of one gradient.
    x1 = random_logits((3, 10), torch.float32, "cpu", seed=1).requires_grad_()
    x2 = random_logits((3, 10), torch.float32, "cpu", seed=2).requires_grad_()
    w = torch.randn(6, 10)
    with BackwardOps() as mode:
        (torch.cat([osm.softmax(x1, -1), osm.softmax(x2, -1)]) * w).sum().backward()
    assert mode.calls == ["backward", "backward"]
    torch.testing.assert_close(x1.grad, reference_grad(softmax_times, x1, w[:3]).float())
    torch.testing.assert_close(x2.grad, reference_grad(softmax_times, x2, w[3:]).float())


def test_a_gradient_shared_by_two_branches():
    # add's backward passes one gradient tensor to both inputs: the first node to run shares it;
    # the second, once the first is done, holds it alone.
    x1 = random_logits((5, 16), torch.float32, "cpu", seed=3).requires_grad_()
    x2 = random_logits((5, 16), torch.float32, "cpu", seed=4).requires_grad_()
    w = torch.randn(5, 16)
    with BackwardOps() as mode:
        ((osm.softmax(x1, -1) + osm.log_softmax(x2, -1)) * w).sum().backward()
    assert sorted(mode.calls) == ["backward", "backward_"]
    torch.testing.assert_close(x1.grad, reference_grad(softmax_times, x1, w).float())
    want2 = reference_grad(lambda a, b: (torch.log_softmax(a, -1) * b).sum(), x2, w)
    torch.testing.assert_close(x2.grad, want2.float())


def test_retain_graph_runs_twice():
    x = random_logits((4, 30), torch.float32, "cpu").requires_grad_()
    w = torch.randn(4, 30)
    loss = softmax_times(x, w)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    torch.testing.assert_close(first, reference_grad(softmax_times, x, w).float())


def test_create_graph_stays_out_of_place_and_differentiable():
    x = random_logits((3, 11), torch.float64, "cpu").requires_grad_()
    w = torch.randn(3, 11, dtype=torch.float64)
    with BackwardOps() as mode:
        (g,) = torch.autograd.grad(softmax_times(x, w), x, create_graph=True)
    assert mode.calls == ["backward"]
    (h,) = torch.autograd.grad(g.square().sum(), x)
    (want,) = torch.autograd.grad(torch.autograd.grad(softmax_times(x, w), x, create_graph=True)[0].square().sum(), x)
    torch.testing.assert_close(h, want)


def test_torch_func_and_compiled_autograd_give_the_same_gradient():
    x = random_logits((4, 21), torch.float32, "cpu")
    w = torch.randn(4, 21)
    want = reference_grad(softmax_times, x, w).float()
    torch.testing.assert_close(torch.func.grad(softmax_times)(x, w), want)
    xc = x.clone().requires_grad_()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        softmax_times(xc, w).backward()
    torch.testing.assert_close(xc.grad, want)


def test_other_dtypes_and_masks():
    # A half input with a float32 softmax: the gradient has the input's dtype, not the incoming
    # one's, so out of place. A masked, scaled softmax (its own node) writes in place.
    x = random_logits((4, 19), torch.bfloat16, "cpu").requires_grad_()
    w = torch.randn(4, 19)
    with BackwardOps() as mode:
        (osm.softmax(x, -1, dtype=torch.float32) * w).sum().backward()
    assert mode.calls == ["backward"]
    mask = torch.rand(4, 19) > 0.3
    for log in (False, True):
        xm = random_logits((4, 19), torch.float32, "cpu").requires_grad_()
        f = osm.log_softmax if log else osm.softmax
        with BackwardOps() as mode:
            (f(xm, -1, mask=mask, scale=0.7).masked_fill(~mask, 0) * w).sum().backward()
        assert mode.calls == ["backward_"]
        want = reference_grad(lambda a, b: ((torch.log_softmax if log else torch.softmax)(
            (a * 0.7).masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0) * b).sum(), xm, w)
        torch.testing.assert_close(xm.grad.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_op_equals_backward(device, dtype):
    x = random_logits((6, 70), dtype, device)
    for log, dim, t in ((False, -1, 1.0), (True, -1, 0.6), (False, 0, 1.3)):
        y = (torch.log_softmax if log else torch.softmax)(x.float() / t, dim).to(dtype)
        g = torch.randn(6, 70, device=device).to(dtype)
        want = ops.backward(g, y, dim, log, t, None)
        ops.backward_(g, y, dim, log, t)
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_the_op_under_vmap():
    y = torch.softmax(torch.randn(3, 4, 9), -1)
    g = torch.randn(3, 4, 9)
    want = ops.backward(g, y, -1, False, 1.0, None)
    torch.vmap(lambda a, b: ops.backward_(a, b, -1, False, 1.0), in_dims=(0, 0), out_dims=None)(g, y)
    torch.testing.assert_close(g, want)
    with pytest.raises(ValueError, match="grad_out must be batched"):
        torch.vmap(lambda b: ops.backward_(g[0], b, -1, False, 1.0), out_dims=None)(y)


def test_the_op_refuses_what_it_cannot_write():
    y = torch.softmax(torch.randn(4, 8), -1)
    with pytest.raises(TypeError, match="grad_out"):
        ops.backward_(torch.randn(4, 8, dtype=torch.float64), y, -1, False, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.backward_(torch.randn(8, 4).t(), y, -1, False, 1.0)
    with pytest.raises(ValueError, match="shape"):
        ops.backward_(torch.randn(4, 9), y, -1, False, 1.0)
