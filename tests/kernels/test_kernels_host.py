"""The CUDA kernels of csrc/kernels, executed on the CPU by the project's host runtime.

Every launcher of launchers.h, every dtype instantiation, on shapes chosen so that each plan path
runs (each register configuration at and around its capacity, shared memory, split for long rows
and for few rows, strided, grids smaller than the row count), with hostile values, against float64
torch. The launch log shows which kernels ran, so each test also asserts the path it meant to take.
This proves the arithmetic, the plans and the bounds; it does not prove the GPU memory model,
alignment faults, resource limits or speed (see csrc/kernels/host/runtime.h).
"""

import os
import subprocess

import pytest
import torch

import host_kernels as hkmod
from testlib import backward_atol, backward_ref
from host_kernels import HostKernelError, HostKernels, Limits, assert_ran, plan_for

pytestmark = hkmod.requires_toolchain()

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = (torch.float16, torch.bfloat16)
REGISTER_CAPACITIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]  # granules (launch_plan.h)
INVALID_VALUE = 1  # cudaErrorInvalidValue


# The schedule every test runs under: in_order (default), reversed, or random:SEED
# (scripts/barrier_mutants.py runs the module under each).
SCHEDULE = os.environ.get("ONLINE_SOFTMAX_HOST_SCHEDULE", "in_order")


def default_schedule(kernels):
    name, _, seed = SCHEDULE.partition(":")
    kernels.set_schedule(name, int(seed or 0))


@pytest.fixture(scope="module")
def hk():
    kernels = HostKernels()
    default_schedule(kernels)
    yield kernels
    default_schedule(kernels)


def vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def logits(shape, dtype, seed=0, scale=3.0, offset=0):
    """Random logits rounded to dtype; with `offset`, a contiguous view `offset` elements into its
    storage, so row starts are off a 16-byte boundary."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    flat = (torch.randn(n + offset, generator=g, dtype=torch.float64) * scale).to(dtype)
    return flat[offset:].view(shape)


def eps(dtype):
    return torch.finfo(dtype).eps


def assert_close_to(ours, ref64, dtype, *, what, atol=None):
    """ours (any dtype) against a float64 reference computed from the same rounded inputs.

    Tolerances from first principles: float16/bfloat16 outputs are float32 results rounded once,
    so they may differ from the float64 value rounded to the dtype by one unit in the last place;
    float32 carries float32 accumulation error; float64 is near exact. NaN must match exactly.
    """
    ours = ours.double()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref64)), f"{what}: NaN pattern differs"
    rtol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, eps(dtype))
    if atol is None:
        # float16/bfloat16: the spacing of their subnormals
        atol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, torch.finfo(dtype).smallest_normal * eps(dtype))
    torch.testing.assert_close(ours, ref64, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def softmax_ref(x, dim, scale, log):
    x64 = x.double() * scale
    return torch.log_softmax(x64, dim) if log else torch.softmax(x64, dim)


def check_forward(hk, x, layout, dim, *, scale=1.0, log=False, limits=Limits(), expect=None, out_dtype=None):
    hk.launches()  # forget earlier launches
    y, m, d = hk.forward(x, layout, scale=scale, log=log, limits=limits, out_dtype=out_dtype)
    assert_ran(hk, plan_for("forward", layout, x.dtype, limits, dim=1, out_dtype=out_dtype), expect)
    ref = softmax_ref(x, dim, scale, log)
    out_dtype = out_dtype or x.dtype
    assert_close_to(y, ref, out_dtype, what=f"y {tuple(x.shape)} {x.dtype} log={log}",
                    atol=None if not log else {torch.float64: 1e-10}.get(out_dtype, 1e-5))
    # The state: max of x * scale, and sumexp of exp(x * scale - max).
    x64 = x.double() * scale
    want_m = x64.amax(dim)
    want_d = torch.exp(x64 - want_m.unsqueeze(dim)).sum(dim)
    finite = torch.isfinite(want_m)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m, d = m.view(want_m.shape), d.view(want_m.shape)
    assert_close_to(m[finite], want_m[finite], acc, what="max", atol=1e-6 * float(want_m[finite].abs().max() if
                                                                             finite.any() else 1))
    assert_close_to(d[finite], want_d[finite], acc, what="sumexp")
    return y, m, d


# ---- forward: every plan path ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_forward_register_configs_at_and_around_capacity(hk, dtype, log):
    v = vec(dtype)
    for cap in REGISTER_CAPACITIES:
        # The largest row a config takes whatever its alignment, and one element more (the next config).
        fit = cap * v - (v - 1)
        past = {fit + 1} if cap != REGISTER_CAPACITIES[-1] else set()  # past the last: shared/split
        for n in sorted({max(1, fit - 1), fit} | past):
            for offset in (0, 1):
                x = logits((3, n), dtype, seed=n + offset, offset=offset)
                check_forward(hk, x, (3, n, 1), -1, log=log, expect=["register_rows_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_shared_memory_path_at_its_limit(hk, dtype):
    v = vec(dtype)
    n = 4096 * v + 5  # just past the register configurations
    granules = (n + 2 * v - 2) // v
    fits = Limits(num_sms=1, max_smem_per_block=granules * 16 + 2048)
    too_small = Limits(num_sms=1, max_smem_per_block=granules * 16 + 2047)
    for offset in (0, 3):
        x = logits((2, n), dtype, seed=offset, offset=offset)
        check_forward(hk, x, (2, n, 1), -1, limits=fits, expect=["shared_row_kernel"])
        check_forward(hk, x, (2, n, 1), -1, log=True, limits=fits, expect=["shared_row_kernel"])
        check_forward(hk, x, (2, n, 1), -1, limits=too_small, expect=["partial_states_kernel", "split_output_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_forward_split_for_few_rows_and_long_rows(hk, dtype, log):
    v = vec(dtype)
    split = ["partial_states_kernel", "split_output_kernel"]
    # Few rows (fewer than SMs) of >= 1024 granules: cut into chunks to fill the GPU.
    n = 1024 * v + 3
    x = logits((3, n), dtype, seed=1, offset=1)
    check_forward(hk, x, (3, n, 1), -1, log=log, limits=Limits(num_sms=16, max_smem_per_block=1 << 20), expect=split)
    # Rows too long for registers and shared memory; chunks of 4096 granules plus a ragged last one.
    n = 2 * 4096 * v + 77
    x = logits((2, n), dtype, seed=2)
    check_forward(hk, x, (2, n, 1), -1, log=log, limits=Limits(num_sms=1, max_smem_per_block=16 * 1024), expect=split)


def test_backward_grids_smaller_than_the_row_count(hk):
    """More rows than the 64-block grid: a block's next row must not overwrite shared memory that
    slower warps still read (the trailing barriers of block_sum and of the shared-memory kernel)."""
    for rows, n, limits, kernel in [(9000, 3, Limits(), "register_rows_backward_kernel"),
                                    (70, 3000, Limits(), "register_rows_backward_kernel"),  # 256-thread rows
                                    (70, 2048 * 4 + 3, Limits(1, 200 * 1024), "shared_row_backward_kernel")]:
        for log in (False, True):
            x = logits((rows, n), torch.float32, seed=3)
            dy, y = grads_for(x, -1, log, torch.float32)
            check_backward(hk, dy, y, (rows, n, 1), log=log, limits=limits, expect=[kernel])
    x = logits((70, 3), torch.float32, seed=3)  # topk backward: one block per row, 70 rows
    _, indices, m, d = hk.softmax_topk(x, 2)
    g = logits((70, 2), torch.float32, seed=1)
    indices, order = indices.sort(-1)
    g = g.gather(-1, order).contiguous()
    dx = hk.softmax_topk_backward(g, x, indices.contiguous(), m, d)
    assert_close_to(dx, topk_backward_ref(g, x, indices, 1.0, False), torch.float32, what="70-row top-k dx")


def test_forward_grids_smaller_than_the_row_count(hk):
    """capped_grid keeps grids at 64 blocks per SM: the kernels loop over the rest of the rows."""
    x = logits((9000, 3), torch.float32, seed=3)  # 128 rows per block would need 71 blocks
    check_forward(hk, x, (9000, 3, 1), -1, expect=["register_rows_kernel"])
    v = vec(torch.float32)
    n = 4096 * v + 9
    x = logits((70, n), torch.float32, seed=4)  # 70 rows, one block each, on a 64-block grid
    check_forward(hk, x, (70, n, 1), -1, limits=Limits(1, 200 * 1024), expect=["shared_row_kernel"])
    n = 4096 * v + 9
    x = logits((40, n), torch.float32, seed=5)  # 40 rows x 2 chunks = 80 blocks on 64
    check_forward(hk, x, (40, n, 1), -1, limits=Limits(1, 16 * 1024),
                  expect=["partial_states_kernel", "split_output_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
# (70, 5, 3): more tiles than the 64-block grid, so a block reuses its shared states for a next tile.
@pytest.mark.parametrize("shape,dim", [((3, 7, 5), 1), ((2, 300, 33), 1), ((1, 1, 2), 1), ((4, 5, 64), 1),
                                       ((65, 3), 0), ((2, 1000, 3), 1), ((70, 5, 3), 1)])
def test_forward_strided(hk, dtype, shape, dim):
    x = logits(shape, dtype, seed=sum(shape))
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = 1
    for s in shape[dim + 1:]:
        inner *= s
    for log in (False, True):
        check_forward(hk, x, (outer, shape[dim], inner), dim, log=log, expect=["strided_kernel"])


STRIDED = ["strided_kernel"]
STRIDED_SPLIT = ["strided_partial_states_kernel", "strided_split_output_kernel"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_strided_vector_columns_split_and_register_cache(hk, dtype):
    """inner a multiple of a granule: a thread reads its columns as one 16-byte vector (odd inner:
    one column each); columns of up to blockDim.y * kStridedCache positions are read once, longer
    ones twice; few columns of many positions are split along the dim (partial states, merge)."""
    v = vec(dtype)
    cases = [((2, 50, 2 * v), Limits(), STRIDED),             # vector columns, cached
             ((2, 50, 2 * v + 1), Limits(), STRIDED),         # scalar columns
             ((1, 1500, v), Limits(64), STRIDED),             # not cached (> y * 8), not split
             ((1, 9000, v), Limits(4), STRIDED_SPLIT),        # split, vector columns
             ((3, 7001, 3), Limits(8), STRIDED_SPLIT),        # split, scalar columns, ragged last chunk
             ((40, 3, 4 * v), Limits(1), STRIDED)]            # tiles x outer beyond the 64-block grid
    for shape, limits, expect in cases:
        for offset in (0, 1):                                 # aligned, and off a 16-byte boundary
            x = logits(shape, dtype, seed=shape[1], offset=offset)
            for log in (False, True):
                check_forward(hk, x, shape, 1, log=log, scale=0.7, limits=limits, expect=expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_strided_vector_columns_split_and_register_cache(hk, dtype):
    v = vec(dtype)
    for shape, limits, expect in [((2, 30, 2 * v), Limits(), ["strided_backward_kernel"]),
                                  ((1, 1500, v), Limits(64), ["strided_backward_kernel"]),
                                  ((1, 9000, v), Limits(4), ["strided_partial_sums_kernel",
                                                             "strided_split_backward_kernel"]),
                                  ((2, 5001, 3), Limits(8), ["strided_partial_sums_kernel",
                                                             "strided_split_backward_kernel"])]:
        x = logits(shape, dtype, seed=shape[1])
        for log in (False, True):
            y = softmax_ref(x, 1, 1.0, log).to(dtype).contiguous()
            dy = logits(shape, dtype, seed=3, scale=1.0)
            check_backward(hk, dy, y, shape, log=log, scale=1.5, limits=limits, expect=expect)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_input_float_output(hk, dtype):
    v = vec(dtype)
    for n, limits, kernel in [(33, Limits(), ["register_rows_kernel"]),
                              (4096 * v + 1, Limits(1, 300 * 1024), ["shared_row_kernel"]),
                              (1024 * v + 1, Limits(8, 1 << 20), ["partial_states_kernel", "split_output_kernel"])]:
        x = logits((2, n), dtype, seed=n)
        check_forward(hk, x, (2, n, 1), -1, limits=limits, expect=kernel, out_dtype=torch.float32)


# ---- hostile values ----

def hostile_rows(n, dtype):
    inf, nan = float("inf"), float("nan")
    x = logits((8, n), dtype, seed=n)
    x[0] = -inf                     # all -inf: NaN row, like torch
    x[1, n // 2] = inf              # +inf: NaN row
    x[2, n - 1] = nan               # NaN propagates to the row
    x[3, 0] = -inf                  # one -inf: probability 0
    x[4] = 7.0                      # all equal
    if dtype != torch.float16:
        x[5] = x[5] * 1e4 / 3       # 1e4-scale logits
    x[6, ::2] = -inf                # half of the row banned
    x[7, n // 3] = 60.0             # one dominant logit
    return x


FORWARD_PATHS = {
    "register": (lambda v: 333, Limits()),
    "shared": (lambda v: 4096 * v + 3, Limits(1, 400 * 1024)),
    "split": (lambda v: 1024 * v + 5, Limits(16, 1 << 20)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", list(FORWARD_PATHS))
def test_forward_special_values(hk, dtype, path):
    length, limits = FORWARD_PATHS[path]
    n = length(vec(dtype))
    x = hostile_rows(n, dtype)
    for log in (False, True):
        check_forward(hk, x, (8, n, 1), -1, log=log, limits=limits)
    # Strided, with the same rows along dim 0 (long columns are split: the plan decides).
    xt = x.t().contiguous()
    check_forward(hk, xt, (1, n, 8), 0)
    # And short columns (n = 40), read once: every hostile row's kind, as columns.
    xs = hostile_rows(40, dtype).t().contiguous()
    check_forward(hk, xs, (1, 40, 8), 0, expect=["strided_kernel"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [3.4e-39, 1e-3, 0.7, 1e30])
def test_forward_temperatures_near_the_limits(hk, dtype, temperature):
    x = logits((4, 300), dtype, seed=9)
    x[0, 5] = x[0, 7] = x[0].max()  # a tie at the max: a tiny temperature splits it evenly
    for log in (False, True):
        y, _, _ = hk.forward(x, (4, 300, 1), scale=1 / temperature, log=log)
        ref = softmax_ref(x, -1, 1 / temperature, log).to(dtype).double()  # rounded: may be -inf
        if log:
            # (x - max) / t in the kernel's float against float64: relative, including +-inf.
            torch.testing.assert_close(y.double(), ref, rtol=1e-5 if dtype != torch.bfloat16 else eps(dtype),
                                       atol=1e-5, equal_nan=True)
        else:
            assert_close_to(y, ref, dtype, what=f"t={temperature}")


@pytest.mark.parametrize("path", ["register", "shared", "split", "strided", "strided_split"])
def test_forward_optional_outputs_may_each_be_null(hk, path):
    """launchers.h: any of y, max_out and sumexp_out may be null; the others are still written."""
    dtype = torch.float32
    if path == "strided":
        x, layout, limits, dim = logits((3, 50, 4), dtype), (3, 50, 4), Limits(), 1
    elif path == "strided_split":
        x, layout, limits, dim = logits((1, 3000, 5), dtype), (1, 3000, 5), Limits(4), 1
    else:
        length, limits = FORWARD_PATHS[path]
        n = length(vec(dtype))
        x, layout, dim = logits((3, n), dtype, seed=2), (3, n, 1), -1
    y_ref = softmax_ref(x, dim, 1.0, False)
    m_ref = x.double().amax(dim).flatten()
    lse_ref = torch.logsumexp(x.double(), dim).flatten()
    hk.launches()  # forget earlier launches
    for want_y in (True, False):
        for want_m in (True, False):
            for want_d in (True, False):
                y, m, d = hk.forward(x, layout, limits=limits, y=want_y, max_out=want_m, sumexp_out=want_d)
                plan = plan_for("forward" if want_y else "stats", layout, dtype, limits, dim=1)
                assert_ran(hk, plan)
                assert plan.path == path.replace("register", "registers")
                if want_y:
                    assert_close_to(y, y_ref, dtype, what="y")
                if want_m:
                    assert_close_to(m, m_ref, torch.float32, what="max")
                if want_d:
                    assert_close_to(d.log() + m_ref.float(), lse_ref, torch.float32, what="sumexp", atol=1e-5)


def test_forward_refuses_split_plan_without_workspace(hk):
    v = vec(torch.float32)
    n = 2 * 4096 * v
    x = logits((1, n), torch.float32)
    lib = hk.lib
    y = torch.empty_like(x)
    code = lib.osm_host_forward(0, 0, x.data_ptr(), y.data_ptr(), None, None, 1, n, 1, 1.0, 0, None, 1, 16 * 1024)
    assert code == INVALID_VALUE


# ---- backward ----

def check_backward(hk, dy, y, layout, *, scale=1.0, log=False, limits=Limits(), expect=None, dx_dtype=None):
    hk.launches()  # forget earlier launches
    dx = hk.backward(dy, y, layout, scale=scale, log=log, limits=limits, dx_dtype=dx_dtype)
    assert_ran(hk, plan_for("backward", layout, y.dtype, limits, dim=1, out_dtype=dx_dtype), expect)
    # The reference on the same rounded y and dy, in float64, along the size dim of the layout.
    dy3, y3 = dy.reshape(layout), y.reshape(layout)
    ref = backward_ref(dy3, y3, log, dim=1, scale=scale).reshape(dx.shape)
    atol = backward_atol(dy3, y3, log, dim=1, scale=scale)
    assert_close_to(dx, ref, dx_dtype or y.dtype, what=f"dx {tuple(y.shape)} log={log}", atol=atol)


def grads_for(x, dim, log, dtype):
    """y as the forward would hand it to the backward (rounded to dtype), and a random dy."""
    y = softmax_ref(x, dim, 1.0, log).to(dtype)
    dy = logits(x.shape, dtype, seed=11, scale=1.0)
    return dy.contiguous(), y.contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_backward_register_configs_and_shared_and_split(hk, dtype, log):
    v = vec(dtype)
    caps = REGISTER_CAPACITIES[:-1]  # the backward holds two rows: its largest config is 2048 granules
    for cap in caps:
        fit = cap * v - (v - 1)
        for n in sorted({max(1, fit - 1), fit} | ({fit + 1} if cap != caps[-1] else set())):
            x = logits((3, n), dtype, seed=n, offset=1)
            dy, y = grads_for(x, -1, log, dtype)
            check_backward(hk, dy, y, (3, n, 1), log=log, scale=0.5, expect=["register_rows_backward_kernel"])
    n = 2048 * v + 3
    x = logits((2, n), dtype, seed=5)
    dy, y = grads_for(x, -1, log, dtype)
    check_backward(hk, dy, y, (2, n, 1), log=log, limits=Limits(1, 400 * 1024), expect=["shared_row_backward_kernel"])
    check_backward(hk, dy, y, (2, n, 1), log=log, limits=Limits(1, 16 * 1024),
                   expect=["partial_sums_kernel", "split_backward_kernel"])
    n = 1024 * v + 1
    x = logits((3, n), dtype, seed=6)
    dy, y = grads_for(x, -1, log, dtype)
    check_backward(hk, dy, y, (3, n, 1), log=log, limits=Limits(8, 1 << 20),
                   expect=["partial_sums_kernel", "split_backward_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_strided(hk, dtype):
    for shape in [(3, 7, 5), (2, 301, 33), (1, 2, 64), (70, 5, 3)]:
        x = logits(shape, dtype, seed=shape[1])
        for log in (False, True):
            y = softmax_ref(x, 1, 1.0, log).to(dtype).contiguous()
            dy = logits(shape, dtype, seed=3, scale=1.0)
            check_backward(hk, dy, y, shape, log=log, expect=["strided_backward_kernel"])


@pytest.mark.parametrize("dx_dtype", [torch.float16, torch.bfloat16])
def test_backward_float_y_half_dx(hk, dx_dtype):
    """The backward of forward(x_half, dtype=float32): float32 y and dy, dx in x's dtype."""
    for n, limits in [(37, Limits()), (2048 * 4 + 1, Limits(1, 400 * 1024)), (4096 * 4 + 1, Limits(1, 16 * 1024))]:
        x = logits((2, n), torch.float32, seed=n)
        dy, y = grads_for(x, -1, False, torch.float32)
        check_backward(hk, dy, y, (2, n, 1), limits=limits, dx_dtype=dx_dtype)


# ---- fused top-k ----

def topk_ref_indices(x, k):
    """torch.topk's order on raw x: larger first, NaN above all, ties to the lower index."""
    return torch.sort(x.double(), dim=-1, descending=True, stable=True).indices[:, :k]


def check_topk(hk, x, k, *, scale=1.0, log=False, limits=Limits(), expect=None):
    hk.launches()  # forget earlier launches
    values, indices, m, d = hk.softmax_topk(x, k, scale=scale, log=log, limits=limits)
    assert_ran(hk, plan_for("softmax_topk", tuple(x.shape), x.dtype, limits, k=k), expect)
    want_idx = topk_ref_indices(x, k)
    assert torch.equal(indices, want_idx), f"indices differ for {tuple(x.shape)} k={k} {x.dtype}"
    ref = softmax_ref(x, -1, scale, log).gather(-1, want_idx)
    assert_close_to(values, ref, x.dtype, what=f"top-k values k={k}",
                    atol=None if not log else {torch.float64: 1e-10}.get(x.dtype, 1e-5))
    lse = torch.logsumexp(x.double() * scale, -1)
    finite = torch.isfinite(lse)
    assert_close_to((m.double() + d.double().log())[finite], lse[finite], torch.float32, what="top-k state", atol=1e-5)
    return values, indices, m, d


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_single_chunk_paths(hk, dtype):
    max_k = hk.topk_max_k(dtype)
    # k > 32 or rows beyond a warp's 32 elements per lane take the block kernel.
    # (300, 50, 33): more rows than the 64-block grid of one SM, so blocks loop over rows.
    for rows, n, k in [(4, 37, 36), (4, 37, 37), (2, 5003, 64), (2, 5003, 8), (2, max_k + 1, max_k),
                       (3, 3 * max_k + 7, 100), (300, 50, 33)]:
        for log in (False, True):
            x = logits((rows, n), dtype, seed=n + k, offset=1)
            check_topk(hk, x, k, log=log, scale=1.3, expect=["topk_scan_kernel"])


def warp_topk_lengths(dtype):
    """Row lengths at and around the capacity of each warp top-k configuration (launch_plan.h:
    group * vecs * vec elements, at most 32 per lane)."""
    v = vec(dtype)
    caps = sorted({g * q * v for g, q in [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (32, 1), (32, 2), (32, 4), (32, 8)]
                   if q * v <= 32})
    return sorted({n for c in caps for n in (c - 1, c, c + 1) if 1 <= n <= caps[-1]})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_topk_warp_kernel_at_and_around_each_capacity(hk, dtype, log):
    for n in warp_topk_lengths(dtype):
        for k in sorted({1, min(n, 2), min(n, 8), min(n, 32)}):
            # Aligned rows, and rows a few elements off a 16-byte boundary (scalar loads).
            for offset in (0, 1):
                x = logits((5, n), dtype, seed=n * 7 + k, offset=offset)
                check_topk(hk, x, k, log=log, scale=0.9, expect=["topk_warp_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_warp_kernel_ties_nan_infinities_and_grid_loops(hk, dtype):
    inf, nan = float("inf"), float("nan")
    n = 64  # the MoE-router shape: 16 lanes (fp32) per row
    x = logits((7, n), dtype, seed=1)
    x[0] = 1.0                          # all tied: indices 0..k-1
    x[1, [60, 3, 33]] = 50.0            # ties at the top, on different lanes
    x[2, 17] = nan                      # NaN first; the row's values NaN
    x[2, 5] = nan
    x[3] = -inf                         # all -inf: indices 0..k-1, values NaN
    x[4, ::3] = -inf
    x[5, 62] = inf
    x[6, 1:] = -inf                     # one finite element: k > 1 takes -inf ones by index
    for k in (1, 5, 32):
        check_topk(hk, x, k, expect=["topk_warp_kernel"])
    if dtype != torch.float16:
        check_topk(hk, logits((3, n), dtype, seed=3) * 3333, 4, expect=["topk_warp_kernel"])  # 1e4-scale
    # 1000 rows of 8: more rows than the grid of one SM holds, so blocks loop over rows.
    check_topk(hk, logits((1000, 8), dtype, seed=5), 2, expect=["topk_warp_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_topk_split_and_merge(hk, dtype, log):
    v = vec(dtype)
    n = 2048 * v + 11  # few rows of >= 2048 granules are chunked
    for k in (1, 50, 600):
        x = logits((2, n), dtype, seed=k)
        check_topk(hk, x, k, log=log, limits=Limits(num_sms=8), expect=["topk_scan_kernel", "topk_merge_kernel"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ties_nan_and_infinities(hk, dtype):
    inf, nan = float("inf"), float("nan")
    for n, limits in [(300, Limits()), (2048 * vec(dtype) + 9, Limits(num_sms=8))]:
        x = logits((6, n), dtype, seed=n)
        x[0] = 1.0                               # every element tied: the first k indices
        x[1, [n - 1, 3, n // 2]] = 50.0          # ties at the top, across chunks
        x[2, n // 2] = nan                       # NaN ranks first; its row's values are NaN
        x[2, 1] = nan
        x[3] = -inf                              # all -inf: indices 0..k-1, values NaN
        x[4, ::3] = -inf
        x[5, n - 2] = inf
        check_topk(hk, x, 5, limits=limits)
        if dtype != torch.float16:
            big = logits((2, n), dtype, seed=3) * 3333  # 1e4-scale logits
            check_topk(hk, big, 5, limits=limits)
            check_topk(hk, big, 5, log=True, scale=0.5, limits=limits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_temperatures_near_the_limits(hk, dtype):
    x = logits((3, 500), dtype, seed=4)
    x[0, 9] = x[0, 20] = x[0].max()
    for temperature in (3.4e-39, 1e30):
        values, indices, _, _ = hk.softmax_topk(x, 4, scale=1 / temperature)
        assert torch.equal(indices, topk_ref_indices(x, 4))
        ref = softmax_ref(x, -1, 1 / temperature, False).gather(-1, indices).to(dtype).double()
        assert_close_to(values, ref, dtype, what=f"t={temperature}")


def test_topk_refuses_k_beyond_the_fused_kernel(hk):
    """k above topk_max_k is the binding's sort path; the launcher itself refuses it."""
    for dtype in DTYPES:
        max_k = hk.topk_max_k(dtype)
        assert max_k == (1024 if dtype == torch.float64 else 2048)
        x = logits((1, max_k + 5), dtype)
        with pytest.raises(HostKernelError) as err:
            hk.softmax_topk(x, max_k + 1)
        assert err.value.code == INVALID_VALUE


# ---- top-k backward ----

def topk_backward_ref(grad_values, x, indices, scale, log):
    x64 = x.double().requires_grad_()
    full = (torch.log_softmax if log else torch.softmax)(x64 * scale, -1)
    (full.gather(-1, indices) * grad_values.double()).sum().backward()
    return x64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_topk_backward(hk, dtype, log):
    for rows, n, k in [(3, 37, 5), (2, 5001, 64), (2, 40000, 7)]:
        x = logits((rows, n), dtype, seed=n)
        _, indices, m, d = hk.softmax_topk(x, k, scale=0.8, log=log)
        g = logits((rows, k), dtype, seed=k, scale=1.0)
        # The binding's contract: indices sorted per row, grad_values carried along.
        indices, order = indices.sort(-1)
        g = g.gather(-1, order).contiguous()
        indices = indices.contiguous()
        dx = hk.softmax_topk_backward(g, x, indices, m, d, scale=0.8, log=log)
        assert hk.launches()[-1] == "topk_backward_kernel"
        ref = topk_backward_ref(g, x, indices, 0.8, log)
        assert_close_to(dx, ref, dtype, what=f"top-k dx n={n}", atol=1e-6 if dtype != torch.float64 else 1e-12)


def test_topk_backward_large_logits_use_the_top_max(hk):
    """With 1e4-scale logits the exponent (x - M) s + (M s - max) keeps its digits only with M the
    row max that every thread agrees on (block_max, then block_sum, reuse one scratch)."""
    # 1e4-scale; shifted by 1e4 (every probability matters); shifted, narrow and short, so that
    # warps other than the first hold elements of sizeable probability (log: C = sum of g, O(1)).
    for x, log in ((logits((3, 3000), torch.float32, seed=8) * 3333, False),
                   (logits((3, 3000), torch.float32, seed=8) + 1e4, False),
                   (logits((3, 200), torch.float32, seed=8, scale=0.1) + 1e4, True)):
        _, indices, m, d = hk.softmax_topk(x, 5, log=log)
        g = logits((3, 5), torch.float32, seed=2, scale=1.0)
        indices, order = indices.sort(-1)
        g = g.gather(-1, order).contiguous()
        dx = hk.softmax_topk_backward(g, x, indices.contiguous(), m, d, log=log)
        assert_close_to(dx, topk_backward_ref(g, x, indices, 1.0, log), torch.float32, what="large-logit top-k dx")


def sorted_pairs(indices, g):
    indices, order = indices.sort(-1)
    return indices.contiguous(), g.gather(-1, order).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_topk_backward_split_across_blocks(hk, dtype, log):
    """Few long rows: each row is cut into chunks of whole granules, one block each; a block writes
    the corrections of the indices inside its chunk only (indices at chunk edges, repeated ones)."""
    v = vec(dtype)
    n = 40000 + 3
    for offset in (0, 1):
        x = logits((2, n), dtype, seed=9, offset=offset)
        _, _, m, d = hk.softmax_topk(x.contiguous(), 1, scale=0.8)
        plan = plan_for("softmax_topk_backward", (2, n), dtype, Limits(8), k=9)
        assert plan.chunks > 2
        edge = plan.chunk * v  # the first chunk boundary (in elements, for an aligned row)
        indices = torch.tensor([[0, edge - 1, edge, edge, edge + 1, n // 2, n - 2, n - 1, 5],
                                [n - 1, n - 1, 1, 2 * edge, 2 * edge - 1, 77, 3, 4, 5]])
        g = logits((2, 9), dtype, seed=4, scale=1.0)
        indices, g = sorted_pairs(indices, g)
        hk.launches()
        dx, error = hk.softmax_topk_backward(g, x.contiguous(), indices, m, d, scale=0.8, log=log,
                                             limits=Limits(8), return_error=True)
        assert_ran(hk, plan, ["topk_backward_kernel"])
        assert error == 0
        ref = topk_backward_ref(g, x, indices, 0.8, log)
        assert_close_to(dx, ref, dtype, what="split top-k dx", atol=1e-6 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("limits", [Limits(), Limits(8)])
def test_topk_backward_flags_bad_indices_and_never_touches_them(hk, limits):
    n = 20000
    x = logits((2, n), torch.float32, seed=1)
    _, _, m, d = hk.softmax_topk(x, 1)
    g = torch.ones(2, 3)
    for bad in (-1, n, n + 10 ** 6):
        indices = torch.tensor([[3, 7, 9], [0, 5, 6]])
        indices[1, 2] = bad
        indices, gg = sorted_pairs(indices, g)
        dx, error = hk.softmax_topk_backward(gg, x, indices, m, d, limits=limits, return_error=True)
        assert error == 1
        # The valid row is exact; the bad index was skipped (the buffers are exact-size tensors).
        ref = topk_backward_ref(gg[:1], x[:1], indices[:1], 1.0, False)
        assert_close_to(dx[:1], ref, torch.float32, what="valid row beside a bad one")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_topk_backward_indices_at_minus_inf_entries(hk, dtype, log):
    """Every given index at a -inf entry: softmax dx is 0 (those p are 0), log-softmax dx is the
    unfused gradient; never NaN (the exponent's reference max would be -inf)."""
    inf = float("inf")
    x = logits((2, 300), dtype, seed=2)
    x[:, 10:20] = -inf
    _, _, m, d = hk.softmax_topk(x, 1)
    indices = torch.tensor([[10, 11, 19], [12, 12, 15]])
    g = logits((2, 3), dtype, seed=5, scale=1.0)
    dx = hk.softmax_topk_backward(g, x, indices, m, d, log=log)
    assert not torch.isnan(dx).any()
    ref = topk_backward_ref(g, x, indices, 1.0, log)
    assert_close_to(dx, ref, dtype, what="dx at -inf indices", atol=1e-6 if dtype != torch.float64 else 1e-12)
    if not log:
        assert torch.count_nonzero(dx) == 0


def test_topk_backward_sums_repeated_indices(hk):
    x = logits((2, 100), torch.float32)
    _, _, m, d = hk.softmax_topk(x, 1)
    indices = torch.tensor([[3, 3, 7], [0, 0, 0]])
    g = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.25, 0.25]])
    dx = hk.softmax_topk_backward(g, x, indices, m, d)
    assert_close_to(dx, topk_backward_ref(g, x, indices, 1.0, False), torch.float32, what="repeated indices")


# ---- schedules: the same answers, bit for bit, whatever order the threads run in ----

SCHEDULE_CASES = {
    "register_warp": lambda hk: hk.forward(logits((5, 100), torch.float32), (5, 100, 1))[0],
    "register_block": lambda hk: hk.forward(logits((2, 9000), torch.float32), (2, 9000, 1))[0],
    "shared": lambda hk: hk.forward(logits((2, 17000), torch.float16), (2, 17000, 1), limits=Limits(1, 1 << 20))[0],
    "split": lambda hk: hk.forward(logits((2, 9000), torch.float64), (2, 9000, 1), limits=Limits(8, 4096))[0],
    "strided": lambda hk: hk.forward(logits((3, 20, 33), torch.bfloat16), (3, 20, 33))[0],
    "backward_block": lambda hk: hk.backward(logits((2, 6000), torch.float32), logits((2, 6000), torch.float32),
                                             (2, 6000, 1)),
    "backward_split": lambda hk: hk.backward(logits((2, 6000), torch.float32), logits((2, 6000), torch.float32),
                                             (2, 6000, 1), limits=Limits(8, 4096)),
    "topk": lambda hk: torch.cat([t.double().flatten() for t in
                                  hk.softmax_topk(logits((2, 20000), torch.float32), 300)[:2]]),
    "topk_warp": lambda hk: torch.cat([t.double().flatten() for t in
                                       hk.softmax_topk(logits((300, 500), torch.float32), 17)[:2]]),
    "strided_split": lambda hk: hk.forward(logits((1, 9000, 4), torch.float32), (1, 9000, 4), limits=Limits(4))[0],
    "topk_backward_split": lambda hk: hk.softmax_topk_backward(
        torch.ones(2, 3), logits((2, 20000), torch.float32), torch.tensor([[1, 9000, 19999], [0, 5000, 5001]]),
        torch.zeros(2), torch.full((2,), 1e4), limits=Limits(8)),
    "topk_split": lambda hk: torch.cat([t.double().flatten() for t in
                                        hk.softmax_topk(logits((2, 20000), torch.float32), 40, limits=Limits(8))[:2]]),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_results_do_not_depend_on_the_schedule(hk, case):
    run = SCHEDULE_CASES[case]
    hk.set_schedule("in_order")
    want = run(hk)
    try:
        for schedule, seed in [("reversed", 0), ("random", 1), ("random", 2)]:
            hk.set_schedule(schedule, seed)
            got = run(hk)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{case} differs under {schedule}/{seed}"
    finally:
        default_schedule(hk)
        hk.launches()


# ---- the runtime itself ----

def cuda_shuffle(kind, lane, arg, width):
    """CUDA's documented source lane for each shuffle (None: the caller's own value)."""
    segment = lane // width * width
    if kind == 0:
        src = lane ^ arg
        return None if src >= segment + width else src
    if kind == 1:
        return segment + arg % width
    if kind == 2:
        return None if lane + arg >= segment + width else lane + arg
    return None if lane - arg < segment else lane - arg


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_runtime_shuffles_follow_cuda_rules(hk, width):
    for kind in range(4):
        for arg in (0, 1, 3, 5, 16, 31):
            out = torch.zeros(32, dtype=torch.int32)
            code, msg = hk.selftest(0, out=out, a=kind, b=arg, c=width)
            assert code == 0, msg
            want = [100 + (lane if (s := cuda_shuffle(kind, lane, arg, width)) is None else s) for lane in range(32)]
            assert out.tolist() == want, (kind, arg, width)


def test_runtime_exposes_a_missing_barrier(hk):
    x = torch.randn(3 * 256)
    out = torch.zeros(3)
    for schedule in ("in_order", "reversed", "random"):
        hk.set_schedule(schedule, 5)
        assert hk.selftest(1, x, out, a=3)[0] == 0
        torch.testing.assert_close(out, x.view(3, 256).sum(-1), rtol=1e-5, atol=1e-4)
        assert hk.selftest(2, x, out, a=3)[0] == 0
        assert not torch.allclose(out, x.view(3, 256).sum(-1), rtol=1e-3, atol=1e-3), schedule
    default_schedule(hk)
    hk.launches()


@pytest.mark.parametrize("which,needle", [
    (3, "divergent barrier"),
    (4, "exited while 3 thread(s) wait at __syncthreads()"),
    (5, "exited while lanes 0x0000001f of its warp wait for it"),
    (6, "this warp has only 16 lane(s)"),
    (7, "disagree on a shuffle"),
    (8, "deadlock"),
    (11, "cudaFuncSetAttribute"),
])
def test_runtime_reports_misuse_as_launch_errors(hk, which, needle):
    out = torch.zeros(64, dtype=torch.int32)
    code, msg = hk.selftest(which, out=out)
    hk.launches()
    assert code != 0 and needle in msg, msg
    if which != 11:
        assert "kernel " in msg and ("thread (" in msg or "block (" in msg), msg
    # The runtime recovers: the next launch works.
    out = torch.zeros(32, dtype=torch.int32)
    assert hk.selftest(0, out=out, a=0, b=1, c=32)[0] == 0


def test_runtime_dynamic_shared_memory_is_exact(hk):
    out = torch.zeros(64, dtype=torch.int32)
    assert hk.selftest(10, out=out, a=4096)[0] == 0  # every byte of the launch's size is usable
    assert out.tolist() == [sum(i % 256 for i in range(4096))] * 64
    # One float past the size faults, and the runtime names the kernel and thread before the
    # process dies (in a child process here).
    script = ("import sys; sys.path.insert(0, %r); import torch; from host_kernels import HostKernels;"
              "HostKernels(%r).selftest(9, a=1024)") % (os.path.dirname(__file__), str(hk.path))
    proc = subprocess.run([os.sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "dynamic shared memory access beyond the launch's size" in proc.stderr, proc.stderr[-2000:]
    assert "dynamic_shared_overflow_kernel" in proc.stderr and "thread (7,0,0)" in proc.stderr


# ---- ASan + UBSan over a subset, exact-size allocations ----

def test_sanitizers_on_exact_size_buffers():
    try:
        exe = hkmod.build("sanitize")
    except RuntimeError as e:
        if "fsanitize" in str(e) or "asan" in str(e).lower():
            pytest.skip(f"this compiler cannot build with sanitizers: {str(e)[-300:]}")
        raise
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    assert "0 failed" in proc.stdout, out[-2000:]
