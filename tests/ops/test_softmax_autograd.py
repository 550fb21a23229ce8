"""The autograd nodes of softmax / log_softmax and of their backward op
(csrc/common/softmax_autograd.cpp) beyond first gradients: forward-mode AD, second derivatives,
torch.func transforms, saved-tensor hooks, freeing after backward, partial gradients, compiled
autograd. Each against torch's own softmax or finite differences, in float64 where it checks numbers,
on each device (the `device` fixture: the same body on the CPU and on CUDA)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import online_softmax as osm
from testlib import random_logits

FUNCS = {"softmax": (osm.softmax, torch.softmax), "log_softmax": (osm.log_softmax, torch.log_softmax)}


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("shape,dim", [((3, 7), -1), ((4, 5, 3), 1), ((6,), 0), ((), 0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.cuda_params(temperature=[0.7])
def test_forward_ad_and_second_derivatives_gradcheck(device, name, shape, dim, temperature):
    ours_fn, _ = FUNCS[name]
    x = random_logits(shape, torch.float64, device=device).requires_grad_()
    fn = lambda t: ours_fn(t, dim, temperature=temperature)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x,), check_fwd_over_rev=True, check_rev_over_rev=True)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("log", [False, True])
def test_backward_op_gradcheck_both_modes(device, name, log):
    """The backward op's own derivatives (in g and y), reverse and forward mode, by finite differences."""
    g = random_logits((3, 6), torch.float64, seed=1, device=device).requires_grad_()
    x = random_logits((3, 6), torch.float64, device=device)
    y = (torch.log_softmax if log else torch.softmax)(x, -1).requires_grad_()
    fn = lambda g, y: torch.ops.online_softmax.backward(g, y, -1, log, 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g, y), check_forward_ad=True)


@pytest.mark.parametrize("name", FUNCS)
def test_torch_func_grad_and_hessian_match_torch(device, name):
    """torch.func transforms (Function::apply refused them): grad, vjp and a hessian
    (forward over reverse), against torch's own softmax."""
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits((5,), torch.float64, device=device)
    w = random_logits((5,), torch.float64, seed=2, device=device)
    ours_loss = lambda a: (ours_fn(a, 0, temperature=1.3) * w).sum()  # noqa: E731
    ref_loss = lambda a: (torch_fn(a / 1.3, 0) * w).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(ours_loss)(x), torch.func.grad(ref_loss)(x))
    torch.testing.assert_close(torch.func.hessian(ours_loss)(x), torch.func.hessian(ref_loss)(x))
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(ours_loss))(x),
                               torch.func.jacrev(torch.func.jacrev(ref_loss))(x))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("src,dtype", [(torch.float32, None), (torch.float32, torch.float64),
                                       (torch.bfloat16, torch.float32), (torch.float16, None)])
def test_forward_ad_tangent_matches_torch(device, name, src, dtype):
    """The tangent has the output's dtype and is torch's jvp (hostile rows included: an all -inf row
    and a NaN give torch's NaN pattern)."""
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits((5, 33), src, device=device)
    x[1] = float("-inf")
    x[2, 4] = float("nan")
    t = random_logits((5, 33), src, seed=7, device=device)
    tangents = []
    for fn in (ours_fn, torch_fn):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, t), -1, dtype=dtype)
            tangents.append(fwAD.unpack_dual(y).tangent)
    ours, ref = tangents
    assert ours is not None and ours.dtype == ref.dtype == (dtype or src)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(ours.dtype, 2e-2)
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("name", FUNCS)
def test_forward_ad_of_a_non_last_dim_against_float64_jvp(device, name):
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits((4, 6, 5), torch.float32, device=device)
    t = random_logits((4, 6, 5), torch.float32, seed=3, device=device)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours_fn(fwAD.make_dual(x, t), 1, temperature=1.5)).tangent
    _, ref = torch.func.jvp(lambda a: torch_fn(a / 1.5, 1), (x.double(),), (t.double(),))
    torch.testing.assert_close(tangent.double(), ref, rtol=1e-5, atol=1e-6)


def test_node_frees_its_output_and_says_so_on_a_second_backward(device):
    x = random_logits((3, 8), torch.float32, device=device).requires_grad_()
    y = osm.softmax(x, -1)
    assert y.grad_fn.name() == "OnlineSoftmaxForwardBackward"
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = x.grad.clone()
    y.backward(dy)
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(dy)


def test_saved_tensor_hooks_see_the_output(device):
    seen = []

    def pack(t):
        seen.append(t.shape)
        return t.clone()

    x = random_logits((3, 8), torch.float64, device=device).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = osm.log_softmax(x, -1)
    assert seen == [torch.Size([3, 8])]
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xt = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad(torch.log_softmax(xt, -1), xt, dy)
    torch.testing.assert_close(dx, ref)


class _NoGradient(torch.autograd.Function):
    """Passes its input on and gives it no gradient (None): the node before it gets an undefined one."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def test_gradient_of_another_input_and_an_undefined_incoming_gradient(device):
    x = random_logits((3, 8), torch.float32, device=device).requires_grad_()
    w = torch.randn(3, 8, device=device, requires_grad=True)
    y = osm.softmax(x, -1)
    (gw,) = torch.autograd.grad((y * w).sum(), w)
    torch.testing.assert_close(gw, y.detach())
    loss = _NoGradient.apply(osm.softmax(x, -1)).sum() + (2 * x).sum()
    (gx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(gx, torch.full_like(x, 2.0))


@pytest.mark.parametrize("name", FUNCS)
def test_compiled_autograd_traces_the_backward_op(device, name):
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits((4, 9), torch.float32, device=device).requires_grad_()
    w = random_logits((4, 9), torch.float32, seed=5, device=device)
    captured = []

    def compiler(gm):
        captured.append(gm)
        return torch.compile(gm, backend="eager")

    torch._dynamo.reset()
    loss = (ours_fn(x * 2, -1, temperature=0.8) * w).sum()
    with torch._dynamo.compiled_autograd._enable(compiler):
        loss.backward()
    xt = x.detach().requires_grad_()
    (torch_fn(xt * 2 / 0.8, -1) * w).sum().backward()
    torch.testing.assert_close(x.grad, xt.grad)
    assert captured and "OnlineSoftmaxForwardBackward" in captured[0].code


def test_compiled_autograd_of_a_second_derivative(device):
    x = random_logits((4, 9), torch.float64, device=device).requires_grad_()
    w = random_logits((4, 9), torch.float64, seed=5, device=device)
    (g,) = torch.autograd.grad((osm.softmax(x, -1) * w).sum(), x, create_graph=True)
    captured = []

    def compiler(gm):
        captured.append(gm)
        return torch.compile(gm, backend="eager")

    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(compiler):
        (g * g).sum().backward()
    xt = x.detach().requires_grad_()
    (gt,) = torch.autograd.grad((torch.softmax(xt, -1) * w).sum(), xt, create_graph=True)
    (gt * gt).sum().backward()
    torch.testing.assert_close(x.grad, xt.grad)
    assert captured and "OnlineSoftmaxBackwardBackward" in captured[0].code
