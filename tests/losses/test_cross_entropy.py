"""online_softmax.cross_entropy against torch.nn.functional.cross_entropy in float64: torch's own
OpInfo samples, random shapes, every weight / ignore_index / label_smoothing / reduction
combination, hostile logits, low-precision inputs, and the options beyond torch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import online_softmax as osm
from testlib import FLOAT_DTYPES, LOW_PRECISION, random_logits

REDUCTIONS = ["mean", "sum", "none"]


def grads(loss, inputs):
    g = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3))
    return torch.autograd.grad((loss * g).sum(), inputs)


def compare(x, target, rtol=1e-10, atol=1e-12, **kw):
    """Loss and gradients (input, and a probability target that requires grad) against torch's."""
    inputs = [x] + ([target] if target.requires_grad else [])
    want = F.cross_entropy(x, target, **kw)
    got = osm.cross_entropy(x, target, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    for a, b in zip(grads(got, inputs), grads(want, inputs)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def test_torch_opinfo_samples():
    pytest.importorskip("expecttest")  # torch's OpInfo database imports it
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    n = 0
    for sample in info.sample_inputs("cpu", torch.float64, requires_grad=True):
        compare(sample.input, *sample.args, **sample.kwargs)
        n += 1
    assert n >= 20


SHAPES = [((7, 13), (7,)), ((13,), ()), ((3, 11, 4, 2), (3, 4, 2)), ((0, 5), (0,)), ((2, 1), (2,)),
          ((5, 1000), (5,))]


@pytest.mark.parametrize("shape, tshape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted, ignore, smoothing", list(itertools.product([False, True], [None, 2],
                                                                                [0.0, 0.3, 1.0])))
def test_class_targets_every_option(shape, tshape, reduction, weighted, ignore, smoothing):
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    x = random_logits(shape, torch.float64, seed=len(shape)).requires_grad_()
    t = torch.randint(0, n_classes, tshape, generator=torch.Generator().manual_seed(1))
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if ignore is not None and t.numel():
        ignore = ignore if ignore < n_classes else -100
        t.view(-1)[::3] = ignore
        kw["ignore_index"] = ignore
    if weighted:
        kw["weight"] = torch.rand(n_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    compare(x, t, **kw)


@pytest.mark.parametrize("shape", [(7, 13), (13,), (3, 11, 4, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted, smoothing", [(False, 0.0), (True, 0.0), (False, 0.25), (True, 0.25)])
def test_probability_targets(shape, reduction, weighted, smoothing):
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    x = random_logits(shape, torch.float64, seed=5).requires_grad_()
    q = torch.softmax(random_logits(shape, torch.float64, seed=6), 1 if len(shape) > 1 else 0).requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if weighted:
        kw["weight"] = torch.rand(n_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    compare(x, q, **kw)


def test_non_contiguous_views_and_every_ignored():
    base = random_logits((9, 2, 31), torch.float64)
    x = base[:, 0, ::2].requires_grad_()  # strided rows and columns
    t = torch.randint(0, 16, (9,), generator=torch.Generator().manual_seed(4))
    compare(x, t)
    x3 = random_logits((4, 6, 5), torch.float64).transpose(1, 2).requires_grad_()  # (N, C=5, d=6), class dim strided
    compare(x3, torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(5)))
    all_ignored = torch.full((9,), -100, dtype=torch.int64)
    compare(x, all_ignored)  # NaN, as torch: 0 / 0


def test_hostile_logits():
    x = random_logits((6, 20), torch.float64)
    x[0, 3] = float("inf")
    x[1, 4] = float("nan")
    x[2] = float("-inf")
    x[3] *= 1e4
    x[4, 7] = float("-inf")
    t = torch.tensor([3, 0, 1, 2, 7, 9])
    for reduction in ("none", "sum"):
        want = F.cross_entropy(x, t, reduction=reduction)
        got = osm.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
    # Finite rows, 1e4-scale included, keep their gradients exact.
    xf = x[3:4].clone().requires_grad_()
    compare(xf, t[3:4])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_against_float64_of_the_same_rounded_logits(dtype):
    x = random_logits((64, 257), dtype, seed=9)
    t = torch.randint(0, 257, (64,), generator=torch.Generator().manual_seed(8))
    ref = F.cross_entropy(x.double(), t, reduction="none")
    got = osm.cross_entropy(x, t, reduction="none")
    assert got.dtype == dtype
    # Computed in float32 (float64 for float64) and rounded once to the output dtype.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * 10)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(osm.cross_entropy(xg, t), xg)
    x64 = x.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x64, t), x64)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=(1e-14 if dtype == torch.float64 else
                                                               1e-7 if dtype == torch.float32 else 1e-4))


def _reference_extras(x, t, z_loss, softcap, reduction, ignore_index=-100):
    """z_loss and softcap written out in float64."""
    capped = softcap * torch.tanh(x / softcap) if softcap else x
    rows = capped.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 2 else capped
    tt = t.reshape(-1)
    valid = tt != ignore_index
    lse = torch.logsumexp(rows, -1)
    loss = F.cross_entropy(rows, tt, reduction="none", ignore_index=ignore_index) + z_loss * lse * lse * valid
    if reduction == "mean":
        return loss.sum() / valid.sum(), lse
    return (loss.sum() if reduction == "sum" else loss.reshape(t.shape)), lse


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss, softcap", [(1e-3, None), (0.0, 5.0), (1e-2, 2.0)])
def test_z_loss_softcap_and_lse(reduction, z_loss, softcap):
    x = (random_logits((4, 3, 33), torch.float64) * 3).transpose(1, 2).contiguous().requires_grad_()  # (4, 33, 3)
    t = torch.randint(0, 33, (4, 3), generator=torch.Generator().manual_seed(3))
    t[0, 1] = -100
    got, lse = osm.cross_entropy(x, t, reduction=reduction, z_loss=z_loss, softcap=softcap, return_lse=True)
    want, want_lse = _reference_extras(x, t, z_loss, softcap, reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse.reshape(4, 3), rtol=1e-10, atol=1e-12)
    assert not lse.requires_grad
    for a, b in zip(grads(got, [x]), grads(want, [x])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    x = random_logits((4, 9), torch.float64).requires_grad_()
    t = torch.tensor([1, -100, 8, 0])
    w = torch.rand(9, dtype=torch.float64) + 0.5
    for kw in (dict(), dict(weight=w, label_smoothing=0.2), dict(reduction="none", z_loss=0.1, softcap=3.0)):
        assert torch.autograd.gradcheck(lambda z: osm.cross_entropy(z, t, **kw), (x,))
    q = torch.softmax(random_logits((4, 9), torch.float64, seed=3), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, p: osm.cross_entropy(z, p, label_smoothing=0.1), (x, q))


def test_torch_compile_fullgraph():
    x = random_logits((8, 50), torch.float32).requires_grad_()
    t = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(0))

    def f(z):
        return osm.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, f(x))
    (g,) = torch.autograd.grad(got, x)
    (g_ref,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g, g_ref)


def test_module_matches_nn_cross_entropy_loss():
    x = random_logits((6, 10), torch.float64).requires_grad_()
    t = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    w = torch.rand(10, dtype=torch.float64)
    ours = osm.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1)
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert "weight" in dict(ours.named_buffers())


def test_errors_name_the_argument():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="target of class indices must be int64"):
        osm.cross_entropy(x, t.int())
    with pytest.raises(ValueError, match="target must have shape"):
        osm.cross_entropy(x, t[:3])
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        osm.cross_entropy(x, torch.tensor([0, 7, 1, 2]))
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        osm.cross_entropy(x, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        osm.cross_entropy(x, t, reduction="average")
    with pytest.raises(ValueError, match="label_smoothing"):
        osm.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of the 5 classes"):
        osm.cross_entropy(x, t, weight=torch.ones(4))
    with pytest.raises(ValueError, match="softcap"):
        osm.cross_entropy(x, t, softcap=0.0)
    with pytest.raises(TypeError, match="input must be a floating-point"):
        osm.cross_entropy(t, t)
    with pytest.raises(ValueError, match="target of class probabilities must have input's shape"):
        osm.cross_entropy(x, torch.rand(4, 6))
    with pytest.raises(ValueError, match="0-d"):
        osm.cross_entropy(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_half_logits_never_make_a_float32_copy_of_the_logits(dtype):
    """The loss of half logits equals the float32 loss of the same rounded logits (transformers
    upcasts first; here the kernel reads them as they are)."""
    x = random_logits((16, 300), dtype)
    t = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(osm.cross_entropy(x, t).float(), F.cross_entropy(x.float(), t),
                               rtol=2 * torch.finfo(dtype).eps, atol=0)


INPLACE_OPTIONS = [dict(), dict(weight=True, label_smoothing=0.2), dict(ignore_index=2, reduction="sum"),
                   dict(reduction="none", z_loss=1e-3), dict(label_smoothing=0.1, ignore_index=0, reduction="none")]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("options", INPLACE_OPTIONS)
@pytest.mark.parametrize("shape", [(9, 37), (37,)])
def test_inplace_backward_writes_the_gradient_over_the_logits(dtype, options, shape):
    """inplace_backward=True gives the out-of-place gradient, bit for bit, in the logits' own storage."""
    options = dict(options)
    classes = shape[-1]
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(1)) if options.pop("weight", False) else None
    x = random_logits(shape, dtype, seed=4)
    t = torch.randint(0, classes, shape[:-1], generator=torch.Generator().manual_seed(2))
    if t.dim():
        t[1] = 2
    upstream = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)).to(dtype) \
        if options.get("reduction") == "none" else torch.tensor(0.75, dtype=dtype)

    def gradient(inplace):
        leaf = x.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf, as a model's head makes it
        seen = {}
        logits.register_hook(lambda g: seen.setdefault("grad", g))
        loss = osm.cross_entropy(logits, t, weight, inplace_backward=inplace, **options)
        loss.backward(upstream)
        return seen["grad"], logits

    want, _ = gradient(False)
    got, logits = gradient(True)
    assert torch.equal(got, want)
    assert got.data_ptr() == logits.data_ptr() and torch.equal(logits.detach(), want)


def test_inplace_backward_falls_back_where_it_cannot_write_in_place():
    """Class dim not last, a softcap: the gradient is still right, and the logits keep their values."""
    x = random_logits((3, 11, 4), torch.float64, seed=5)
    t = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(0))
    for kw, z in ((dict(), x), (dict(softcap=3.0), x[:, :, 0])):
        tz = t if z.dim() == 3 else t[:, 0]
        leaf = z.clone().requires_grad_()
        osm.cross_entropy(leaf, tz, inplace_backward=True, **kw).backward()
        ref = z.clone().requires_grad_()
        osm.cross_entropy(ref, tz, **kw).backward()
        assert torch.equal(leaf.grad, ref.grad) and torch.equal(leaf.detach(), z)


def test_inplace_backward_refuses_logits_another_node_needs():
    """A node that saved the logits for its own backward must not read the gradient as logits:
    autograd sees the write and raises."""
    x = random_logits((5, 13), torch.float32).requires_grad_()
    t = torch.randint(0, 13, (5,), generator=torch.Generator().manual_seed(0))
    logits = x * 1
    other = (logits * logits).sum()  # saves logits; its backward runs after the loss's
    loss = osm.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_under_torch_compile():
    x = random_logits((8, 50), torch.float32)
    t = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(0))

    def f(z):
        return osm.cross_entropy(z * 1, t, label_smoothing=0.1, inplace_backward=True)

    leaf = x.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(leaf).backward()
    ref = x.clone().requires_grad_()
    osm.cross_entropy(ref, t, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_inplace_op_checks_its_arguments():
    x = random_logits((4, 10), torch.float32)
    m, d = torch.ops.online_softmax.stats(x, 1)
    args = (m + d.log(), torch.tensor([0, 1, 2, 3]), torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="x must be contiguous to receive its gradient in place"):
        torch.ops.online_softmax.cross_entropy_backward_(x.t().contiguous().t(), *args)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        osm.cross_entropy(x, args[1], inplace_backward=1)
    module = osm.CrossEntropyLoss(inplace_backward=True)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1
    module(logits, args[1]).backward()
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, args[1]).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)
