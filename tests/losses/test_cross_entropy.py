"""online_softmax.cross_entropy against torch.nn.functional.cross_entropy in float64: torch's own
OpInfo samples, random shapes, every weight / ignore_index / label_smoothing / reduction
combination, hostile logits, low-precision inputs, and the options beyond torch."""

import itertools
import math

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
    args = (m, d, torch.tensor([0, 1, 2, 3]), torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="x must be contiguous to receive its gradient in place"):
        torch.ops.online_softmax.cross_entropy_backward_(x.t().contiguous().t(), *args)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        osm.cross_entropy(x, args[2], inplace_backward=1)
    module = osm.CrossEntropyLoss(inplace_backward=True)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1
    module(logits, args[2]).backward()
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, args[2]).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


# ---- numerics at large logits: log d - (x[t] - m), never through a rounded lse ----

def test_large_logits_do_not_cancel():
    """(m + log d) - x[t] cancels at large logits; log d - (x[t] - m) does not, as torch's
    log-softmax (x - m) - log d."""
    x = torch.tensor([[65504.0, 65504.0, -65504.0, 0.0]])
    t = torch.tensor([0])
    torch.testing.assert_close(osm.cross_entropy(x, t), F.cross_entropy(x, t), rtol=1e-6, atol=0)
    x64 = torch.full((3, 4), -3e38, dtype=torch.float64)
    torch.testing.assert_close(osm.cross_entropy(x64, torch.tensor([0, 1, 3]), reduction="none"),
                               torch.full((3,), math.log(4), dtype=torch.float64), rtol=1e-15, atol=0)
    # Label smoothing: sum_c w_c (x_c - m) against W log d, both small.
    for kw in (dict(label_smoothing=0.3), dict(label_smoothing=0.3, weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))):
        torch.testing.assert_close(osm.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw), rtol=1e-6, atol=0)
        w64 = kw.get("weight")
        kw64 = dict(kw, weight=None if w64 is None else w64.double())
        torch.testing.assert_close(osm.cross_entropy(x64, torch.tensor([0, 1, 3]), **kw64),
                                   F.cross_entropy(x64, torch.tensor([0, 1, 3]), **kw64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-6)])
def test_float32_logits_around_1e4_lose_no_more_than_torch(device, options):
    """float32 logits near 1e4: each row's loss within torch's own error of the float64 loss of the
    same rounded logits (a rounded lse lost 4.7e-4 per row, torch 1.3e-6)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 1000, generator=g, dtype=torch.float64) * 3 + 1e4).float().to(device)
    t = torch.randint(0, 1000, (64,), generator=g).to(device)
    want = _reference_extras(x.double(), t, options.get("z_loss", 0.0), None, "none") \
        if "z_loss" in options else None
    ref = want[0] if want is not None else F.cross_entropy(x.double(), t, reduction="none", **options)
    got = osm.cross_entropy(x, t, reduction="none", **options)
    theirs = F.cross_entropy(x, t, reduction="none", **{k: v for k, v in options.items() if k != "z_loss"})
    if want is not None:
        theirs = theirs.double() + options["z_loss"] * torch.logsumexp(x.double(), 1) ** 2
    torch_err = float((theirs.double() - ref).abs().max())
    our_err = float((got.double() - ref).abs().max())
    assert our_err <= max(2 * torch_err, 4e-6 * float(ref.abs().max())), (our_err, torch_err)


def test_gradients_at_1e4_offsets_equal_torch_in_float32(device):
    """A row offset by 1e4 in a 17 x 1000 batch with class weights, reduction sum: the gradient is
    exp(x - m) / d as torch's, within float32 tolerance (through a rounded lse it was not)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 1000, generator=g).to(device)
    x[5] += 1e4
    w = (torch.rand(1000, generator=g) + 0.5).to(device)
    t = torch.randint(0, 1000, (17,), generator=g).to(device)
    for kw in (dict(weight=w, reduction="sum"), dict(weight=w, reduction="sum", label_smoothing=0.2)):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        (ga,) = torch.autograd.grad(osm.cross_entropy(a, t, **kw), a)
        (gb,) = torch.autograd.grad(F.cross_entropy(b, t, **kw), b)
        torch.testing.assert_close(ga, gb, rtol=1.3e-6, atol=1e-5)
        x64 = x.double().requires_grad_()
        (g64,) = torch.autograd.grad(F.cross_entropy(x64, t, **dict(kw, weight=w.double())), x64)
        torch.testing.assert_close(ga.double(), g64, rtol=0, atol=2e-6 * float(g64.abs().max()))


# ---- second derivatives and torch.func ----

SECOND_ORDER = [dict(), dict(reduction="sum", ignore_index=2), dict(reduction="none", label_smoothing=0.2),
                dict(weighted=True, label_smoothing=0.1), dict(weighted=True, reduction="none", ignore_index=0)]


def _second_order_case(options, seed=0):
    options = dict(options)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randint(0, 7, (5,), generator=g)
    t[1] = options.get("ignore_index", -100)
    if options.pop("weighted", False):
        options["weight"] = torch.rand(7, generator=g, dtype=torch.float64) + 0.2
    return x, t, options


@pytest.mark.parametrize("options", SECOND_ORDER)
def test_double_backward_equals_torch(options):
    """A gradient penalty, grad(loss, x, create_graph=True) then a second grad: the loss's own
    Hessian is there (it was left out, silently)."""
    x, t, kw = _second_order_case(options)
    upstream = torch.rand(5, dtype=torch.float64) if kw.get("reduction") == "none" else torch.tensor(0.7)

    def penalty(fn):
        z = x.clone().requires_grad_()
        loss = fn(z, t, **kw)
        (g,) = torch.autograd.grad(loss, z, upstream.to(loss.dtype), create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum() + (g * z).sum(), z)
        return g, gg

    for a, b in zip(penalty(osm.cross_entropy), penalty(F.cross_entropy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", SECOND_ORDER[:4])
def test_torch_func_transforms_equal_torch(options):
    """hessian, jacrev, jacfwd, jvp and vmap(grad) of cross_entropy equal those of F.cross_entropy."""
    from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

    x, t, kw = _second_order_case(options, seed=3)

    def ours(z):
        return osm.cross_entropy(z, t, **kw)

    def theirs(z):
        return F.cross_entropy(z, t, **kw)

    scalar = kw.get("reduction", "mean") != "none"
    for transform in ([hessian] if scalar else []) + [jacrev, jacfwd]:
        torch.testing.assert_close(transform(ours)(x), transform(theirs)(x), rtol=1e-10, atol=1e-12)
    v = torch.randn_like(x)
    for a, b in zip(jvp(ours, (x,), (v,)), jvp(theirs, (x,), (v,))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if scalar:
        xs = torch.randn(3, 5, 7, dtype=torch.float64)
        torch.testing.assert_close(vmap(grad(ours))(xs), vmap(grad(theirs))(xs), rtol=1e-10, atol=1e-12)


def test_z_loss_and_softcap_second_derivatives():
    x, t, _ = _second_order_case({}, seed=4)

    def ours(z):
        return osm.cross_entropy(z, t, z_loss=0.1, softcap=3.0)

    def ref(z):
        return _reference_extras(z, t, 0.1, 3.0, "mean")[0]

    torch.testing.assert_close(torch.func.hessian(ours)(x), torch.func.hessian(ref)(x), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(ours, (x.clone().requires_grad_(),))


def test_cross_entropy_backward_op_refuses_to_be_differentiated():
    x = random_logits((4, 10), torch.float64).requires_grad_()
    m, d = torch.ops.online_softmax.stats(x.detach(), 1)
    ones = torch.ones(4, dtype=torch.float64)
    g = torch.ops.online_softmax.cross_entropy_backward(x, m, d, torch.tensor([0, 1, 2, 3]), ones, ones)
    with pytest.raises(NotImplementedError, match="cross_entropy_backward: double backward"):
        g.sum().backward()


# ---- in place, never over a leaf ----

@pytest.mark.parametrize("shape", [(6, 11), (11,)])
def test_inplace_backward_never_writes_a_leaf(device, shape):
    """A parameter (or a view of one) keeps its values: the backward falls back to out of place."""
    x = random_logits(shape, torch.float32, device, seed=3)
    t = torch.randint(0, 11, shape[:-1], generator=torch.Generator().manual_seed(0)).to(device)
    param = torch.nn.Parameter(x.clone())
    osm.cross_entropy(param, t, inplace_backward=True).backward()
    assert torch.equal(param.detach(), x)
    assert param.grad.data_ptr() != param.data_ptr()
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(param.grad, ref.grad)
    whole = torch.nn.Parameter(x.reshape(-1).clone())
    view = whole.view(shape)  # a view of a leaf: its storage is the parameter's
    osm.cross_entropy(view, t, inplace_backward=True).backward()
    assert torch.equal(whole.detach(), x.reshape(-1))
    torch.testing.assert_close(whole.grad.view(shape), ref.grad)


# ---- vmap ----

def test_vmap_of_cross_entropy_equals_torch_and_checks_targets():
    from torch.func import vmap

    xs = random_logits((4, 6, 9), torch.float64)
    ts = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(0))
    ts[1, 2] = -100
    for kw in (dict(), dict(label_smoothing=0.1, reduction="none"), dict(reduction="sum")):
        torch.testing.assert_close(vmap(lambda x, t: osm.cross_entropy(x, t, **kw))(xs, ts),
                                   vmap(lambda x, t: F.cross_entropy(x, t, **kw))(xs, ts))
    bad = ts.clone()
    bad[3, 0] = 9
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        vmap(lambda x, t: osm.cross_entropy(x, t))(xs, bad)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        vmap(lambda x: osm.cross_entropy(x, bad[3]))(xs)  # an unbatched target


def test_vmap_of_the_backward_ops_has_a_batching_rule():
    """cross_entropy_backward(_) under vmap: no fallback warning, the per-call results."""
    import warnings

    from torch.func import vmap

    ops = torch.ops.online_softmax
    xs = random_logits((3, 4, 10), torch.float32)
    m, d = ops.stats(xs, 2)
    t = torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(0))
    ps, ts = torch.rand(3, 4), torch.rand(3, 4)
    sm, w = torch.rand(4) * 0.01, torch.rand(10)
    ws = torch.rand(3, 10)
    want = torch.stack([ops.cross_entropy_backward(xs[i], m[i], d[i], t[i], ps[i], ts[i], sm, w) for i in range(3)])
    want_ws = torch.stack([ops.cross_entropy_backward(xs[i], m[i], d[i], t[i], ps[i], ts[i], sm, ws[i])
                           for i in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(ops.cross_entropy_backward, in_dims=(0, 0, 0, 0, 0, 0, None, None))(xs, m, d, t, ps, ts, sm, w)
        got_ws = vmap(ops.cross_entropy_backward, in_dims=(0, 0, 0, 0, 0, 0, None, 0))(xs, m, d, t, ps, ts, sm, ws)
        over = xs.clone()

        def inplace(x, *args):
            ops.cross_entropy_backward_(x, *args)
            return x

        vmap(inplace, in_dims=(0, 0, 0, 0, 0, 0, None, None))(over, m, d, t, ps, ts, sm, w)
    assert torch.equal(got, want) and torch.equal(got_ws, want_ws) and torch.equal(over, want)


# ---- zero classes, meta tensors ----

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_zero_classes_like_torch(reduction, smoothing):
    x = torch.empty(3, 0, dtype=torch.float64, requires_grad=True)
    t = torch.full((3,), -100)
    for target in (t, torch.empty(3, 0, dtype=torch.float64)):
        want = F.cross_entropy(x, target, reduction=reduction, label_smoothing=smoothing)
        got = osm.cross_entropy(x, target, reduction=reduction, label_smoothing=smoothing)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)
        if got.requires_grad:
            (g,) = torch.autograd.grad(got.sum(), x)
            assert g.shape == (3, 0)
    torch.testing.assert_close(osm.cross_entropy(torch.empty(0), torch.tensor(-100)),
                               F.cross_entropy(torch.empty(0), torch.tensor(-100)), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_meta_tensors_give_torch_shapes_and_dtypes(dtype):
    x = torch.empty(4, 9, 3, dtype=dtype, device="meta")
    t = torch.empty(4, 3, dtype=torch.int64, device="meta")
    for kw in (dict(), dict(reduction="none", label_smoothing=0.1), dict(weight=torch.empty(9, device="meta",
                                                                                              dtype=dtype))):
        want = F.cross_entropy(x, t, **kw)
        got = osm.cross_entropy(x, t, **kw)
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
        module = osm.CrossEntropyLoss(**kw)
        assert module(x, t).shape == want.shape
    q = torch.empty(4, 9, 3, dtype=dtype, device="meta")
    assert osm.cross_entropy(x, q).shape == F.cross_entropy(x, q).shape
    xr = torch.empty(4, 9, dtype=dtype, device="meta", requires_grad=True)
    loss, lse = osm.cross_entropy(xr, t[:, 0], return_lse=True)
    loss.backward()
    assert xr.grad.shape == (4, 9) and xr.grad.device.type == "meta" and lse.shape == (4,)


# ---- torch.export, jit.trace ----

@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.1, weighted=True)])
def test_export_with_dynamic_batch_and_classes(options):
    from torch.export import Dim, export

    options = dict(options)
    weighted = options.pop("weighted", False)

    class Loss(torch.nn.Module):
        def forward(self, x, t, w):
            return osm.cross_entropy(x, t, w if weighted else None, **options)

    x = random_logits((6, 11), torch.float32)
    t = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(0))
    w = torch.rand(11)
    batch, classes = Dim("batch", min=2), Dim("classes", min=2)
    program = export(Loss(), (x, t, w), dynamic_shapes=({0: batch, 1: classes}, {0: batch}, {0: classes}))
    for shape in ((6, 11), (9, 30), (3, 2)):
        x2 = random_logits(shape, torch.float32, seed=shape[1])
        t2 = torch.randint(0, shape[1], shape[:1], generator=torch.Generator().manual_seed(1))
        w2 = torch.rand(shape[1])
        torch.testing.assert_close(program.module()(x2, t2, w2),
                                   F.cross_entropy(x2, t2, w2 if weighted else None, **options))


def test_jit_trace_gives_equal_results():
    x = random_logits((5, 13), torch.float32)
    t = torch.randint(0, 13, (5,), generator=torch.Generator().manual_seed(0))
    traced = torch.jit.trace(lambda z, tt: osm.cross_entropy(z, tt, label_smoothing=0.1), (x, t))
    x2 = random_logits((5, 13), torch.float32, seed=2)
    torch.testing.assert_close(traced(x2, t), F.cross_entropy(x2, t, label_smoothing=0.1))


# ---- class weights ----

def test_weight_that_requires_grad_raises_like_torch():
    x = random_logits((4, 5), torch.float64).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight"):
        F.cross_entropy(x, t, weight=w)
    for kw in (dict(), dict(label_smoothing=0.1)):
        with pytest.raises(RuntimeError, match="weight .*requires_grad"):
            osm.cross_entropy(x, t, weight=w, **kw)
    with torch.no_grad():
        torch.testing.assert_close(osm.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w))
    # Probability targets: differentiable with respect to weight, in torch too.
    q = torch.softmax(random_logits((4, 5), torch.float64, seed=1), 1)
    (a,) = torch.autograd.grad(osm.cross_entropy(x, q, weight=w), w)
    (b,) = torch.autograd.grad(F.cross_entropy(x, q, weight=w), w)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_zero_class_weights_like_torch(reduction, smoothing):
    x = random_logits((4, 5), torch.float64).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    compare(x, t, weight=torch.zeros(5, dtype=torch.float64), reduction=reduction, label_smoothing=smoothing)


# ---- CUDA: the losses and both backward ops on the device ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_device_against_float64(device, dtype):
    """cross_entropy (out of place and in place) on the device against torch's float64 result of
    the same rounded logits, hostile rows included."""
    x = random_logits((33, 1001), dtype, seed=7)
    x[0, 5] = float("-inf")
    x[1] += 1e4 if dtype == torch.float32 else 100
    t = torch.randint(0, 1001, (33,), generator=torch.Generator().manual_seed(2))
    t[3] = -100
    w = torch.rand(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    for kw in (dict(), dict(label_smoothing=0.1, weight=w)):
        x64 = x.double().requires_grad_()
        want = F.cross_entropy(x64, t, **kw)
        (g_want,) = torch.autograd.grad(want, x64)
        dkw = {k: (v.float().to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
        for inplace in (False, True):
            leaf = x.to(device).requires_grad_()
            loss = osm.cross_entropy(leaf * 1, t.to(device), inplace_backward=inplace, **dkw)
            (g,) = torch.autograd.grad(loss, leaf)
            tol = 2e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(g.double().cpu(), g_want, rtol=tol, atol=tol * float(g_want.abs().max()))
