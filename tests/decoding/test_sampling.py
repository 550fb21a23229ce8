"""online_softmax.sample against transformers' warpers (temperature, top-k, top-p, min-p) computed on
materialized scores (online_softmax.decoding.warpers.warped_probs, the same code transformers runs, checked
against transformers itself below): exact support, chi-square goodness of fit, reproducibility,
hostile rows, per-row parameters."""

import math

import pytest
import torch

import online_softmax as osm
from online_softmax.decoding.warpers import warped_probs
from online_softmax.reference import unfused_sample
from testlib import chi_square_ok, random_logits

DRAWS = 20000


def logits(rows, vocab, dtype=torch.float32, seed=0, scale=2.0):
    return random_logits((rows, vocab), dtype, scale=scale, seed=seed)


SETTINGS = [
    dict(),
    dict(temperature=0.6),
    dict(top_k=40),
    dict(top_k=40, temperature=1.7),
    dict(top_k=200, top_p=0.8),
    dict(top_p=0.9),
    dict(top_p=0.3, temperature=0.8),
    dict(min_p=0.05),
    dict(min_p=0.2, temperature=1.5),
    dict(top_k=100, top_p=0.95, min_p=0.1, temperature=0.9),
    dict(top_p=0.7, min_p=0.02),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize("vocab", [3000, 1025])
def test_distribution_and_support_match_the_warpers(device, kw, vocab):
    x = logits(3, vocab, seed=vocab).to(device)
    g = torch.Generator(device).manual_seed(7)
    out = osm.sample(x, num_samples=DRAWS, generator=g, **kw)
    probs = warped_probs(x.double(), kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
    assert out.token_ids.shape == (3, DRAWS) and out.token_ids.dtype == torch.int64
    drawn_p = probs.gather(1, out.token_ids)
    assert (drawn_p > 0).all(), "a token outside the top-k / top-p / min-p set was drawn"
    torch.testing.assert_close(out.log_probs.double(), drawn_p.log(), rtol=1e-4, atol=1e-4)
    for r in range(3):
        ok, stat, limit = chi_square_ok(out.token_ids[r], probs[r])
        assert ok, (r, stat, limit)


def test_warpers_equal_transformers_own():
    transformers = pytest.importorskip("transformers")
    x = logits(4, 500, seed=3)
    for kw in SETTINGS[1:]:
        procs = []
        if "temperature" in kw:
            procs.append(transformers.TemperatureLogitsWarper(kw["temperature"]))
        if "top_k" in kw:
            procs.append(transformers.TopKLogitsWarper(kw["top_k"]))
        if "top_p" in kw:
            procs.append(transformers.TopPLogitsWarper(kw["top_p"]))
        if "min_p" in kw:
            procs.append(transformers.MinPLogitsWarper(kw["min_p"]))
        want = torch.softmax(transformers.LogitsProcessorList(procs)(None, x.clone()), -1)
        got = warped_probs(x, kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
        torch.testing.assert_close(got, want)


def test_ties_at_the_kth_logit_stay_like_transformers(device):
    x = torch.full((3, 64), -3.0)
    x[:, :2] = 5.0
    x[0, 2:5] = 4.0       # k = 3: the 3rd value ties with two more, all five stay
    x[1, 2:40] = 4.0      # 38 tied: more than the fused selection's slack, so the row is redone whole
    x[2, 2] = 4.0         # no tie
    x = x.to(device)
    out = osm.sample(x, top_k=3, num_samples=4000, generator=torch.Generator(device).manual_seed(0))
    probs = warped_probs(x, 1.0, 3)
    assert (probs > 0).sum(-1).tolist() == [5, 40, 3]
    assert (probs.gather(1, out.token_ids) > 0).all()
    for r in range(3):
        assert set(out.token_ids[r].tolist()) == set(probs[r].nonzero()[:, 0].tolist())
        assert chi_square_ok(out.token_ids[r], probs[r])[0]


@pytest.mark.parametrize("top_p", [0.5, 0.62, 0.9])
def test_top_p_cut_inside_tied_logits_matches_transformers(device, top_p):
    """The cut falls inside a group of equal logits: top_p_threshold reports the tie and the row is
    redone with transformers' own sort, so the kept set is exactly theirs."""
    x = torch.full((2, 300), -2.0)
    x[:, :3] = 2.0
    x[:, 3:60] = 1.0     # the tied group holding the cut
    x[1, 150] = 3.0
    x = x.to(device)
    op_ratio, status = torch.ops.online_softmax.top_p_threshold(
        x, torch.ones(2, dtype=torch.float64, device=device), torch.full((2,), top_p, dtype=torch.float64, device=device))
    probs = warped_probs(x, 1.0, None, top_p)
    out = osm.sample(x, top_p=top_p, num_samples=DRAWS, generator=torch.Generator(device).manual_seed(2))
    assert (probs.gather(1, out.token_ids) > 0).all()
    for r in range(2):
        assert chi_square_ok(out.token_ids[r], probs[r])[0]
    assert (status == 1).any() or top_p == 0.5


def test_top_p_threshold_is_the_smallest_kept_log_ratio(device):
    x = logits(4, 5000, seed=21, scale=3.0).to(device)
    t = torch.tensor([1.0, 0.7, 1.3, 1.0], dtype=torch.float64, device=device)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.05], dtype=torch.float64, device=device)
    ratio, status = torch.ops.online_softmax.top_p_threshold(x, t, top_p)
    assert (status == 0).all()
    probs = warped_probs(x.double(), t.cpu(), None, top_p.cpu())
    # The cut keeps exactly transformers' tokens (it may sit anywhere in the gap below the last one).
    m = x.amax(-1, keepdim=True).double()
    kept = x.double() >= m + ratio[:, None] * t[:, None]
    assert torch.equal(kept.cpu(), probs > 0)
    assert (probs > 0).sum(-1).tolist()[:3] != [1, 1, 1]  # real nuclei, not just the top token


def test_seeded_generator_reproduces(device):
    x = logits(5, 2000).to(device)
    for kw in (dict(), dict(top_k=50), dict(top_p=0.9), dict(min_p=0.1)):
        a = osm.sample(x, num_samples=3, generator=torch.Generator(device).manual_seed(42), **kw)
        b = osm.sample(x, num_samples=3, generator=torch.Generator(device).manual_seed(42), **kw)
        c = osm.sample(x, num_samples=3, generator=torch.Generator(device).manual_seed(43), **kw)
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.log_probs, b.log_probs)
        assert not torch.equal(a.token_ids, c.token_ids)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)])
def test_rows_without_a_distribution_draw_minus_one(device, kw):
    x = logits(5, 300).to(device)
    x[0] = float("-inf")
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    x[3, :299] = float("-inf")   # one finite logit: always drawn, log-prob 0
    x[4] *= 1e4                   # 1e4-scale logits: the largest one is drawn
    out = osm.sample(x, num_samples=6, generator=torch.Generator(device).manual_seed(0), **kw)
    assert (out.token_ids[:3] == -1).all() and torch.isnan(out.log_probs[:3]).all()
    assert (out.token_ids[3] == 299).all() and (out.log_probs[3] == 0).all()
    assert (out.token_ids[4] == x[4].argmax()).all()


def test_per_row_parameters(device):
    x = logits(6, 1500, seed=11).to(device)
    t = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.8, 1.3])
    k = torch.tensor([10, 0, 100, 1500, 0, 30])   # 0 and >= vocab: no top-k for that row
    p = torch.tensor([1.0, 0.9, 0.8, 1.0, 0.5, 0.95])
    mp = torch.tensor([0.0, 0.0, 0.05, 0.1, 0.0, 0.2])
    out = osm.sample(x, temperature=t.to(device), top_k=k.to(device), top_p=p.to(device), min_p=mp.to(device),
                     num_samples=DRAWS, generator=torch.Generator(device).manual_seed(3))
    probs = warped_probs(x.double(), t.double(), k, p.double(), mp.double())
    assert (probs.gather(1, out.token_ids) > 0).all()
    for r in range(6):
        assert chi_square_ok(out.token_ids[r], probs[r])[0], r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_shapes_and_views(device, dtype):
    x = logits(6, 777, dtype=dtype, seed=5).to(device)
    out = osm.sample(x.view(2, 3, 777), top_k=20, num_samples=2, generator=torch.Generator(device).manual_seed(1))
    assert out.token_ids.shape == (2, 3, 2)
    assert out.log_probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    probs = warped_probs(x.double(), 1.0, 20)
    assert (probs.gather(1, out.token_ids.view(6, 2)) > 0).all()
    one = osm.sample(x[0], generator=torch.Generator(device).manual_seed(1))
    assert one.token_ids.shape == (1,)
    strided = osm.sample(x.t().contiguous().t(), min_p=0.3, generator=torch.Generator(device).manual_seed(1))
    assert (warped_probs(x.double(), 1.0, None, None, 0.3).gather(1, strided.token_ids) > 0).all()
    assert osm.sample(x[:0]).token_ids.shape == (0, 1)


def test_bad_arguments():
    x = logits(2, 10)
    for kw, err, match in [(dict(temperature=0.0), ValueError, "temperature must lie in"),
                           (dict(top_k=-1), ValueError, "top_k"),
                           (dict(top_k=2.5), TypeError, "top_k must be an int"),
                           (dict(top_p=1.5), ValueError, "top_p"),
                           (dict(min_p=-0.1), ValueError, "min_p"),
                           (dict(num_samples=0), ValueError, "num_samples"),
                           (dict(temperature=torch.ones(3)), ValueError, "batch shape"),
                           (dict(generator=3), TypeError, "generator")]:
        with pytest.raises(err, match=match):
            osm.sample(x, **kw)
    with pytest.raises(TypeError, match="floating-point"):
        osm.sample(x.long())
    with pytest.raises(ValueError, match="0-d"):
        osm.sample(torch.tensor(1.0))
    op = torch.ops.online_softmax.sample_categorical
    t, u = torch.ones(2, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        op(x, t, None, u + 1)
    with pytest.raises(ValueError, match=r"min_log_ratio must lie in \[-inf, 0\]"):
        op(x, t, torch.full((2,), 2.0, dtype=torch.float64), u)
    with pytest.raises(ValueError, match=r"top_p must lie in \[0, 1\]"):
        torch.ops.online_softmax.top_p_threshold(x, t, torch.full((2,), 1.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="temperature must be a float64 tensor"):
        op(x, t.float(), None, u)
    with pytest.raises(ValueError, match="rows = 2"):
        op(x, t[:1], None, u)


def test_opcheck_and_compile():
    from torch.library import opcheck
    x = logits(3, 2100)
    t = torch.full((3,), 0.7, dtype=torch.float64)
    u = torch.rand(3, 4, dtype=torch.float64)
    opcheck(torch.ops.online_softmax.sample_categorical.default, (x, t, None, u))
    opcheck(torch.ops.online_softmax.sample_categorical.default, (x, t, torch.full((3,), -2.3, dtype=torch.float64), u))
    opcheck(torch.ops.online_softmax.top_p_threshold.default, (x, t, torch.full((3,), 0.9, dtype=torch.float64)))
    # Under torch.compile the uniforms come from the global generator (dynamo cannot trace an
    # explicit torch.Generator, as for torch.multinomial): the draws are valid, not the eager ones.
    for kw in (dict(temperature=0.7), dict(min_p=0.1), dict(top_k=50), dict(top_k=50, top_p=0.9, min_p=0.05),
               dict(top_p=0.9)):
        f = torch.compile(lambda a: osm.sample(a, num_samples=500, **kw), fullgraph=True)
        got = f(x)
        assert got.token_ids.shape == (3, 500) and got.log_probs.dtype == torch.float32
        probs = warped_probs(x, kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
        assert (probs.gather(1, got.token_ids) > 0).all(), kw
        torch.testing.assert_close(got.log_probs, probs.gather(1, got.token_ids).log(), rtol=1e-4, atol=1e-4)


def test_unfused_peer_draws_from_the_same_distribution():
    x = logits(2, 800, seed=9)
    tok = unfused_sample(x, top_k=30, top_p=0.9, num_samples=DRAWS, generator=torch.Generator().manual_seed(0))
    probs = warped_probs(x, 1.0, 30, 0.9)
    for r in range(2):
        assert chi_square_ok(tok[r], probs[r])[0]


def test_meta_tensors_give_shapes_and_dtypes():
    """On meta logits (shape inference, as torch's own functions allow) sample returns meta
    results of the right shapes and dtypes, whatever the cuts."""
    for dtype, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        x = torch.empty(2, 3, 50, dtype=dtype, device="meta")
        for kw in (dict(), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1, temperature=0.7)):
            out = osm.sample(x, num_samples=4, **kw)
            assert out.token_ids.device.type == "meta" and out.token_ids.shape == (2, 3, 4)
            assert out.token_ids.dtype == torch.int64 and out.log_probs.dtype == acc
            assert out.log_probs.shape == (2, 3, 4)
