"""The CUDA kernels' test bodies: every kernel's size boundaries, alignment, poisoned outputs,
streams, opcheck, torch.compile and agreement with the CPU backend.

Every test body runs on CUDA when a GPU and a CUDA build are present, and on the CPU backend always
(the `device` fixture), so the bodies themselves are exercised on every CI run. On the CPU the largest
shapes are trimmed (CPU_MAX_ELEMENTS) to keep CI's time; what only a GPU has (streams, poisoned
caching-allocator memory, device mixing) skips there.
"""

import pytest
import torch

import online_softmax as osm
from testlib import (DEVICES, FLOAT_DTYPES, LOW_PRECISION, assert_cross_entropy_grad, assert_matches_reference,
                      backward_atol, backward_ref, cross_entropy_case, random_logits)

needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and a CUDA build of online_softmax")
CPU_MAX_ELEMENTS = 2_000_000


def too_big(device, elements):
    return elements > (30_000_000 if device == "cuda" else CPU_MAX_ELEMENTS)


def f64(x):
    """A float64 copy that owns its grad (x.double() is x itself when x is float64)."""
    return x.detach().to(torch.float64, copy=True)


def assert_backward_close(dx, g, y, log, dim=-1):
    """dx against the float64 backward of the same rounded inputs, rounded to dx's dtype: one unit
    in the last place, plus the float32 (float64) accumulation error of the row sum times |y|."""
    rtol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dx.dtype, torch.finfo(dx.dtype).eps)
    torch.testing.assert_close(dx.double(), backward_ref(g, y, log, dim), rtol=rtol, atol=backward_atol(g, y, log, dim))


REFS = {
    "softmax": (lambda x: torch.softmax(x, -1), osm.softmax),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), osm.log_softmax),
}


def poison_cache(device="cuda"):
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel forgets to
    write reads NaN instead of a plausible stale value (CUDA only)."""
    if device != "cuda":
        return
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
def test_every_kernel_boundary(device, name, dtype, rows):
    torch_fn, ours_fn = REFS[name]
    for n in boundary_lengths(dtype):
        if too_big(device, rows * n):
            continue
        x = random_logits((rows, n), dtype, device, seed=n)
        poison_cache(device)
        y = ours_fn(x, dim=-1)
        assert not torch.isnan(y).any(), f"unwritten output at n={n}"
        assert_matches_reference(y, x, lambda t: torch_fn(t), lambda t: torch_fn(t))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_misaligned_rows(device, dtype, offset):
    """Rows that start off a 16-byte boundary (storage offset, odd row length) take the head path."""
    for rows, n in [(5, 37), (3, 1001), (2, 20001), (1, 300001)]:
        flat = random_logits((rows * n + offset,), dtype, device, seed=n)
        x = flat[offset:].view(rows, n)
        assert x.is_contiguous() and x.data_ptr() % 16 != 0
        y = osm.softmax(x, dim=-1)
        assert_matches_reference(y, x, lambda t: torch.softmax(t, -1), lambda t: torch.softmax(t, -1))
        # The backward op on misaligned y and dy views (autograd would hand it fresh, aligned ones).
        for log in (False, True):
            y_flat = torch.empty(rows * n + offset, dtype=dtype, device=device)
            y = y_flat[offset:].view(rows, n)
            y.copy_((osm.log_softmax if log else osm.softmax)(x, dim=-1))
            g_flat = random_logits((rows * n + offset,), dtype, device, seed=1)
            g = g_flat[offset:].view(rows, n)
            dx = torch.ops.online_softmax.backward(g, y, -1, log, 1.0, None)
            assert_backward_close(dx, g, y, log)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((4, 3000, 7), 1), ((2, 5, 70000), 1), ((65, 2, 33), 0), ((3, 1, 5), 1)])
def test_strided_dim(device, dtype, shape, dim):
    x = random_logits(shape, dtype, device)
    poison_cache(device)
    for fn, ref in ((osm.softmax, torch.softmax), (osm.log_softmax, torch.log_softmax)):
        y = fn(x, dim=dim)
        assert_matches_reference(y, x, lambda t: ref(t, dim), lambda t: ref(t, dim))
    state = osm.softmax_stats(x, dim=dim)
    torch.testing.assert_close(state.max.double() + state.sumexp.double().log(), torch.logsumexp(x.double(), dim),
                               rtol=1e-5, atol=1e-5)


@needs_cuda
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
def test_special_value_rows(device, dtype, length):
    inf, nan = float("inf"), float("nan")
    x = random_logits((6, length), dtype, device)
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
def test_topk_split_and_boundaries(device, dtype, log, rows, n, k):
    if too_big(device, rows * n):
        pytest.skip(f"{rows} x {n} is trimmed on the CPU (CPU_MAX_ELEMENTS)")
    x = random_logits((rows, n), dtype, device, seed=k)
    poison_cache(device)
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


def test_topk_ties_and_nan_order(device):
    """Ties go to the lower index and NaN ranks first, across chunk boundaries of a split row."""
    n = 1_000_003
    x = torch.zeros(2, n, device=device)
    hot = torch.tensor([999_999, 5, 500_000, 17, 250_001])
    x[:, hot] = 3.0
    x[1, 700_000] = float("nan")
    values, indices = osm.softmax_topk(x, 4)
    assert indices[0].tolist() == sorted(hot.tolist())[:4]
    assert indices[1, 0].item() == 700_000 and torch.isnan(values[1]).all()


def test_topk_large_k_takes_sort_path_with_same_answers(device):
    x = random_logits((3, 5000), torch.float32, device)
    x[0, :100] = 2.0  # ties
    for k in (2048, 2049, 5000):
        values, indices = osm.softmax_topk(x, k)
        vc, ic = osm.softmax_topk(x.cpu(), k)
        assert torch.equal(indices.cpu(), ic)
        torch.testing.assert_close(values.cpu(), vc)


@pytest.mark.parametrize("log", [False, True])
def test_topk_backward_matches_unfused(device, log):
    x = random_logits((5, 70001), torch.float32, device).requires_grad_()
    g = random_logits((5, 33), torch.float32, device, seed=3)
    values, indices = osm.softmax_topk(x, 33, log=log)
    (values * g).sum().backward()
    xr = f64(x).requires_grad_()
    full = (torch.log_softmax if log else torch.softmax)(xr, -1)
    (full.gather(-1, indices) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-9)


def test_topk_backward_sums_repeated_indices_and_rejects_bad_ones(device):
    x = random_logits((2, 100), torch.float32, device)
    state = osm.softmax_stats(x)
    m, d = state.max, state.sumexp
    idx = torch.tensor([[3, 3, 7], [0, 99, 0]], device=device)
    g = torch.ones(2, 3, device=device)
    got = torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1, False, 1.0)
    # Against the unfused gradient: repeated indices add up.
    xr = f64(x).requires_grad_()
    (torch.softmax(xr, -1).gather(-1, idx) * g.double()).sum().backward()
    torch.testing.assert_close(got.double(), xr.grad, rtol=1e-5, atol=1e-7)
    if device == "cpu":
        with pytest.raises(IndexError, match="indices"):
            torch.ops.online_softmax.softmax_topk_backward(g, x, idx + 100, m, d, -1, False, 1.0)


CUDA_BAD_INDEX = """
import torch, online_softmax
x = torch.randn(2, 100, device="cuda")
m, d = torch.ops.online_softmax.stats(x, -1)
idx = torch.tensor([[3, 3, 7], [0, 199, 0]], device="cuda")
torch.ops.online_softmax.softmax_topk_backward(torch.ones(2, 3, device="cuda"), x, idx, m, d, -1, False, 1.0)
torch.cuda.synchronize()
"""


@needs_cuda
def test_cuda_topk_backward_bad_index_is_a_device_side_assert():
    """On CUDA the index check is asynchronous (the kernel flags, torch._assert_async raises), as
    torch.gather's is; it poisons the CUDA context, so it runs in a child process."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", CUDA_BAD_INDEX], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "indices must lie in [0, n)" in run.stderr or "device-side assert" in run.stderr, run.stderr[-2000:]


@needs_cuda
def test_cuda_topk_backward_is_captured_by_a_cuda_graph():
    """No host synchronization in the top-k backward: it records into a CUDA graph and replays."""
    x = random_logits((4, 50000), torch.float32, "cuda")
    values, idx, m, d = torch.ops.online_softmax.softmax_topk(x, 8, -1)
    g = torch.randn(4, 8, device="cuda")
    torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1, False, 1.0)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dx = torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1, False, 1.0)
    graph.replay()
    torch.cuda.synchronize()
    want = torch.ops.online_softmax.softmax_topk_backward(g, x, idx, m, d, -1, False, 1.0)
    torch.testing.assert_close(dx, want)


def test_backward_boundaries_and_dtypes(device):
    for dtype in FLOAT_DTYPES:
        for n in boundary_lengths(dtype)[::3]:
            for log in (False, True):
                x = random_logits((3, n), dtype, device, seed=n).requires_grad_()
                g = random_logits((3, n), dtype, device, seed=n + 1)
                fn = osm.log_softmax if log else osm.softmax
                y = fn(x, dim=-1)
                y.backward(g)
                # The backward sees y rounded to dtype: the reference uses that same y.
                assert_backward_close(x.grad, g, y.detach(), log)
                if dtype not in LOW_PRECISION:  # and, where rounding is negligible, torch's own gradient
                    xr = f64(x).requires_grad_()
                    (torch.log_softmax if log else torch.softmax)(xr, -1).backward(g.double())
                    tol = 1e-10 if dtype == torch.float64 else 1e-4
                    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol * 1e-2)


def test_half_input_float_output_and_grad(device):
    x = random_logits((4, 5000), torch.float16, device).requires_grad_()
    y = osm.softmax(x, dim=-1, dtype=torch.float32)
    assert y.dtype == torch.float32
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == torch.float16


@needs_cuda
def test_non_default_stream():
    x = random_logits((64, 40001), torch.float32, "cuda")
    want = torch.softmax(x, -1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = osm.softmax(x, dim=-1)
        v, i = osm.softmax_topk(x, 10)
        state = osm.softmax_stats(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(v, want.topk(10).values)
    torch.testing.assert_close(state.logsumexp(), torch.logsumexp(x, -1))


def test_gradcheck_float64(device):
    x = random_logits((3, 37), torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: osm.softmax(t, dim=-1, temperature=0.7), (x,))
    assert torch.autograd.gradcheck(lambda t: osm.log_softmax(t, dim=0), (x,))
    assert torch.autograd.gradcheck(lambda t: osm.softmax_topk(t, 5).values, (x,))
    # The backward op has its own (torch-op) derivative, so second derivatives are right...
    assert torch.autograd.gradgradcheck(lambda t: osm.softmax(t, dim=-1, temperature=0.7), (x,))
    assert torch.autograd.gradgradcheck(lambda t: osm.log_softmax(t, dim=0), (x,))
    # The top-k's gradient is written in differentiable ops where it must be differentiable...
    assert torch.autograd.gradgradcheck(lambda t: osm.softmax_topk(t, 5, log=True).values, (x,))
    # ...while its backward op, differentiated directly, says it has no derivative instead of
    # PyTorch's silent zeros.
    v, i, m, d = torch.ops.online_softmax.softmax_topk(x, 5, -1, False, 1.0)
    gv = torch.ones_like(v).requires_grad_()
    dx = torch.ops.online_softmax.softmax_topk_backward(gv, x, i, m, d, -1, False, 1.0)
    with pytest.raises(NotImplementedError, match="softmax_topk_backward has no derivative"):
        dx.sum().backward()


def test_opcheck(device):
    from torch.library import opcheck
    x = random_logits((6, 300), torch.float32, device).requires_grad_()
    xb = random_logits((4, 5000), torch.bfloat16, device)
    ops = torch.ops.online_softmax
    opcheck(ops.forward.default, (x, -1, False, 1.0, None))
    opcheck(ops.forward.default, (xb, 0, True, 0.5, torch.float32))
    opcheck(ops.stats.default, (x, 1, 2.0))
    opcheck(ops.softmax_topk.default, (x, 7, -1, False, 1.0))
    y = ops.forward(x.detach(), -1, False, 1.0, None)
    opcheck(ops.backward.default, (torch.randn_like(y), y, -1, False, 1.0, None))
    v, i, m, d = ops.softmax_topk(x.detach(), 7, -1, False, 1.0)
    opcheck(ops.softmax_topk_backward.default, (torch.randn_like(v), x.detach(), i, m, d, -1, False, 1.0))


def test_torch_compile_fullgraph(device):
    def f(x):
        v, i = osm.softmax_topk(x, 4)
        return osm.softmax(x, dim=-1) * 2, osm.log_softmax(x, dim=0), v, i

    x = random_logits((16, 1000), torch.float32, device)
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(x), f(x)):
        torch.testing.assert_close(got, want)


@needs_cuda
def test_mixed_devices_raise():
    x = random_logits((2, 10), torch.float32, "cuda")
    y = osm.softmax(x, dim=-1)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.online_softmax.backward(y.cpu(), y, -1, False, 1.0, None)


# ---- cross_entropy_backward, cross_entropy_backward_ ----

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cross_entropy_backward_boundaries(device, dtype):
    """Rows around every register configuration's capacity and in the chunked range, aligned and
    not, with and without smoothing and class weights, against the float64 formula."""
    poison_cache(device)
    smoothing = [(False, False), (True, False), (True, True)]
    for i, n in enumerate(boundary_lengths(dtype)):
        if too_big(device, 3 * n):
            continue
        smooth, weight = smoothing[i % 3]
        args = cross_entropy_case(3, n, dtype, device=device, seed=n, offset=i % 2, smooth=smooth, weight=weight)
        out = torch.ops.online_softmax.cross_entropy_backward(**args)
        assert_cross_entropy_grad(out, args, what=f"n={n} {dtype} smooth={smooth} weight={weight}")
        # The in-place form writes the same values over its (misaligned, for odd i) input.
        inplace = args["x"].new_empty(3 * n + i % 2)[i % 2:].view(3, n).copy_(args["x"])
        torch.ops.online_softmax.cross_entropy_backward_(inplace, **{k: v for k, v in args.items() if k != "x"})
        assert_cross_entropy_grad(inplace, args, what=f"in place: n={n} {dtype} smooth={smooth} weight={weight}")


@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (300, 1000), (5, 40001), (2, 300001), (4096, 10)])
def test_cross_entropy_backward_matches_cpu_backend(dtype, shape):
    args = cross_entropy_case(*shape, dtype, smooth=True, weight=True)
    args["x"][0, 0] = float("-inf")
    args["x"][-1, -1] = float("nan")
    args["max"][0], args["sumexp"][0] = float("-inf"), 0.0
    want = torch.ops.online_softmax.cross_entropy_backward(**args)
    got = torch.ops.online_softmax.cross_entropy_backward(**{k: v if v is None else v.cuda() for k, v in args.items()})
    assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
    assert_cross_entropy_grad(got, args, what=f"{shape} {dtype}")


CUDA_BAD_TARGET = """
import torch, online_softmax
x = torch.randn(2, 100, device="cuda")
m, d = torch.ops.online_softmax.stats(x, 1)
ones = torch.ones(2, device="cuda")
torch.ops.online_softmax.cross_entropy_backward(x, m, d, torch.tensor([3, 100], device="cuda"), ones, ones)
torch.cuda.synchronize()
"""


@needs_cuda
def test_cuda_cross_entropy_backward_bad_target_is_a_device_side_assert():
    """As the top-k backward's indices: the kernel flags, torch._assert_async raises, in a child
    process (the assert poisons the CUDA context)."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", CUDA_BAD_TARGET], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "target must lie in [0" in run.stderr or "device-side assert" in run.stderr, run.stderr[-2000:]


@needs_cuda
def test_cuda_cross_entropy_backward_on_a_stream_and_in_a_cuda_graph():
    args = cross_entropy_case(64, 50000, torch.bfloat16, device="cuda", smooth=True, weight=True)
    want = torch.ops.online_softmax.cross_entropy_backward(**args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.online_softmax.cross_entropy_backward(**args)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.online_softmax.cross_entropy_backward(**args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, want)
