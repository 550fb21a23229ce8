"""The CUDA masked_forward kernels (csrc/kernels/masked_softmax.cu) executed on the CPU by the
project's host runtime, against the float64 reference of tests/ops/test_masked_softmax.py and
against the CPU op: every dtype (and float16/bfloat16 read into float32), each register
configuration at and around its capacity, rows aligned and off a 16-byte boundary, the two-pass
path for long rows and few rows, grids smaller than the work, bool and additive masks of every
broadcast pattern, causal with offsets, fully masked rows and hostile values. Each launch is the one
online_softmax.cuda_plan reports."""

import pytest
import torch

import host_kernels as hkmod
import online_softmax as osm
from host_kernels import HostKernels, Limits, assert_ran, plan_for
from test_kernels_host import DTYPES, REGISTER_CAPACITIES, logits, vec
from testlib import assert_masked_close as assert_close
from testlib import masked_softmax_reference as reference

pytestmark = hkmod.requires_toolchain()
ROWS = ["masked_rows_kernel"]
TWO_PASS = ["masked_two_pass_kernel"]
INF = float("inf")


@pytest.fixture(scope="module")
def hk():
    return HostKernels()


def check(hk, x, limits=Limits(), expect=None, out_dtype=None, **kw):
    hk.launches()
    y = hk.masked_forward(x, limits=limits, out_dtype=out_dtype, **kw)
    # The mask changes the bytes the plan models, not its launches.
    assert_ran(hk, plan_for("masked_forward", tuple(x.shape), x.dtype, limits, out_dtype=out_dtype), expect)
    want = reference(x, **kw)
    assert_close(y, want, out_dtype or x.dtype, kw.get("log", False))
    cpu = (osm.log_softmax if kw.get("log") else osm.softmax)(
        x, -1, dtype=out_dtype, **{k: v for k, v in kw.items() if k != "log"})
    assert torch.equal(cpu.isnan(), y.isnan()), "NaN pattern differs from the CPU op's"
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_register_configs_at_and_around_capacity(hk, dtype, log):
    v = vec(dtype)
    for cap in REGISTER_CAPACITIES:
        fit = cap * v - (v - 1)
        for n in sorted({max(1, fit - 1), fit}):
            for offset in (0, 1):
                x = logits((3, n), dtype, seed=n + offset, offset=offset)
                keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.3
                check(hk, x, mask=keep, scale=0.7, log=log, expect=ROWS)
    x = logits((2, REGISTER_CAPACITIES[-1] * v + 1), dtype, seed=1)
    check(hk, x, mask=x[0] > 0, log=log, expect=TWO_PASS)  # past the last configuration


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_read_into_float32(hk, dtype):
    x = logits((4, 5, 33), dtype, seed=2)
    y = check(hk, x, mask=torch.randn(5, 33), causal=True, causal_offset=20, out_dtype=torch.float32)
    assert y.dtype == torch.float32


PATTERNS = [(2, 1, 1, 9), (2, 1, 7, 9), (2, 3, 7, 9), (9,), (1, 3, 1, 1), (2, 3, 7, 1)]


@pytest.mark.parametrize("shape", PATTERNS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_broadcast_pattern_and_causal(hk, shape, kind):
    x = logits((2, 3, 7, 9), torch.float32, seed=3)
    g = torch.Generator().manual_seed(len(shape))
    keep = torch.rand(shape, generator=g) > 0.35
    mask = keep if kind == "bool" else torch.randn(shape, generator=g).masked_fill(~keep, -INF)
    for causal, offset in ((False, 0), (True, 0), (True, 2), (True, -3)):
        check(hk, x, expect=ROWS, mask=mask, causal=causal, causal_offset=offset, scale=0.5)
    # The same patterns on rows long enough for the two-pass kernel.
    xl = logits((2, 3, 7, 4100), torch.float32, seed=9)
    long_shape = shape[:-1] + ((4100,) if shape[-1] == 9 else (1,))
    keep = torch.rand(long_shape, generator=g) > 0.35
    mask = keep if kind == "bool" else torch.randn(long_shape, generator=g).masked_fill(~keep, -INF)
    check(hk, xl, limits=Limits(num_sms=64), expect=TWO_PASS, mask=mask, causal=True, causal_offset=4000)  # few rows


def test_two_pass_with_masks_few_rows_and_small_grids(hk):
    n = 5000  # 1250 float32 granules: registers, unless few rows on many SMs (two-pass)
    x = logits((3, n), torch.float32, seed=4, offset=1)
    keep = torch.rand(3, 1, n, generator=torch.Generator().manual_seed(5)).squeeze(1) > 0.5
    keep[1] = False                                   # a fully masked row
    many = Limits(num_sms=64)                         # 3 rows < 64 SMs and >= 1024 granules: two-pass
    for log in (False, True):
        y = check(hk, x, limits=many, mask=keep, log=log, scale=0.2, expect=TWO_PASS)
        assert (y[1] == (-INF if log else 0)).all()
        check(hk, x, limits=many, mask=torch.randn(n), causal=False, log=log, expect=TWO_PASS)
    xs = logits((5, 14, 16400), torch.float32, seed=6)  # 70 rows past the registers on a grid of 64 blocks
    check(hk, xs, limits=Limits(num_sms=1), mask=torch.rand(5, 1, 16400) > 0.2, causal=True, causal_offset=16390,
          expect=TWO_PASS)


def test_hostile_values(hk):
    x = logits((6, 11), torch.float32, seed=7)
    keep = torch.ones(6, 11, dtype=torch.bool)
    keep[:, ::3] = False
    x[0, 0], x[0, 3] = float("nan"), INF
    x[1, 1] = float("nan")
    x[2, 2] = INF
    x[3, keep[3]] = -INF
    x[4] = x[4] * 1e4
    x[5, keep[5]] = -INF
    x[5, 4] = 2.0
    for log in (False, True):
        check(hk, x, expect=ROWS, mask=keep, log=log)
    long = logits((6, 20000), torch.float32, seed=8)
    long[:, :11] = x
    keep_long = torch.ones(6, 20000, dtype=torch.bool)
    keep_long[:, :11] = keep
    keep_long[:, 11:] = False
    for log in (False, True):
        check(hk, long, limits=Limits(num_sms=64), expect=TWO_PASS, mask=keep_long, log=log)


def test_plan_models_one_read_of_x_and_the_mask():
    plan = osm.cuda_plan("masked_forward", (8, 16, 512, 512), torch.float32, device="h100",
                         mask_shape=(8, 1, 1, 512))
    (launch,) = plan.launches
    x_bytes = 8 * 16 * 512 * 512 * 4
    assert launch.kernel == "masked_rows_kernel"
    assert launch.bytes_read == x_bytes + 8 * 512 and launch.bytes_written == x_bytes
    causal = osm.cuda_plan("masked_forward", (8, 16, 2048, 2048), torch.bfloat16, device="h100")
    assert causal.launches[0].bytes_read == 8 * 16 * 2048 * 2048 * 2
