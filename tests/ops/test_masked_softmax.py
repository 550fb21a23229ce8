"""softmax / log_softmax with scale, mask and causal (the masked_forward op): against float64
references of the unfused torch sequence, on the device's kernel (CPU or CUDA, the `device` fixture)
and on the composite that every other backend runs, with every broadcast pattern, hostile values
under and outside the mask, 4 dtypes, non-contiguous inputs and every dim; gradients, opcheck,
torch.compile, torch._masked_softmax. Inputs and references are made on the CPU and the inputs moved
to the device, so the cpu and cuda cases run the same body; the cuda cases of the longest parameter
products run for a sample of dtypes (cuda_params)."""

import pytest
import torch

import online_softmax as osm
from testlib import assert_masked_close as assert_close
from testlib import masked_softmax_reference as reference

ops = torch.ops.online_softmax
INF = float("inf")


def composite(x, mask=None, causal=False, causal_offset=0, log=False, scale=1.0, dim=-1, dtype=None):
    return ops.masked_forward.default._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, x, mask, causal,
                                             causal_offset, log, scale, dim, dtype)


def to(device, t):
    """t on the device with t's own strides (Tensor.to makes a view with gaps contiguous)."""
    if t is None or t.device.type == device:
        return t
    if 0 in t.stride() or t.is_contiguous():
        return t.to(device)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


def both(x, device="cpu", **kw):
    """The device's kernel (through the Python API) and the composite, on x and the mask moved to the
    device; the results back on the CPU."""
    x, kw = to(device, x), dict(kw, mask=to(device, kw.get("mask")))
    api = osm.log_softmax if kw.get("log") else osm.softmax
    api_kw = {k: v for k, v in kw.items() if k not in ("log", "dim")}
    got = [api(x, kw.get("dim", -1), **api_kw),
           composite(x, kw.get("mask"), kw.get("causal", False), kw.get("causal_offset", 0), kw.get("log", False),
                     kw.get("scale", 1.0), kw.get("dim", -1))]
    for y in got:
        assert y.device == x.device
    return [y.cpu() for y in got]


B, H, S = 2, 3, 9
MASK_SHAPES = {
    "padding (B,1,1,S)": (B, 1, 1, S),
    "per-query (B,1,S,S)": (B, 1, S, S),
    "full": (B, H, S, S),
    "keys only (S,)": (S,),
    "per head (1,H,1,1)": (1, H, 1, 1),
    "per row (B,H,S,1)": (B, H, S, 1),
}


def random_mask(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.35
    if kind == "bool":
        return keep
    add = torch.randn(shape, generator=g)
    return add.masked_fill(~keep, -INF)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("pattern", list(MASK_SHAPES), ids=lambda p: p.replace(" ", ""))  # node ids without spaces
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.cuda_params(dtype=[torch.float32, torch.bfloat16])
def test_every_broadcast_pattern(device, dtype, kind, pattern, log):
    x = torch.randn(B, H, S, S, generator=torch.Generator().manual_seed(1)).mul(3).to(dtype)
    mask = random_mask(MASK_SHAPES[pattern], kind, seed=len(pattern))
    if mask.dim() == 4 and mask.shape[-1] == S and mask.shape[-2] == S:
        mask[..., 2, :] = False if kind == "bool" else -INF  # a query with no key
        mask[..., 3, :] = False if kind == "bool" else -INF
        mask[..., 3, 4] = True if kind == "bool" else 0.5   # a query with one
    want = reference(x, mask, scale=0.37, log=log)
    for got in both(x, device, mask=mask, scale=0.37, log=log):
        assert got.dtype == dtype
        assert_close(got, want, dtype, log)
    if mask.dim() == 4 and mask.shape[-2] == S and mask.shape[-1] == S:
        assert (want[:, :, 2] == (-INF if log else 0)).all()  # the case has a fully masked row


@pytest.mark.parametrize("offset", [0, 2, -1, -S, 100])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("log", [False, True])
def test_causal_with_and_without_offset(device, offset, with_mask, log):
    x = torch.randn(B, H, 5, S, generator=torch.Generator().manual_seed(2)) * 4  # 5 queries at the end of 9 keys
    mask = random_mask((B, 1, 1, S), "bool", seed=3) if with_mask else None
    want = reference(x, mask, causal=True, causal_offset=offset, log=log)
    for got in both(x, device, mask=mask, causal=True, causal_offset=offset, log=log):
        assert_close(got, want, torch.float32, log)
    if offset == -S:
        assert (want == (-INF if log else 0)).all()


def test_hostile_values_under_and_outside_the_mask(device):
    x = torch.randn(6, 11, generator=torch.Generator().manual_seed(4))
    keep = torch.ones(6, 11, dtype=torch.bool)
    keep[:, ::3] = False
    x[0, 0], x[0, 3] = float("nan"), INF           # under the mask only: row 0 stays finite
    x[1, 1] = float("nan")                          # outside: row 1 is NaN where it takes part
    x[2, 2] = INF                                   # +inf outside: NaN, as torch.softmax
    x[3, keep[3]] = -INF                            # every position taking part is -inf: NaN there
    x[4] = x[4] * 1e4                               # 1e4-scale logits
    x[5, keep[5]] = -INF
    x[5, 4] = 2.0                                   # one finite position left: probability 1
    for log in (False, True):
        want = reference(x, keep, log=log)
        assert not want[0].isnan().any() and want[1, 1].isnan() and want[1, 0] == (-INF if log else 0)
        for got in both(x, device, mask=keep, log=log):
            assert_close(got, want, torch.float32, log)
    assert osm.softmax(x.to(device), -1, mask=keep.to(device))[5, 4].item() == 1.0


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_every_dim_and_non_contiguous_inputs(device, dim):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 6, 10, generator=g).transpose(0, 2)[:, ::2]  # (10, 3, 7), non-contiguous
    assert not x.is_contiguous() and not to(device, x).is_contiguous()
    full = torch.rand(10, 3, 7, generator=g) > 0.3
    for mask in (full, full.transpose(0, 2).contiguous().transpose(0, 2),   # non-contiguous mask
                 (torch.rand(7, 3, 10, generator=g) > 0.3).permute(2, 1, 0)[:, :1],  # (10, 1, 7), strided
                 torch.randn(3, 1, generator=g)):                          # additive, broadcast
        for log in (False, True):
            want = reference(x, mask, scale=1.5, log=log, dim=dim)
            for got in both(x, device, mask=mask, scale=1.5, log=log, dim=dim):
                assert_close(got, want, torch.float32, log)


def test_empty_zero_d_and_long_rows(device):
    for x in (torch.randn(0, 5), torch.randn(3, 0), torch.randn(2, 0, 4)):
        mask = torch.ones(x.shape[-1], dtype=torch.bool)
        for got in both(x, device, mask=mask):
            assert got.shape == x.shape
    x0 = torch.tensor(3.0, device=device)
    assert osm.softmax(x0, 0, mask=torch.tensor(True, device=device)).item() == 1.0
    assert osm.softmax(x0, 0, mask=torch.tensor(False, device=device)).item() == 0.0
    long = torch.randn(2, 300_001, generator=torch.Generator().manual_seed(6))
    mask = torch.rand(300_001, generator=torch.Generator().manual_seed(7)) > 0.5
    for log in (False, True):
        want = reference(long, mask, scale=0.1, log=log)
        for got in both(long, device, mask=mask, scale=0.1, log=log):
            assert_close(got, want, torch.float32, log)


def test_scale_and_temperature(device):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(8))
    xd = x.to(device)
    assert_close(osm.softmax(xd, -1, scale=0.25).cpu(), reference(x, scale=0.25), torch.float32)
    assert_close(osm.softmax(xd, -1, scale=-2.0).cpu(), reference(x, scale=-2.0), torch.float32)  # any finite scale
    assert_close(osm.softmax(xd, -1, mask=xd > 0, temperature=4.0).cpu(), reference(x, x > 0, scale=0.25),
                 torch.float32)
    assert (osm.softmax(xd, -1, scale=0.0) == 1 / 33).all()


def test_equals_torch_masked_softmax_where_semantics_agree(device):
    """torch._masked_softmax: True is masked out. Equal on every row with a position taking part;
    on a fully masked row its CPU kernel gives NaN (2.13), where ours gives 0 on every device, as
    Megatron does (torch's CUDA kernel is not asked: the comparison is on the rows that agree)."""
    x = torch.randn(B, H, S, S, generator=torch.Generator().manual_seed(9)).to(device)
    masked_out = (torch.rand(B, H, S, S, generator=torch.Generator().manual_seed(10)) > 0.6).to(device)
    masked_out[0, 0, 1] = True
    theirs = torch._masked_softmax(x, masked_out, -1)
    ours = osm.softmax(x, -1, mask=~masked_out)
    some = ~masked_out.all(-1)
    torch.testing.assert_close(ours[some], theirs[some], rtol=1e-6, atol=1e-7)
    assert (ours[0, 0, 1] == 0).all()
    if device == "cpu":
        assert theirs[0, 0, 1].isnan().all()


@pytest.mark.parametrize("log", [False, True])
def test_gradients(device, log):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 4, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    keep = (torch.rand(2, 1, 1, 6, generator=g) > 0.3).to(device)
    keep[1, 0, 0] = False  # padded rows: zero gradient, no NaN
    f = osm.log_softmax if log else osm.softmax

    def finite(y):  # gradcheck needs finite outputs: -inf (log, masked) become 0
        return torch.where(torch.isinf(y), torch.zeros_like(y), y)

    assert torch.autograd.gradcheck(lambda t: finite(f(t, -1, mask=keep, scale=0.7)), (x,))
    assert torch.autograd.gradcheck(lambda t: finite(f(t, -1, causal=True, causal_offset=1)), (x,))
    add = torch.randn(1, 2, 4, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, m: f(t, -1, mask=m, scale=-1.3), (x, add))
    y = f(x, -1, mask=keep)
    y.masked_fill(torch.isinf(y), 0).sum().backward()
    assert not x.grad.isnan().any() and (x.grad[1] == 0).all()


def test_opcheck_and_compile(device):
    x = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    keep = torch.rand(2, 1, 1, 7, device=device) > 0.3
    add = torch.randn(2, 1, 5, 7, device=device)
    samples = [(x, keep, False, 0, False, 0.5, -1, None), (x, add, True, 1, True, 1.0, -1, None),
               (x, None, True, 0, False, 2.0, -1, torch.float64), (x.detach().half(), keep, False, 0, False, 1.0, 1,
                                                                   torch.float32)]
    for args in samples:
        torch.library.opcheck(ops.masked_forward.default, args)
    f = torch.compile(lambda t, m: osm.softmax(t, -1, mask=m, scale=0.3) + osm.log_softmax(t, -1, causal=True),
                      fullgraph=True)
    want = osm.softmax(x, -1, mask=keep, scale=0.3) + osm.log_softmax(x, -1, causal=True)
    torch.testing.assert_close(f(x, keep), want)


def test_bad_arguments(device):
    x = torch.randn(2, 4, 4, device=device)
    cases = [
        (dict(scale=0.5, temperature=2.0), ValueError, "not both"),
        (dict(causal=True, dim=1), ValueError, "softmax must run over the last dim"),
        (dict(mask=torch.ones(4, dtype=torch.int64, device=device)), TypeError, "mask must be bool"),
        (dict(mask=torch.ones(3, dtype=torch.bool, device=device)), ValueError, "does not broadcast"),
        (dict(mask=torch.ones(1, 2, 4, 4, dtype=torch.bool, device=device)), ValueError, "does not broadcast"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(mask=[True] * 4), TypeError, "mask must be a torch.Tensor"),
        (dict(causal=1), TypeError, "causal must be a bool"),
    ]
    for kw, err, match in cases:
        dim = kw.pop("dim", -1)
        with pytest.raises(err, match=match):
            osm.softmax(x, dim, **kw)
    with pytest.raises(ValueError, match="causal needs x of at least 2 dims"):
        osm.softmax(torch.randn(4, device=device), -1, causal=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        composite(x, torch.ones(3, dtype=torch.bool, device=device))


def _runnable_capabilities():
    from online_softmax import _C

    out = []
    for c in _C.cpu_capabilities():
        try:
            _C._set_cpu_capability(c)
            out.append(c)
        except ValueError:
            pass
        finally:
            _C._set_cpu_capability("")
    return out


@pytest.mark.parametrize("capability", _runnable_capabilities())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_kernel_under_each_capability(capability, dtype):
    from online_softmax import _C

    x = torch.randn(3, 4, 37, 70, generator=torch.Generator().manual_seed(12)).mul(2).to(dtype)
    keep = torch.rand(3, 1, 1, 70, generator=torch.Generator().manual_seed(13)) > 0.3
    add = torch.randn(3, 1, 37, 70, generator=torch.Generator().manual_seed(14))
    _C._set_cpu_capability(capability)
    try:
        for log in (False, True):
            for kw in (dict(mask=keep, scale=0.3), dict(mask=add, causal=True, causal_offset=33)):
                want = reference(x, log=log, **kw)
                got = (osm.log_softmax if log else osm.softmax)(x, -1, **kw)
                assert_close(got, want, dtype, log)
    finally:
        _C._set_cpu_capability("")


def megatron_reference(scores, mask, kind, scale):
    """Megatron's semantics: mask True masked out; causal over (sq, sk) with the queries at the end;
    fully masked rows 0 (its fused kernels)."""
    keep = None if mask is None or kind == "no_mask" else ~mask
    causal = kind in ("causal", "padding_causal")
    return reference(scores, keep, causal=causal, causal_offset=scores.shape[-1] - scores.shape[-2],
                     scale=1.0 if scale is None else scale)


@pytest.mark.parametrize("kind", ["padding", "causal", "padding_causal", "no_mask", "arbitrary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_scale_mask_softmax_module(device, kind, dtype):
    g = torch.Generator().manual_seed(15)
    scores = torch.randn(2, 4, 6, 10, generator=g).mul(3).to(dtype)
    masked_out = torch.rand(2, 1, 1, 10, generator=g) > 0.7
    masked_out[1, ..., :] = True  # a fully padded batch entry
    module = osm.FusedScaleMaskSoftmax(input_in_fp16=dtype == torch.float16, input_in_bf16=dtype == torch.bfloat16,
                                       attn_mask_type=getattr(osm.AttnMaskType, kind),
                                       scaled_masked_softmax_fusion=True, mask_func=None, softmax_in_fp32=True,
                                       scale=0.125)
    got = module(scores.to(device), masked_out.to(device))
    assert got.dtype == dtype and got.device.type == device
    got = got.cpu()
    assert_close(got, megatron_reference(scores, masked_out, kind, 0.125), dtype)
    if kind in ("padding", "arbitrary", "padding_causal"):
        assert (got[1] == 0).all()


def test_fused_scale_mask_softmax_arguments():
    # Megatron's own enum members work: they are read by name.
    causal_like = type("E", (), {"name": "causal"})()
    m = osm.FusedScaleMaskSoftmax(False, False, causal_like, True, None, True, None)
    assert m.attn_mask_type is osm.AttnMaskType.causal
    with pytest.raises(ValueError, match="softmax should be in fp32 when scaled"):
        osm.FusedScaleMaskSoftmax(True, False, osm.AttnMaskType.padding, True, None, False, 0.5)
    with pytest.raises(ValueError, match="attn_mask_type must be one of"):
        osm.FusedScaleMaskSoftmax(attn_mask_type="sliding")
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        osm.FusedScaleMaskSoftmax()(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("log", [False, True])
def test_softmax_topk_with_a_mask(device, log):
    x = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(16))
    keep = torch.rand(3, 1, 20, generator=torch.Generator().manual_seed(17)) > 0.4
    keep[1, 0, :] = False
    keep[1, 0, 5:7] = True  # two positions left in entry 1: its top-4 ends in two empty slots
    values, indices = osm.softmax_topk(x.to(device), 4, log=log, mask=keep.to(device), temperature=0.8)
    assert values.device.type == indices.device.type == device
    values, indices = values.cpu(), indices.cpu()
    want = reference(x / 0.8, keep, log=log)
    full = keep.expand(x.shape)
    for idx in range(3):
        for r in range(4):
            left = int(full[idx, r].sum())
            got_i = indices[idx, r]
            assert (got_i[:min(4, left)] >= 0).all() and (got_i[min(4, left):] == -1).all()
            taken = got_i[got_i >= 0]
            assert full[idx, r][taken].all()  # masked positions are never selected
            order = want[idx, r].sort(descending=True)
            torch.testing.assert_close(values[idx, r, :len(taken)].double(), order.values[:len(taken)],
                                       rtol=1e-5, atol=1e-6)
            assert (values[idx, r, len(taken):] == (-INF if log else 0)).all()
    xd = x.to(device).requires_grad_()
    osm.softmax_topk(xd, 3, mask=keep.to(device)).values.sum().backward()
    assert (xd.grad.cpu()[~full] == 0).all() and not xd.grad.isnan().any()


def test_softmax_stats_with_a_mask(device):
    x = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(18)) * 3
    keep = torch.rand(2, 1, 30, generator=torch.Generator().manual_seed(19)) > 0.5
    keep[0, 0, :] = False
    st = osm.softmax_stats(x.to(device), -1, mask=keep.to(device), temperature=2.0)
    assert st.max.device.type == device
    v = (x.double() / 2.0).masked_fill(~keep, -INF)
    assert torch.equal(st.max[0].cpu(), torch.full((5,), -INF))
    assert (st.sumexp[0] == 0).all()  # the empty state: nothing takes part
    torch.testing.assert_close(st.logsumexp()[1].double().cpu(), torch.logsumexp(v[1], -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        osm.softmax_stats(x.to(device), -1, mask=keep.float().to(device))
    with pytest.raises(ValueError, match="does not broadcast"):
        osm.softmax_topk(x.to(device), 2, mask=torch.ones(7, dtype=torch.bool, device=device))
