"""Every differentiable public function (tests/transform_table.py) under every transform a user can
take torch's op through, against torch's own composition in float64, or raising the documented
error. No op may fall back to vmap's per-sample loop (its warning fails the test)."""

import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.utils.checkpoint import checkpoint

from testlib import random_logits
from transform_table import CASES, TRANSFORMS

TOL = dict(rtol=1e-9, atol=1e-10)


def _weights(y, seed=11):
    return random_logits(tuple(y.shape), torch.float64, seed=seed).to(y.device)


def _loss(fn, w):
    return lambda a: (fn(a) * w).sum()


def _input(case, seed=0, shape=None, device="cpu"):
    return random_logits(shape or case.shape, torch.float64, seed=seed).to(device)


def _reverse(fn, x, w):
    x = x.clone().requires_grad_()
    return torch.autograd.grad((fn(x) * w).sum(), x)[0]


def _double_backward(fn, x, w):
    x = x.clone().requires_grad_()
    g, = torch.autograd.grad((fn(x) * w).sum(), x, create_graph=True)
    v = _weights(g, seed=12)
    return torch.autograd.grad((g * v).sum(), x)[0]


def _forward_ad(fn, x, t):
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None, "forward-mode AD dropped the tangent"
    return tangent


def _run(transform, fn, x, w):
    """One cell: the transform applied to fn at x (w weighs the outputs where a scalar is needed)."""
    t = _weights(x, seed=13)
    if transform == "reverse":
        return _reverse(fn, x, w)
    if transform == "double_backward":
        return _double_backward(fn, x, w)
    if transform == "forward_ad":
        return _forward_ad(fn, x, t)
    if transform == "jvp":
        return jvp(fn, (x,), (t,))[1]
    if transform == "grad":
        return grad(_loss(fn, w))(x)
    if transform == "jacrev":
        return jacrev(fn)(x)
    if transform == "jacfwd":
        return jacfwd(fn)(x)
    if transform == "hessian":
        return hessian(_loss(fn, w))(x)
    if transform == "vmap":
        xs = torch.stack([x, x.flip(-1) * 0.5, x + 1.0], dim=1)  # vmapped over dim 1, not the last
        return vmap(fn, in_dims=1)(xs)
    if transform == "nested_vmap":
        xs = torch.stack([torch.stack([x, x * 0.5], dim=0), torch.stack([x.flip(-1), x - 2.0], dim=0)], dim=1)
        return vmap(vmap(fn, in_dims=0), in_dims=1)(xs)
    if transform == "vmap_grad":
        xs = torch.stack([x, x.flip(-1) * 0.5, x + 1.0])
        return vmap(grad(_loss(fn, w)))(xs)
    if transform == "checkpoint":
        grads = []
        for reentrant in (True, False):
            xr = x.clone().requires_grad_()
            (checkpoint(fn, xr, use_reentrant=reentrant) * w).sum().backward()  # reentrant: no .grad()
            grads.append(xr.grad)
        return torch.stack(grads)
    raise AssertionError(transform)


def _reference(transform, ref, x, w):
    """The same cell computed with torch's composition (the vmaps as loops, so that the reference
    does not depend on torch's own batching rules)."""
    if transform == "vmap":
        xs = torch.stack([x, x.flip(-1) * 0.5, x + 1.0], dim=1)
        return torch.stack([ref(xs.select(1, i)) for i in range(3)])
    if transform == "nested_vmap":
        xs = torch.stack([torch.stack([x, x * 0.5], dim=0), torch.stack([x.flip(-1), x - 2.0], dim=0)], dim=1)
        return torch.stack([torch.stack([ref(xs[j, i]) for j in range(2)]) for i in range(2)])
    if transform == "vmap_grad":
        return torch.stack([_reverse(ref, a, w) for a in (x, x.flip(-1) * 0.5, x + 1.0)])
    return _run(transform, ref, x, w)


def _cell(case, transform):
    expected = (case.raises or {}).get(transform)
    return pytest.param(case, transform, expected, id=f"{case.name}-{transform}")


NUMERIC = ["reverse", "double_backward", "forward_ad", "jvp", "grad", "jacrev", "jacfwd", "hessian", "vmap",
           "nested_vmap", "vmap_grad", "checkpoint"]


def _expect_error(expected, call):
    kind, phrase = expected
    with pytest.raises(kind, match=re.escape(phrase)):
        call()


@pytest.mark.parametrize("case,transform,expected", [_cell(c, t) for c in CASES for t in NUMERIC])
def test_transform_equals_torch(case, transform, expected):
    x = _input(case)
    w = _weights(case.ref(x))
    if expected is not None:
        _expect_error(expected, lambda: _run(transform, case.ours, x, w))
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        ours = _run(transform, case.ours, x, w)
    torch.testing.assert_close(ours, _reference(transform, case.ref, x, w), **TOL)


@pytest.mark.parametrize("case,transform,expected", [_cell(c, "compile") for c in CASES])
def test_compile_fullgraph_dynamic(case, transform, expected):
    torch._dynamo.reset()
    x = _input(case)
    w = _weights(case.ref(x))
    compiled = torch.compile(case.ours, fullgraph=True, dynamic=True)
    if expected is not None:
        _expect_error(expected, lambda: compiled(x))
        return
    for seed, shape in ((0, None), (1, (case.shape[0] + 2, *case.shape[1:]))):
        xi = _input(case, seed, shape).requires_grad_()
        out = compiled(xi)
        wi = _weights(out)
        g, = torch.autograd.grad((out * wi).sum(), xi)
        torch.testing.assert_close(out, case.ref(xi.detach()), **TOL)
        torch.testing.assert_close(g, _reverse(case.ref, xi.detach(), wi), **TOL)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("case,transform,expected", [_cell(c, "export") for c in CASES])
def test_export_dynamic_batch(case, transform, expected):
    x = _input(case)
    batch = torch.export.Dim("batch", min=2, max=64)
    export = lambda: torch.export.export(_Wrap(case.ours), (x,), dynamic_shapes={"x": {0: batch}})  # noqa: E731
    if expected is not None:
        _expect_error(expected, export)
        return
    program = export()
    other = _input(case, 3, (case.shape[0] + 3, *case.shape[1:]))
    torch.testing.assert_close(program.module()(other), case.ref(other), **TOL)


@pytest.mark.parametrize("case,transform,expected", [_cell(c, "meta") for c in CASES])
def test_meta_tensors(case, transform, expected):
    x = _input(case).to("meta")
    if expected is not None:
        _expect_error(expected, lambda: case.ours(x))
        return
    ours, ref = case.ours(x), case.ref(x)
    assert ours.device.type == "meta" and ours.shape == ref.shape and ours.dtype == ref.dtype


@pytest.mark.parametrize("case,transform,expected", [_cell(c, "threads") for c in CASES])
def test_same_bits_with_1_and_3_threads(case, transform, expected):
    """Long rows (split across threads where the rows are few), float32: the bits of the value and
    of the gradient do not depend on the thread count."""
    x = random_logits(case.long_shape, torch.float32, seed=4)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            xr = x.clone().requires_grad_()
            out = case.ours(xr)
            g, = torch.autograd.grad((out * _weights(out).float()).sum(), xr)
            results.append((out.detach(), g))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


ON_DEVICE = ["softmax(mask=bool)", "softmax(causal=True)", "softmax_stats(...).sumexp", "softmax_topk(log=True)",
             "cross_entropy", "linear_cross_entropy"]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ON_DEVICE], ids=lambda c: c.name)
@pytest.mark.parametrize("transform", ["double_backward", "jvp", "hessian", "vmap_grad"])
def test_transform_on_device(device, case, transform):
    """A sample of the matrix on each device, so that the GPU check runs the nodes and batching
    rules over the CUDA kernels too."""
    x = _input(case, device=device)
    w = _weights(case.ref(x))
    expected = (case.raises or {}).get(transform)
    if expected is not None:
        _expect_error(expected, lambda: _run(transform, case.ours, x, w))
        return
    torch.testing.assert_close(_run(transform, case.ours, x, w), _reference(transform, case.ref, x, w), **TOL)


def test_every_transform_has_a_test():
    covered = set(NUMERIC) | {"compile", "export", "meta", "threads"}
    assert covered == set(TRANSFORMS)


def test_causal_module_exports_with_dynamic_queries_and_keys():
    """FusedScaleMaskSoftmax's causal offset (keys - queries) is symbolic when the sequence lengths
    are: it was refused as "not an int"."""
    import online_softmax as osm

    module = osm.FusedScaleMaskSoftmax(attn_mask_type=osm.AttnMaskType.causal, scale=0.5)
    x = random_logits((2, 3, 4, 6), torch.float64)
    dims = {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("queries", max=64),
            3: torch.export.Dim("keys", max=128)}
    program = torch.export.export(module, (x,), dynamic_shapes={"input": dims})
    for shape in ((3, 3, 5, 9), (1, 3, 7, 7)):
        other = random_logits(shape, torch.float64, seed=1)
        torch.testing.assert_close(program.module()(other), module(other))
    traced = torch.jit.trace(module, (x,))
    torch.testing.assert_close(traced(x), module(x))


def test_docs_show_the_table_the_tests_run():
    from pathlib import Path

    from transform_table import render_markdown

    page = (Path(__file__).resolve().parents[2] / "docs" / "transforms.md").read_text()
    shown = page.split("<!-- transform-table:start -->\n", 1)[1].split("<!-- transform-table:end -->", 1)[0]
    assert shown == render_markdown(), "docs/transforms.md: regenerate the table from tests/transform_table.py"
