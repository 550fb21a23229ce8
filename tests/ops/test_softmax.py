"""online_softmax.softmax / log_softmax (op: forward) against float64 torch, and their invariants."""

import pytest
import torch

import online_softmax as osm
from testlib import FLOAT_DTYPES, LOW_PRECISION, assert_matches_reference, random_logits

FUNCS = {
    "softmax": (osm.softmax, torch.softmax),
    "log_softmax": (osm.log_softmax, torch.log_softmax),
}

# Sizes that cross the vector step (16 floats / 8 doubles), the task grain and the row-split
# threshold (32768 elements), with 1 row, few rows and many rows.
SHAPES_LAST = [(1, 1), (1, 7), (3, 15), (5, 16), (4, 17), (2, 33), (7, 1000), (1, 32767), (1, 32768),
               (2, 65537), (3, 100003), (300, 129)]


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES_LAST)
def test_last_dim_matches_float64(device, name, dtype, shape):
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits(shape, dtype, device)
    y = ours_fn(x, -1)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches_reference(y.cpu(), x.cpu(), lambda t: torch_fn(t, -1), lambda t: torch_fn(t, -1))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((3, 37, 19), 1), ((2, 100, 64), 1), ((50, 3), 0),
                                       ((4, 5, 6, 7), 2), ((4, 5, 6, 7), -3), ((33, 17), 0),
                                       ((2, 40000, 3), 1), ((1, 300000, 16), 1)])
def test_other_dims_match_float64(device, name, dtype, shape, dim):
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits(shape, dtype, device)
    y = ours_fn(x, dim)
    assert_matches_reference(y.cpu(), x.cpu(), lambda t: torch_fn(t, dim), lambda t: torch_fn(t, dim))


@pytest.mark.parametrize("name", FUNCS)
def test_direct_op_call(device, name):
    x = random_logits((6, 50), torch.float32, device)
    log = name == "log_softmax"
    y = torch.ops.online_softmax.forward(x, 1) if not log else torch.ops.online_softmax.forward(x, 1, True)
    torch.testing.assert_close(y, FUNCS[name][1](x, 1))


@pytest.mark.parametrize("name", FUNCS)
def test_non_contiguous_inputs(device, name):
    ours_fn, torch_fn = FUNCS[name]
    base = random_logits((40, 70), torch.float32, device)
    for view, dim in [(base.t(), -1), (base.t(), 0), (base[::2, 1::3], -1), (base[:, 5:60], 1),
                      (base.unsqueeze(0).expand(3, 40, 70), 2)]:
        assert not view.is_contiguous()
        torch.testing.assert_close(ours_fn(view, dim), torch_fn(view, dim), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_dim_and_empty(device, name, dtype):
    ours_fn, torch_fn = FUNCS[name]
    for x, dim in [(torch.tensor(2.5, dtype=dtype, device=device), 0),
                   (torch.tensor(-7.0, dtype=dtype, device=device), -1),
                   (torch.empty(0, dtype=dtype, device=device), 0),
                   (torch.empty(0, 5, dtype=dtype, device=device), 1),
                   (torch.empty(3, 0, dtype=dtype, device=device), 1),
                   (torch.empty(3, 0, 2, dtype=dtype, device=device), 0)]:
        y = ours_fn(x, dim)
        ref = torch_fn(x, dim)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("length", [5, 40, 40001])
def test_special_values_behave_like_torch(device, name, dtype, length):
    """+-inf, NaN and all -inf rows give exactly torch's NaN/inf pattern (rows 0..5 below)."""
    ours_fn, torch_fn = FUNCS[name]
    inf, nan = float("inf"), float("nan")
    x = random_logits((8, length), torch.float64)
    x[0] = -inf                       # all -inf: NaN row
    x[1, length // 2] = inf           # one +inf: NaN row
    x[2, length - 1] = nan            # one NaN: NaN row
    x[3, ::2] = -inf                  # half -inf: zeros there, normal elsewhere
    x[4, 0] = -inf
    x[4, -1] = inf                    # +inf and -inf together
    x[5, 1:] = -inf                   # a single finite entry: probability 1
    x = x.to(dtype).to(device)
    y = ours_fn(x, -1).cpu()
    ref = torch_fn(x.cpu().double(), -1).to(dtype)
    torch.testing.assert_close(torch.isnan(y), torch.isnan(ref))
    torch.testing.assert_close(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite].double(), ref[finite].double(), rtol=2e-2, atol=1e-3)
    # The same pattern along a non-last dim (the vectorized-across-rows path).
    yt = ours_fn(x.t().contiguous(), 0).t().cpu()
    torch.testing.assert_close(torch.isnan(yt), torch.isnan(ref))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_invariants(device, dtype):
    x = random_logits((64, 1031), dtype, device, scale=5.0)
    p = osm.softmax(x, -1).double()
    assert (p >= 0).all() and (p <= 1).all()
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(p.sum(-1), torch.ones(64, dtype=torch.float64, device=device), rtol=0, atol=tol)
    # Shift invariance: softmax(x + 1000) == softmax(x) (exactly representable shift in float32/64).
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(osm.softmax(x + 1000.0, -1), osm.softmax(x, -1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(osm.log_softmax(x + 1000.0, -1), osm.log_softmax(x, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FUNCS)
def test_extreme_logits(device, name):
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits((16, 777), torch.float32, device, scale=1e4)
    x[0, 3] = 1e4
    x[1] = torch.tensor([1e4, -1e4] * 388 + [1e4], device=device)
    assert_matches_reference(ours_fn(x, -1).cpu(), x.cpu(), lambda t: torch_fn(t, -1))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("shape,dim", [((9, 301), -1), ((2, 70000), -1), ((5, 33, 18), 1)])
def test_temperature(device, name, temperature, shape, dim):
    ours_fn, torch_fn = FUNCS[name]
    x = random_logits(shape, torch.float32, device)
    y = ours_fn(x, dim, temperature=temperature)
    assert_matches_reference(y.cpu(), x.cpu(), lambda t: torch_fn(t / temperature, dim))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("src,dst", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float64), (torch.float32, torch.float16),
                                     (torch.float64, torch.float32), (torch.int64, torch.float32)])
def test_dtype_argument(device, name, src, dst):
    ours_fn, torch_fn = FUNCS[name]
    x = (random_logits((7, 301), torch.float64, device) * (10 if not src.is_floating_point else 1)).to(src)
    y = ours_fn(x, -1, dtype=dst)
    ref = torch_fn(x, -1, dtype=dst)
    assert y.dtype == dst
    tol = dict(rtol=2e-3, atol=2e-3) if dst in LOW_PRECISION else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, ref, **tol)


def test_one_long_row_and_few_long_rows(device):
    """1M-element rows take the split-row path (partial states merged across threads)."""
    for shape in [(1, 1 << 20), (3, 1_000_003)]:
        x = random_logits(shape, torch.float32, device)
        for ours_fn, torch_fn in FUNCS.values():
            assert_matches_reference(ours_fn(x, -1).cpu(), x.cpu(), lambda t: torch_fn(t, -1))


def test_module_drop_ins(device):
    x = random_logits((4, 9, 11), torch.float32, device)
    for dim in (0, 1, -1):
        torch.testing.assert_close(osm.OnlineSoftmax(dim)(x), torch.nn.Softmax(dim)(x))
        torch.testing.assert_close(osm.OnlineLogSoftmax(dim)(x), torch.nn.LogSoftmax(dim)(x))
    assert "dim=1" in repr(osm.OnlineSoftmax(1))
    torch.testing.assert_close(osm.OnlineSoftmax(temperature=2.0)(x), torch.softmax(x / 2, -1))
