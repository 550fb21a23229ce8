"""Runtime ISA dispatch of the CPU kernels (csrc/cpu/dispatch.h).

Every CPU kernel runs under every compiled capability this CPU supports, in one process, through
the test-only override; the results are compared with float64 torch and with each other. The
DEFAULT kernels must load and run (as on a CPU without AVX2), and no AVX instruction may sit
outside the AVX2/AVX512 kernels in the built library (the link keeps one copy of each inline
function; it must not be an AVX-compiled one).
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import online_softmax as osm
from online_softmax import _C
from online_softmax._checks import state_dtype
from testlib import backward_ref, dense_edited, random_edits, random_logits

COMPILED = _C.cpu_capabilities()


def cpu_runs(capability):
    try:
        _C._set_cpu_capability(capability)
        return True
    except ValueError:
        return False
    finally:
        _C._set_cpu_capability("")


RUNNABLE = [c for c in COMPILED if cpu_runs(c)]


@pytest.fixture(params=RUNNABLE)
def capability(request):
    _C._set_cpu_capability(request.param)
    yield request.param
    _C._set_cpu_capability("")


def test_build_reports_compiled_and_active_capabilities():
    info = osm.build_info()
    assert info["cpu_capabilities"] == COMPILED
    assert COMPILED[0] == "DEFAULT"
    if os.uname().machine in ("x86_64", "AMD64") and not os.environ.get("ONLINE_SOFTMAX_CPU_CAPABILITY"):
        assert COMPILED == ["DEFAULT", "AVX2", "AVX512"]
    # The automatic choice is torch's capability, or the best compiled one below it.
    torch_cap = torch.backends.cpu.get_cpu_capability()
    rank = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
    want = max((c for c in COMPILED if rank[c] <= rank.get(torch_cap, 0)), key=rank.get)
    assert info["cpu_capability"] == want


def test_override_refuses_what_is_not_compiled_or_not_supported():
    with pytest.raises(ValueError, match="not compiled"):
        _C._set_cpu_capability("AVX1024")
    for c in COMPILED:
        if c not in RUNNABLE:
            with pytest.raises(ValueError):
                _C._set_cpu_capability(c)
    assert _C.cpu_capability() == osm.build_info()["cpu_capability"]


CASES = [((7, 1000), -1), ((3, 40001), -1), ((1, 300001), -1), ((6, 33, 5), 1), ((40, 3), 0), ((5, 17), -1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_kernel_under_each_capability(capability, dtype):
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, torch.finfo(dtype).eps)
    for shape, dim in CASES:
        x = random_logits(shape, dtype, seed=sum(shape))
        x.view(-1)[3] = float("-inf")
        x64 = x.double()
        for log in (False, True):
            y = (osm.log_softmax if log else osm.softmax)(x, dim=dim, temperature=0.8)
            ref = (torch.log_softmax if log else torch.softmax)(x64 / 0.8, dim)
            atol = 4 * tol * float(ref[torch.isfinite(ref)].abs().max()) if log else tol * 1e-2
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=max(atol, 1e-7), equal_nan=True)
            g = random_logits(shape, dtype, seed=1, scale=1.0)
            dx = torch.ops.online_softmax.backward(g, y, dim, log, 0.8, None)
            want = backward_ref(g, y, log, dim, scale=1 / 0.8)
            torch.testing.assert_close(dx.double(), want, rtol=tol, atol=1e-5 if dtype != torch.float64 else 1e-10)
        state = osm.softmax_stats(x, dim=dim)
        torch.testing.assert_close(state.logsumexp().double(), torch.logsumexp(x64, dim), rtol=1e-5, atol=1e-5)
        k = min(5, x.shape[dim])
        values, indices = osm.softmax_topk(x, k, dim=dim)
        want_idx = torch.sort(x64, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
        assert torch.equal(indices, want_idx)
        torch.testing.assert_close(values.double(), torch.softmax(x64, dim).gather(dim, want_idx), rtol=tol,
                                   atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cross_entropy_kernel_under_each_capability(capability, dtype):
    """cross_entropy_backward against its formula in float64, rows crossing every vector width,
    with and without smoothing and class weights, -inf and NaN logits included."""
    for rows, n in ((7, 1000), (3, 40001), (5, 17), (2, 1)):
        x = random_logits((rows, n), dtype, seed=n)
        x.view(-1)[min(3, x.numel() - 1)] = float("-inf")
        if rows > 2 and n > 1:
            x[2, 0] = float("nan")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        g = torch.Generator().manual_seed(rows)
        mx, d = torch.ops.online_softmax.stats(x, 1)
        t = torch.randint(0, n, (rows,), generator=g)
        ps, ts, sm = (torch.rand(rows, generator=g, dtype=torch.float64).to(acc) for _ in range(3))
        w = torch.rand(n, generator=g, dtype=torch.float64).to(acc)
        for smooth, weight in ((None, None), (sm, None), (sm, w)):
            out = torch.ops.online_softmax.cross_entropy_backward(x, mx, d, t, ps, ts, smooth, weight)
            want = ps.double()[:, None] * torch.exp(x.double() - mx.double()[:, None]) / d.double()[:, None]
            want[torch.arange(rows), t] -= ts.double()
            if smooth is not None:
                want -= smooth.double()[:, None] * (weight.double()[None, :] if weight is not None else 1.0)
            assert out.dtype == dtype
            tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, torch.finfo(dtype).eps)
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol, equal_nan=True)
            # The in-place op writes the same bits over x (the target's logit is read first).
            over = x.clone()
            torch.ops.online_softmax.cross_entropy_backward_(over, mx, d, t, ps, ts, smooth, weight)
            assert torch.equal(over.isnan(), out.isnan()) and torch.equal(over[~out.isnan()], out[~out.isnan()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sampling_kernels_under_each_capability(capability, dtype):
    """sample_categorical and top_p_threshold under this capability's kernels: draws inside the
    warpers' support with their log-probabilities, and top-p cuts that keep transformers' tokens."""
    from online_softmax.decoding.warpers import warped_probs
    ops = torch.ops.online_softmax
    x = random_logits((6, 3001), dtype, seed=11)
    x[2, :1500] = float("-inf")
    t = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.9, 2.0], dtype=torch.float64)
    u = torch.rand(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for min_p in (None, 0.05):
        cut = None if min_p is None else torch.full((6,), min_p, dtype=torch.float64).log()
        tok, lp = ops.sample_categorical(x, t, cut, u)
        probs = warped_probs(x.double(), t, None, None, min_p)
        drawn = probs.gather(1, tok)
        assert (drawn > 0).all(), capability
        torch.testing.assert_close(lp.double(), drawn.log(), rtol=1e-4, atol=1e-4)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.3, 0.8, 0.95], dtype=torch.float64)
    ratio, status = ops.top_p_threshold(x, t, top_p)
    # The kernels' own rounding of the cut: (max + ratio / s) in double, s = 1 / t and the result in
    # the accumulation type (float32, float64 for float64).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s_acc = (1.0 / t).to(acc).double()
    m = x.to(acc).amax(-1, keepdim=True).double()
    kept = x.to(acc) >= (m + ratio[:, None] / s_acc[:, None]).to(acc)
    want = warped_probs(x.double(), t, None, top_p) > 0
    for r in range(6):
        if status[r] == 0:
            assert torch.equal(kept[r], want[r]), (capability, r)
        else:
            # A cut inside equal logits (bfloat16 has many): it keeps transformers' set plus the
            # rest of that one tied value, and sample() redoes the row with transformers' sort.
            assert status[r] == 1 and (kept[r] | ~want[r]).all(), (capability, r)
            assert x[r][kept[r] & ~want[r]].unique().numel() <= 1, (capability, r)
    if dtype != torch.bfloat16:
        assert (status == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sampling_edits_under_each_capability(capability, dtype):
    """The sampling ops with sparse logit edits under this capability's kernels: exactly the outputs
    of the same kernels on the dense edited copy (in the accumulation dtype)."""
    ops = torch.ops.online_softmax
    x = random_logits((4, 3001), dtype, seed=13)
    ids, values = random_edits(3001, [0, 3, 400, 2999], state_dtype(dtype), seed=13)
    dense = dense_edited(x, ids, values)
    t = torch.tensor([1.0, 0.7, 1.3, 2.0], dtype=torch.float64)
    u = torch.rand(4, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cut in (None, torch.full((4,), -2.0, dtype=torch.float64)):
        got, want = ops.sample_categorical(x, t, cut, u, ids, values), ops.sample_categorical(dense, t, cut, u)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), capability
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.3], dtype=torch.float64)
    got, want = ops.top_p_threshold(x, t, top_p, ids, values), ops.top_p_threshold(dense, t, top_p)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), capability


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rejection_sample_under_each_capability(capability, dtype):
    """rejection_sample under this capability's kernels against its float64 oracle: the same
    tokens and counts, log-probabilities within rounding (drafts with and without probabilities,
    greedy rows, cuts, a position with no distribution)."""
    from online_softmax.reference import rejection_sample_reference
    ops = torch.ops.online_softmax
    g = torch.Generator().manual_seed(2)
    x = random_logits((4, 4, 2500), dtype, seed=12)
    x[3, 2, 5] = float("nan")
    ids = torch.randint(0, 2500, (4, 3), generator=g)
    ids[:, :2] = x[:, :2].float().argmax(-1)
    q = torch.softmax(random_logits((4, 3, 2500), torch.float32, seed=13), -1)
    t = torch.tensor([1.0, 0.0, 0.7, 1.2], dtype=torch.float64)
    u = torch.rand(4, 4, generator=g, dtype=torch.float64)
    counts = torch.tensor([3, 3, 1, 3])
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for draft, ratio in ((q, None), (None, torch.full((4, 4), -1.0, dtype=torch.float64))):
        args = (x, ids, draft, counts, t, ratio, u)
        got, want = ops.rejection_sample(*args), rejection_sample_reference(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), capability
        torch.testing.assert_close(got[2], want[2], rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_under_each_capability(capability, dtype):
    """token_logprobs under this capability's kernels: log-probabilities and entropy within rounding
    of float64 torch, ranks and top-n exactly the stable descending order of the float64 values, the
    state stats'."""
    ops = torch.ops.online_softmax
    x = random_logits((5, 3001), dtype, seed=14)
    x[1, 10:20] = x[1, 5]  # ties
    x[4, 7] = float("nan")
    ids = torch.tensor([0, 12, 3000, 77, 7])
    lp, rank, top_ids, top_lp, m, d, ent = ops.token_logprobs(x, ids, 9, 0.7, None)
    x64 = x.double()
    ref = torch.log_softmax(x64 / 0.7, -1)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(lp, ref.gather(1, ids[:, None])[:, 0].to(lp.dtype), rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(ent[:4], (-(ref.exp() * ref).sum(-1))[:4].to(ent.dtype), rtol=tol, atol=tol)
    order = torch.sort(x64, dim=-1, descending=True, stable=True).indices
    assert torch.equal(rank, (order == ids[:, None]).int().argmax(-1) + 1)
    assert torch.equal(top_ids, order[:, :9])
    for got, want in zip((m, d), ops.stats(x, -1, 0.7)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # the same bits


def test_capabilities_agree_with_each_other():
    """The same op, run by each capability's kernels, gives the same answers within rounding and
    identical top-k indices."""
    x = random_logits((9, 20001), torch.float32, seed=5)
    x[2, 7] = float("nan")
    results = {}
    for c in RUNNABLE:
        _C._set_cpu_capability(c)
        try:
            results[c] = (osm.softmax(x, dim=-1), osm.log_softmax(x, dim=0), osm.softmax_topk(x, 64))
        finally:
            _C._set_cpu_capability("")
    base = results[RUNNABLE[0]]
    for c, (y, ly, (v, i)) in results.items():
        torch.testing.assert_close(y, base[0], rtol=1e-5, atol=1e-7, equal_nan=True, msg=c)
        torch.testing.assert_close(ly, base[1], rtol=1e-5, atol=1e-5, equal_nan=True, msg=c)
        assert torch.equal(i, base[2][1]), c
        torch.testing.assert_close(v, base[2][0], rtol=1e-5, atol=1e-7, equal_nan=True, msg=c)


def test_default_kernels_load_and_run_as_on_a_cpu_without_avx2():
    """ATEN_CPU_CAPABILITY=default makes torch and these kernels run their portable builds."""
    code = ("import torch, online_softmax as osm; x = torch.randn(4, 3000);"
            "assert osm.build_info()['cpu_capability'] == 'DEFAULT', osm.build_info();"
            "torch.testing.assert_close(osm.softmax(x, dim=-1), torch.softmax(x, -1));"
            "v, i = osm.softmax_topk(x, 3); assert torch.equal(i, torch.softmax(x, -1).topk(3).indices);"
            "print('ok')")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


AVX_FUNCTION = re.compile(r"AVX2|AVX512|Sleef")


def test_no_avx_instruction_outside_the_avx_kernels():
    """A baseline-ISA function that carried a VEX/EVEX instruction would crash a CPU without AVX."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found")
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    offenders, current = {}, None
    for line in proc.stdout.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
            continue
        if current is None or AVX_FUNCTION.search(current):
            continue
        fields = line.split("\t")
        mnemonic = fields[1].split()[0] if len(fields) > 1 and fields[1].split() else ""
        if mnemonic.startswith("v") or "%ymm" in line or "%zmm" in line:
            offenders.setdefault(current, mnemonic)
    assert not offenders, f"AVX instructions outside the AVX kernels: {list(offenders.items())[:10]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_one_exp_softmax_blocks_and_hostile_values(capability, dtype):
    """The in-cache softmax (one exp per element, blocks of 1024 rescaled afterwards): block
    edges, a block that is all -inf, NaN/+inf in one block, 1e4-scale logits, and rows on both
    sides of the one-exp size limit (1M float32 / 512k float64 elements)."""
    inf, nan = float("inf"), float("nan")
    limit = (4 << 20) // (8 if dtype == torch.float64 else 4)
    for n in (1023, 1024, 1025, 3 * 1024 + 7, limit, limit + 1):
        rows = 6 if n < 100_000 else 2
        x = random_logits((rows, n), dtype, seed=n)
        if n > 2048:
            x[0, 1024:2048] = -inf      # a whole block banned
        x[1 % rows, n // 2] = nan if rows > 2 else x[1, n // 2]
        if rows > 2:
            x[2, n - 1] = inf
            x[3] = -inf
            if dtype != torch.float16:
                x[4] = x[4] * 3333
            x[5, 5] = 80.0
        for t in (1.0, 0.5):
            y = osm.softmax(x, dim=-1, temperature=t)
            ref = torch.softmax(x.double() / t, -1)
            assert torch.equal(torch.isnan(y), torch.isnan(ref)), (n, t)
            rtol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, torch.finfo(dtype).eps)
            torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=1e-7 if dtype != torch.float64 else 1e-14,
                                       equal_nan=True)
        if dtype in (torch.float16, torch.bfloat16):  # float32 output of half input: one rounding
            y = osm.softmax(x, dim=-1, dtype=torch.float32)
            torch.testing.assert_close(y.double(), torch.softmax(x.double(), -1), rtol=1e-5, atol=1e-8,
                                       equal_nan=True)
