"""CUDA-only tests: every kernel's size boundaries, alignment, poisoned outputs, streams, opcheck,
torch.compile and agreement with the CPU backend. The device-parameterized tests in the other files
run on CUDA too; these add what only a GPU path has. All skip cleanly without a GPU."""

import pytest
import torch

import online_softmax as osm
from conftest import DEVICES, FLOAT_DTYPES, LOW_PRECISION, assert_matches_reference, random_logits

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and a CUDA build of online_softmax")

REFS = {
    "softmax": (lambda x: torch.softmax(x, -1), osm.softmax),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), osm.log_softmax),
}


def poison_cache():
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel forgets to
    write reads NaN instead of a plausible stale value."""
    free = torch.cuda.mem_get_info()[0]
    blocks = []
    for _ in range(8):
        size = min(free // 16, 1 << 30)
        if size < (1 << 20):
            break
        blocks.append(torch.full((size // 4,), float("nan"), device="cuda"))
    del blocks
    torch.cuda.synchronize()


def vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def boundary_lengths(dtype):
    """Row lengths just around every register configuration's capacity (in 16-byte granules,
    losing up to vec-1 elements to a misaligned row start), the shared-memory and split ranges."""
    v = vec(dtype)
    lengths = {1, 2, 3, v - 1, v, v + 1}
    for granules in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        fit = granules * v - (v - 1)
        lengths |= {fit - 1, fit, fit + 1, granules * v + 3}
    lengths |= {4096 * v + 7, 9000 * v + 1, 30001, 65537, 262147}
    return sorted(n for n in lengths if n >= 1)


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_every_kernel_boundary(name, dtype, rows):
    torch_fn, ours_fn = REFS[name]
    for n in boundary_lengths(dtype):
        if rows * n > 30_000_000:
            continue
        x = random_logits((rows, n), dtype, "cuda", seed=n)
        poison_cache()
        y = ours_fn(x, dim=-1)
        assert not torch.isnan(y).any(), f"unwritten output at n={n}"
        assert_matches_reference(y, x, lambda t: torch_fn(t), lambda t: torch_fn(t))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_misaligned_rows(dtype, offset):
    """Rows that start off a 16-byte boundary (storage offset, odd row length) take the head path."""
    for rows, n in [(5, 37), (3, 1001), (2, 20001), (1, 300001)]:
        flat = random_logits((rows * n + offset,), dtype, "cuda", seed=n)
        x = flat[offset:].view(rows, n)
        assert x.is_contiguous() and x.data_ptr() % 16 != 0
        y = osm.softmax(x, dim=-1)
        assert_matches_reference(y, x, lambda t: torch.softmax(t, -1), lambda t: torch.softmax(t, -1))
        # The backward op on misaligned y and dy views (autograd would hand it fresh, aligned ones).
        for log in (False, True):
            y_flat = torch.empty(rows * n + offset, dtype=dtype, device="cuda")
            y = y_flat[offset:].view(rows, n)
            y.copy_((osm.log_softmax if log else osm.softmax)(x, dim=-1))
            g_flat = random_logits((rows * n + offset,), dtype, "cuda", seed=1)
            g = g_flat[offset:].view(rows, n)
            dx = torch.ops.online_softmax.backward(g, y, -1, log, 1.0, None)
            xr = x.double().requires_grad_()
            (torch.log_softmax if log else torch.softmax)(xr, -1).backward(g.double())
            tol = 3e-2 if dtype in LOW_PRECISION else 1e-4
            torch.testing.assert_close(dx.double(), xr.grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((4, 3000, 7), 1), ((2, 5, 70000), 1), ((65, 2, 33), 0), ((3, 1, 5), 1)])
def test_strided_dim(dtype, shape, dim):
    x = random_logits(shape, dtype, "cuda")
    poison_cache()
    for fn, ref in ((osm.softmax, torch.softmax), (osm.log_softmax, torch.log_softmax)):
        y = fn(x, dim=dim)
        assert_matches_reference(y, x, lambda t: ref(t, dim), lambda t: ref(t, dim))
    m, d = osm.softmax_stats(x, dim=dim)
    torch.testing.assert_close(m.double() + d.double().log(), torch.logsumexp(x.double(), dim),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (3, 1000), (5, 40001), (2, 300001), (200, 5000)])
def test_matches_cpu_backend(dtype, shape):
    """The two backends of one op agree (same NaN pattern, tolerance of the accumulation order)."""
    x = random_logits(shape, dtype, "cpu")
    x[0, 0] = float("-inf")
    for fn in (osm.softmax, osm.log_softmax):
        got = fn(x.cuda(), dim=-1).cpu()
        want = fn(x, dim=-1)
        tol = 1e-2 if dtype in LOW_PRECISION else (1e-12 if dtype == torch.float64 else 1e-5)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    k = min(5, shape[-1])
    vg, ig = osm.softmax_topk(x.cuda(), k)
    vc, ic = osm.softmax_topk(x, k)
    assert torch.equal(ig.cpu(), ic)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("length", [5, 4097, 300001])
def test_special_value_rows(dtype, length):
    inf, nan = float("inf"), float("nan")
    x = random_logits((6, length), dtype, "cuda")
    x[0] = -inf            # all -inf: NaN row, like torch
    x[1, length // 2] = inf
    x[2, length - 1] = nan
    x[3, 0] = -inf
    x[4] = 1e4
    x[5, :] = x[5, :] * 1e4 if dtype != torch.float16 else x[5, :]
    for fn, ref in ((osm.softmax, torch.softmax), (osm.log_softmax, torch.log_softmax)):
        y = fn(x, dim=-1)
        want = ref(x.double(), -1)
        assert torch.equal(torch.isnan(y), torch.isnan(want))
        finite = torch.isfinite(want)
        tol = 2e-2 if dtype in LOW_PRECISION else 1e-5
        torch.testing.assert_close(y.double()[finite], want[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("rows,n,k", [(1, 262147, 64), (3, 131075, 50), (300, 32003, 64), (8, 50000, 1),
                                      (2, 4_000_001, 8), (513, 1000, 7), (4, 70000, 1024), (2, 9000, 2500)])
def test_topk_split_and_boundaries(dtype, log, rows, n, k):
    x = random_logits((rows, n), dtype, "cuda", seed=k)
    poison_cache()
    values, indices = osm.softmax_topk(x, k, log=log)
    ref_fn = torch.log_softmax if log else torch.softmax
    ref = ref_fn(x.double(), -1)
    want_values = ref.topk(k, dim=-1).values
    torch.testing.assert_close(values.double(), want_values,
                               rtol=2e-2 if dtype in LOW_PRECISION else 1e-5, atol=1e-6)
    # The order is decided on raw x by both backends (ties to the lower index): indices agree exactly.
    _, cpu_indices = osm.softmax_topk(x.cpu(), k, log=log)
    assert torch.equal(indices.cpu(), cpu_indices)
    assert all(len(set(r)) == k for r in indices.cpu().tolist())


def test_topk_ties_and_nan_order():
    """Ties go to the lower index and NaN ranks first, across chunk boundaries of a split row."""
    n = 1_000_003
    x = torch.zeros(2, n, device="cuda")
    hot = torch.tensor([999_999, 5, 500_000, 17, 250_001])
    x[:, hot] = 3.0
    x[1, 700_000] = float("nan")
    values, indices = osm.softmax_topk(x, 4)
    assert indices[0].tolist() == sorted(hot.tolist())[:4]
    assert indices[1, 0].item() == 700_000 and torch.isnan(values[1]).all()


def test_topk_large_k_takes_sort_path_with_same_answers():
    x = random_logits((3, 5000), torch.float32, "cuda")
    x[0, :100] = 2.0  # ties
    for k in (2048, 2049, 5000):
        values, indices = osm.softmax_topk(x, k)
        vc, ic = osm.softmax_topk(x.cpu(), k)
        assert torch.equal(indices.cpu(), ic)
        torch.testing.assert_close(values.cpu(), vc)


@pytest.mark.parametrize("log", [False, True])
def test_topk_backward_matches_unfused(log):
    x = random_logits((5, 70001), torch.float32, "cuda").requires_grad_()
    g = random_logits((5, 33), torch.float32, "cuda", seed=3)
    values, indices = osm.softmax_topk(x, 33, log=log)
    (values * g).sum().backward()
    xr = x.detach().double().requires_grad_()
    full = (torch.log_softmax if log else torch.softmax)(xr, -1)
    (full.gather(-1, indices) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-9)


def test_topk_backward_sums_repeated_indices_and_rejects_bad_ones():
    x = random_logits((2, 100), torch.float32, "cuda")
    m, d = osm.softmax_stats(x)
    idx = torch.tensor([[3, 3, 7], [0, 99, 0]], device="cuda")
    g = torch.ones(2, 3, device="cuda")
    got = torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1, False, 1.0)
    want = torch.ops.online_softmax.softmax_topk_backward(g.cpu(), x.cpu(), idx.cpu(), m.cpu(), d.cpu(), -1, False, 1.0)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(IndexError, match="indices"):
        torch.ops.online_softmax.softmax_topk_backward(g, x, idx + 100, m, d, -1, False, 1.0)


def test_backward_boundaries_and_dtypes():
    for dtype in FLOAT_DTYPES:
        for n in boundary_lengths(dtype)[::3]:
            for log in (False, True):
                x = random_logits((3, n), dtype, "cuda", seed=n).requires_grad_()
                g = random_logits((3, n), dtype, "cuda", seed=n + 1)
                fn = osm.log_softmax if log else osm.softmax
                fn(x, dim=-1).backward(g)
                xr = x.detach().double().requires_grad_()
                (torch.log_softmax if log else torch.softmax)(xr, -1).backward(g.double())
                tol = 3e-2 if dtype in LOW_PRECISION else (1e-10 if dtype == torch.float64 else 1e-4)
                torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol * 1e-2)


def test_half_input_float_output_and_grad():
    x = random_logits((4, 5000), torch.float16, "cuda").requires_grad_()
    y = osm.softmax(x, dim=-1, dtype=torch.float32)
    assert y.dtype == torch.float32
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == torch.float16


def test_non_default_stream():
    x = random_logits((64, 40001), torch.float32, "cuda")
    want = torch.softmax(x, -1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = osm.softmax(x, dim=-1)
        v, i = osm.softmax_topk(x, 10)
        m, d = osm.softmax_stats(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(v, want.topk(10).values)


def test_gradcheck_float64_cuda():
    x = random_logits((3, 37), torch.float64, "cuda").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: osm.softmax(t, dim=-1, temperature=0.7), (x,))
    assert torch.autograd.gradcheck(lambda t: osm.log_softmax(t, dim=0), (x,))
    assert torch.autograd.gradcheck(lambda t: osm.softmax_topk(t, 5).values, (x,))
    assert torch.autograd.gradgradcheck(lambda t: osm.softmax(t, dim=-1), (x,))


def test_opcheck_on_cuda_tensors():
    from torch.library import opcheck
    x = random_logits((6, 300), torch.float32, "cuda").requires_grad_()
    xb = random_logits((4, 5000), torch.bfloat16, "cuda")
    ops = torch.ops.online_softmax
    opcheck(ops.forward.default, (x, -1, False, 1.0, None))
    opcheck(ops.forward.default, (xb, 0, True, 0.5, torch.float32))
    opcheck(ops.stats.default, (x, 1, 2.0))
    opcheck(ops.softmax_topk.default, (x, 7, -1, False, 1.0))
    y = ops.forward(x.detach(), -1, False, 1.0, None)
    opcheck(ops.backward.default, (torch.randn_like(y), y, -1, False, 1.0, None))
    v, i, m, d = ops.softmax_topk(x.detach(), 7, -1, False, 1.0)
    opcheck(ops.softmax_topk_backward.default, (torch.randn_like(v), x.detach(), i, m, d, -1, False, 1.0))


def test_torch_compile_fullgraph_cuda():
    def f(x):
        v, i = osm.softmax_topk(x, 4)
        return osm.softmax(x, dim=-1) * 2, osm.log_softmax(x, dim=0), v, i

    x = random_logits((16, 1000), torch.float32, "cuda")
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(x), f(x)):
        torch.testing.assert_close(got, want)


def test_mixed_devices_raise():
    x = random_logits((2, 10), torch.float32, "cuda")
    y = osm.softmax(x, dim=-1)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.online_softmax.backward(y.cpu(), y, -1, False, 1.0, None)
