"""online_softmax.softmax_topk: values/indices against float64 references, order, gradients."""

import pytest
import torch

import online_softmax as osm
from testlib import FLOAT_DTYPES, LOW_PRECISION, random_logits


def reference_topk(x, k, dim=-1, log=False, temperature=1.0):
    """Float64 oracle: probabilities of the k largest x, ties to the lower index, NaN first."""
    x64 = x.double()
    p = (torch.log_softmax if log else torch.softmax)(x64 / temperature, dim)
    # A stable sort of -x orders by value descending with ties in index order. NaN sorts last in
    # an ascending sort, so a second stable sort puts NaN first (above +inf), keeping that order.
    by_value = torch.sort(torch.where(torch.isnan(x64), 0.0, -x64), dim=dim, stable=True).indices
    not_nan = (~torch.isnan(x64)).to(torch.int8).gather(dim, by_value)
    order = by_value.gather(dim, torch.sort(not_nan, dim=dim, stable=True).indices).narrow(dim, 0, k)
    return p.gather(dim, order), order


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((5, 17), 3), ((5, 17), 17), ((64, 1000), 8),
                                     ((3, 32768), 64), ((2, 100003), 5), ((1, 1 << 20), 64),
                                     ((4, 70000), 1), ((2, 5000), 2500)])
def test_topk_matches_float64(device, dtype, log, shape, k):
    x = random_logits(shape, dtype, device)
    values, indices = osm.softmax_topk(x, k, log=log)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert values.shape == (shape[0], k) == indices.shape
    ref_v, ref_i = reference_topk(x.cpu(), k, log=log)
    # Random float64 logits rounded to low precision can tie; compare indices where the values
    # differ from their neighbours, and values everywhere.
    torch.testing.assert_close(indices.cpu(), ref_i)
    if dtype in LOW_PRECISION:
        tol = dict(rtol=2e-2, atol=2e-3 if not log else 5e-2)
    elif dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-12)
    else:
        tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.cpu().double(), ref_v, **tol)
    # Sorted descending.
    assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_topk_any_dim_and_temperature(device, dim):
    x = random_logits((6, 9, 40), torch.float32, device)
    for temperature in (0.5, 1.0, 4.0):
        values, indices = osm.softmax_topk(x, 4, dim, temperature=temperature)
        ref_v, ref_i = reference_topk(x.cpu(), 4, dim, temperature=temperature)
        torch.testing.assert_close(indices.cpu(), ref_i)
        torch.testing.assert_close(values.cpu().double(), ref_v, rtol=1e-5, atol=1e-6)


def test_topk_equals_torch_topk_of_softmax(device):
    x = random_logits((32, 50257), torch.float32, device)
    for k in (1, 8, 64):
        values, indices = osm.softmax_topk(x, k)
        tv, ti = torch.softmax(x, -1).topk(k)
        torch.testing.assert_close(indices, ti)
        # torch's float32 softmax is itself ~1e-5 off here: both are held to the float64 answer.
        ref = torch.softmax(x.double(), -1).topk(k).values
        torch.testing.assert_close(values.double(), ref, rtol=5e-6, atol=1e-7)
        torch.testing.assert_close(tv.double(), ref, rtol=5e-5, atol=1e-7)
        lv, li = osm.softmax_topk(x, k, log=True)
        torch.testing.assert_close(lv.double(), torch.log_softmax(x.double(), -1).topk(k).values,
                                   rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_index(device):
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]], device=device)
    values, indices = osm.softmax_topk(x, 2)
    assert indices.tolist() == [[1, 2]]
    # A long row of equal values (ties across vector lanes and split pieces).
    x = torch.zeros(2, 200000, device=device)
    values, indices = osm.softmax_topk(x, 5)
    assert indices.tolist() == [[0, 1, 2, 3, 4]] * 2
    torch.testing.assert_close(values, torch.full((2, 5), 1 / 200000, device=device))


def test_special_values(device):
    inf, nan = float("inf"), float("nan")
    x = random_logits((5, 100), torch.float32, device)
    x[0] = -inf                  # all -inf: NaN values (as softmax(x).topk would give)
    x[1, 7] = nan
    x[1, 3] = nan                # NaN ranks first, lower index first; the row is NaN
    x[2, ::2] = -inf             # -inf never beats a finite value
    x[3, 50] = inf               # +inf: the row is NaN, +inf ranks first
    values, indices = osm.softmax_topk(x, 3)
    assert torch.isnan(values[0]).all() and torch.isnan(values[1]).all() and torch.isnan(values[3]).all()
    assert indices[1, :2].tolist() == [3, 7]
    assert indices[3, 0].item() == 50
    assert (indices[2] % 2 == 1).all() and torch.isfinite(values[2]).all()
    ref_v, ref_i = reference_topk(x[4:].cpu(), 3)
    torch.testing.assert_close(values[4:].cpu().double(), ref_v, rtol=1e-5, atol=1e-6)
    # Only k = size can reach the -inf entries: they come last with probability 0.
    y = torch.tensor([[0.0, -inf, 1.0]], device=device)
    values, indices = osm.softmax_topk(y, 3)
    assert indices.tolist() == [[2, 0, 1]] and values[0, 2].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 40])
def test_selection_order_of_hostile_values(device, dtype, k):
    """The order of both selection paths (k <= 16 sorted, larger k buffered) and both candidate
    forms (packed integer keys for float accumulation, pairs for float64): NaN first, -0 equal to
    +0, ties to the lower index, as the stable float64 sort of the oracle."""
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, inf, -inf, nan, 2.5, -2.5, 1e4, -1e4, 3.0, 3.0])
    x = pool[torch.randint(len(pool), (8, 300), generator=g)]
    x[0] = 0.0
    x[0, ::3] = -0.0                                    # only signed-zero ties
    x[1] = torch.randint(-3, 4, (300,), generator=g).float()   # heavy ties, no specials
    x[2] = -inf
    x[2, 299] = -0.0                                    # one finite value among -inf
    x = x.to(dtype).to(device)
    values, indices = osm.softmax_topk(x, k)
    _, ref_i = reference_topk(x.cpu(), k)
    assert torch.equal(indices.cpu(), ref_i)
    finite_rows = [0, 1]
    torch.testing.assert_close(values[finite_rows].cpu().double(), reference_topk(x[finite_rows].cpu(), k)[0],
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_zero_dim_and_empty_batch(device):
    values, indices = osm.softmax_topk(torch.tensor(3.0, device=device), 1)
    assert values.shape == () and values.item() == 1.0 and indices.item() == 0
    values, indices = osm.softmax_topk(torch.empty(0, 10, device=device), 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape,k,dim", [((3, 11), 4, -1), ((2, 5, 6), 2, 1), ((7,), 7, 0)])
def test_gradcheck_float64(log, shape, k, dim):
    x = random_logits(shape, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: osm.softmax_topk(t, k, dim, log=log, temperature=0.8).values, (x,))


@pytest.mark.parametrize("log", [False, True])
def test_backward_matches_unfused(device, log):
    x = random_logits((4, 3000), torch.float32, device).requires_grad_()
    g = random_logits((4, 16), torch.float32, device, seed=5)
    (dx,) = torch.autograd.grad(osm.softmax_topk(x, 16, log=log).values, x, g)
    xt = x.detach().clone().requires_grad_()
    p = (torch.log_softmax if log else torch.softmax)(xt, -1)
    (dt,) = torch.autograd.grad(p.gather(-1, osm.softmax_topk(xt, 16).indices), xt, g)
    torch.testing.assert_close(dx, dt, rtol=1e-4, atol=1e-6)


def test_indices_and_state_are_not_differentiable():
    x = torch.randn(2, 10, requires_grad=True)
    values, indices = osm.softmax_topk(x, 3)
    assert values.requires_grad and not indices.requires_grad


def test_bad_arguments():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="k"):
        osm.softmax_topk(x, 0)
    with pytest.raises(ValueError, match="k"):
        osm.softmax_topk(x, 11)
    with pytest.raises(TypeError, match="k"):
        osm.softmax_topk(x, 2.0)
    with pytest.raises(IndexError, match="dim"):
        osm.softmax_topk(x, 2, 2)
    with pytest.raises(ValueError, match="temperature"):
        osm.softmax_topk(x, 2, temperature=0.0)
    with pytest.raises(TypeError, match="x"):
        osm.softmax_topk(torch.arange(10), 2)
    with pytest.raises(IndexError, match="indices"):
        m, d = torch.ops.online_softmax.stats(x, -1)
        torch.ops.online_softmax.softmax_topk_backward(torch.ones(4, 2), x, torch.full((4, 2), 10), m, d, -1)


def test_fused_topk_allocates_nothing_of_the_input_size():
    """Peak RSS grows by far less than the input's size while the fused top-k runs (subprocess)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, torch, online_softmax as osm
        x = torch.randn(16, 1 << 23)          # 512 MiB
        osm.softmax_topk(x[:1, :4096], 8)     # load everything lazily initialized first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v, i = osm.softmax_topk(x, 64)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)       # MiB
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mib = int(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 32, f"peak RSS grew by {grown_mib} MiB for a 512 MiB input"


def test_backward_keeps_digits_of_large_logits():
    """The backward subtracts the raw max before scaling, like the forward (3e4 logits, t = 0.3)."""
    x = torch.tensor([[30000.0, 29999.0, 29998.5, 29990.0]], requires_grad=True)
    (dx,) = torch.autograd.grad(osm.softmax_topk(x, 1, temperature=0.3).values.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.softmax(x64 / 0.3, -1)[0, 0], x64)
    torch.testing.assert_close(dx.double(), ref, rtol=1e-4, atol=1e-6)
    # The gradient of the sum of all probabilities is zero.
    (dz,) = torch.autograd.grad(osm.softmax_topk(x, 4, temperature=0.3).values.sum(), x)
    torch.testing.assert_close(dz, torch.zeros_like(dz), rtol=0, atol=1e-5)


def test_backward_op_adds_gradients_of_repeated_indices():
    x = random_logits((1, 6), torch.float64)
    m, d = torch.ops.online_softmax.stats(x, -1)
    g = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    idx = torch.tensor([[2, 2]])
    dx = torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1)
    x64 = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad((torch.softmax(x64, -1)[0, [2, 2]] * g[0]).sum(), x64)
    torch.testing.assert_close(dx, ref)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_with_every_index_at_minus_inf_is_not_nan(device, log, dtype):
    """Indices that all point at -inf entries (a caller's own, or k beyond the finite entries):
    softmax's gradient is 0 there and everywhere, log-softmax's the unfused one; never NaN."""
    inf = float("inf")
    x = random_logits((3, 50), dtype, device)
    x[:, :5] = -inf
    m, d = torch.ops.online_softmax.stats(x, -1)
    idx = torch.tensor([[0, 1, 4], [2, 2, 3], [4, 0, 1]], device=device)
    g = random_logits((3, 3), dtype, device)
    dx = torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1, log)
    x64 = x.double().requires_grad_()
    full = (torch.log_softmax if log else torch.softmax)(x64, -1)
    (ref,) = torch.autograd.grad((full.gather(-1, idx) * g.double()).sum(), x64)
    assert not torch.isnan(dx).any()
    torch.testing.assert_close(dx.double(), ref, rtol=1e-5, atol=1e-7)
    if not log:
        assert torch.count_nonzero(dx) == 0
