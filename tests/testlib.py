"""Helpers shared by every test: the devices, the dtypes, random logits, float64 references and
per-dtype error budgets, and the tiny random GPT-2 of the decoding tests. Test files import them
from here (the tests folder is on sys.path through its conftest.py)."""

import math
from fractions import Fraction

import torch

import online_softmax
from online_softmax._checks import state_dtype
from online_softmax.reference.distillation import distillation_rows_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and online_softmax.build_info()["cuda"] else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def random_logits(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    """Random (never all-zero) logits, generated in float64 and rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def assert_matches_reference(ours, x, reference_fn, torch_fn=None):
    """Compare against reference_fn evaluated in float64 on the same (rounded) input.

    float32/float64 use fixed tolerances; float16/bfloat16 must be no worse than twice torch's own
    error (torch_fn on the low-precision input) against the same float64 reference.
    """
    ref = reference_fn(x.double())
    assert ours.shape == ref.shape
    if x.dtype in LOW_PRECISION:
        theirs = torch_fn(x)
        finite = torch.isfinite(ref)
        err_ours = (ours.double() - ref)[finite].abs().max().item() if finite.any() else 0.0
        err_torch = (theirs.double() - ref)[finite].abs().max().item() if finite.any() else 0.0
        assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)
        torch.testing.assert_close(torch.isnan(ours), torch.isnan(ref))
    elif x.dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    else:
        # log-softmax values are differences of terms as large as the largest |output|: float32
        # rounding of those terms (a few eps32 of them) bounds the absolute error of small outputs.
        finite = torch.isfinite(ref)
        scale = ref[finite].abs().max().item() if finite.any() else 0.0
        atol = max(1e-6, 4 * torch.finfo(torch.float32).eps * scale)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=atol, equal_nan=True)


def backward_ref(g, y, log, dim=-1, scale=1.0):
    """The backward of softmax (or log_softmax) in float64, from the same rounded y and g the op
    receives: softmax dx = s y (g - sum(g y)), log dx = s (g - exp(y) sum(g))."""
    g64, y64 = g.double(), y.double()
    if log:
        return (g64 - torch.exp(y64) * g64.sum(dim, keepdim=True)) * scale
    return y64 * (g64 - (g64 * y64).sum(dim, keepdim=True)) * scale


def backward_atol(g, y, log, dim=-1, scale=1.0):
    """The absolute error the backward may add to its output's rounding: the row sum is accumulated
    in float32 (float64 for double), and its rounding error is multiplied by |y| (|exp(y)| for log)."""
    acc_eps = 1e-13 if y.dtype == torch.float64 else 1e-6
    terms = (g.double() if log else g.double() * y.double()).abs().sum(dim, keepdim=True)
    factor = (y.double().exp() if log else y.double()).abs()
    return float((acc_eps * terms * factor).max()) * abs(scale) + 1e-30


def cross_entropy_case(rows, n, dtype, *, device="cpu", seed=0, offset=0, smooth=False, weight=False, scale=3.0):
    """The arguments of cross_entropy_backward by name: x (a view `offset` elements into its storage,
    so rows may start off a 16-byte boundary), its rows' true online state (max, sumexp), random
    per-row scales and targets, and smoothing and class weights where asked for, in the dtypes the op
    takes."""
    g = torch.Generator().manual_seed(seed + 7919)
    acc = state_dtype(dtype)
    x = random_logits((rows * n + offset,), dtype, device, scale=scale, seed=seed)[offset:].view(rows, n)

    def rand(size, lo, width):
        return (torch.rand(size, generator=g, dtype=torch.float64) * width + lo).to(acc).to(device)

    m, d = row_state(x)
    return {
        "x": x,
        "max": m.to(acc),
        "sumexp": d.to(acc),
        "target": torch.randint(0, max(n, 1), (rows,), generator=g).to(device),
        "p_scale": rand(rows, 0.5, 1.0),
        "target_scale": rand(rows, 0.5, 1.0),
        "smooth_scale": rand(rows, 0.0, 0.1 / max(n, 1)) if smooth else None,
        "weight": rand(n, 0.25, 1.0) if weight else None,
    }


def row_state(x):
    """Each row's online state (max, sum of exp(x - max)) of a 2-d x, in float64: (-inf, 0) for
    empty rows, as the stats op gives it."""
    x = x.double()
    if x.shape[1] == 0:
        return (torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device),
                torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
    m = x.max(-1).values
    return m, torch.exp(x - m[:, None]).sum(-1)


def cross_entropy_backward_ref(x, max, sumexp, target, p_scale, target_scale, smooth_scale=None, weight=None):
    """The formula in float64 on the given (rounded) inputs, and the size of its terms (the error
    budget of an evaluation in the accumulation dtype)."""
    x, m, d, target, p_scale, target_scale = (t.cpu() for t in (x, max, sumexp, target, p_scale, target_scale))
    n = x.shape[1]
    p = p_scale.double()[:, None] * torch.exp(x.double() - m.double()[:, None]) / d.double()[:, None]
    cols = torch.arange(n)
    hit = (cols[None, :] == target[:, None]).double()
    one_hot = hit * target_scale.double()[:, None]
    out = p - one_hot
    size = p.abs() + one_hot.abs()
    if smooth_scale is not None:
        w = weight.cpu().double() if weight is not None else torch.ones(n, dtype=torch.float64)
        s = smooth_scale.cpu().double()[:, None] * w[None, :]
        out = out - s
        size = size + s.abs()
    # exp's argument carries its own rounding: |x - max| ulps of the accumulation dtype.
    spread = (x.double() - m.double()[:, None]).abs().nan_to_num(0.0, 0.0, 0.0) + 1
    return out, size, spread


def assert_cross_entropy_grad(out, args, *, what):
    """out (any device) against cross_entropy_backward_ref of the op's arguments `args` (a dict of
    them by name): the same NaN and infinities, and finite values within the budget of a float32
    (float64) evaluation rounded once to x's dtype."""
    dtype = args["x"].dtype
    ref, size, spread = cross_entropy_backward_ref(**args)
    ours = out.cpu().double()
    assert out.dtype == dtype and out.shape == args["x"].shape
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{what}: NaN pattern differs"
    finite = torch.isfinite(ref)
    infinite = torch.isinf(ref)
    assert torch.equal(ours[infinite], ref[infinite]), f"{what}: infinities differ"
    eps_acc = torch.finfo(state_dtype(dtype)).eps
    # A few ulps of the accumulation per term (exp2 and the multiply-subtracts), then one rounding to
    # the output dtype (and its subnormal spacing).
    fo = torch.finfo(dtype)
    budget = 4 * eps_acc * spread * size + fo.eps * ref.abs() + fo.smallest_normal * fo.eps
    err = (ours - ref).abs()
    bad = finite & ~(err <= budget)
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst {(err - budget)[bad].max().item():.3g} "
                           f"beyond the budget, e.g. at {bad.nonzero()[0].tolist()}")


def token_logprobs_backward_case(rows, n, dtype, *, device="cpu", seed=0, offset=0, entropy=True, temperature=1.0,
                                 scale=3.0):
    """The arguments of token_logprobs_backward by name: x (a view `offset` elements into its
    storage, so rows may start off a 16-byte boundary), its rows' true online state of x / t and
    entropy, random per-row gradients (grad_entropy None without `entropy`) and token ids."""
    g = torch.Generator().manual_seed(seed + 104729)
    acc = state_dtype(dtype)
    x = random_logits((rows * n + offset,), dtype, device, scale=scale, seed=seed)[offset:].view(rows, n)
    m, d, h = token_row_state(x, temperature)

    def rand(size):
        return (torch.rand(size, generator=g, dtype=torch.float64) * 3 - 1.5).to(acc).to(device)

    return {
        "grad_log_probs": rand(rows),
        "grad_entropy": rand(rows) if entropy else None,
        "x": x,
        "token_ids": torch.randint(0, max(n, 1), (rows,), generator=g).to(device),
        "max": m.to(acc),
        "sumexp": d.to(acc),
        "entropy": h.to(acc),
        "temperature": temperature,
    }


def token_row_state(x, temperature=1.0):
    """(max, sumexp) of x / t as the stats op gives them, and the entropy of softmax(x / t), in
    float64; (-inf, 0, NaN) for empty rows."""
    z = x.double() / temperature
    m, d = row_state(z)
    log_p = z - m[:, None] - d.log()[:, None]
    p = log_p.exp()
    return m, d, -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


def token_logprobs_backward_ref(grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy, temperature=1.0):
    """The formula in float64 on the given (rounded) inputs, and the error budget's scale of each
    element (its terms' size times the exponent's spread)."""
    # 1 / t as the kernels (and the forward's state) round it: in the accumulation dtype.
    s = torch.tensor(1.0 / temperature, dtype=max.dtype).item()
    x, m, d, h, gl = (t.cpu().double() for t in (x, max, sumexp, entropy, grad_log_probs))
    # z = x s - m: x s rounds at the scale of x (1e-12 at 1e4-scale float64 logits), more than the
    # kernels err; (x - R) s + (R s - m), R = m / s, with R s - m exact (fractions) does not.
    finite = torch.isfinite(m)
    r = torch.where(finite, m / s, torch.zeros_like(m))
    c = torch.tensor([float(Fraction(ri) * Fraction(s) - Fraction(mi)) if fi else 0.0
                      for ri, mi, fi in zip(r.tolist(), m.tolist(), finite.tolist())], dtype=torch.float64)
    z = torch.where(finite[:, None], (x - r[:, None]) * s + c[:, None], x * s - m[:, None])
    p = torch.exp(z) / d[:, None]
    log_p = z - d.log()[:, None]
    hit = (torch.arange(x.shape[1])[None, :] == token_ids.cpu()[:, None]).double()
    out = s * gl[:, None] * (hit - p)
    size = s * gl.abs()[:, None] * (hit + p)
    if grad_entropy is not None:
        gh = grad_entropy.cpu().double()[:, None]
        term = torch.where(p == 0, torch.zeros_like(p), p * (log_p + h[:, None]))
        out = out - s * gh * term
        size = size + s * gh.abs() * torch.where(p == 0, torch.zeros_like(p),
                                                 p * (log_p.abs() + h.abs()[:, None] + d.log().abs()[:, None]))
    spread = z.abs().nan_to_num(0.0, 0.0, 0.0) + 1
    return out, size * spread


def assert_token_logprobs_grad(out, args, *, what):
    """out (any device) against token_logprobs_backward_ref of the op's arguments `args` (a dict by
    name): the same NaN and infinities, finite values within a few ulps of the accumulation dtype
    per term, rounded once to x's dtype."""
    dtype = args["x"].dtype
    ref, size = token_logprobs_backward_ref(**args)
    ours = out.cpu().double()
    assert out.dtype == dtype and out.shape == args["x"].shape
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{what}: NaN pattern differs"
    infinite = torch.isinf(ref)
    assert torch.equal(ours[infinite], ref[infinite]), f"{what}: infinities differ"
    fo = torch.finfo(dtype)
    budget = 8 * torch.finfo(state_dtype(dtype)).eps * size + fo.eps * ref.abs() + fo.smallest_normal * fo.eps
    err = (ours - ref).abs()
    bad = torch.isfinite(ref) & ~(err <= budget)
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst {(err - budget)[bad].max().item():.3g} "
                           f"beyond the budget, e.g. at {bad.nonzero()[0].tolist()}")


PEAK_CHILD = """
import torch
import online_softmax as osm
torch.manual_seed(0)
def peak_mib():
    # VmHWM, not ru_maxrss: the latter survives exec, so a child would start at its parent's peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
SETUP
base = peak_mib()
STEP
print(base, peak_mib())
"""

HEAD_MEMORY_SETUP = """
tokens, hidden, vocab = 8192, 1024, 32000
h = (torch.randn(tokens, hidden) * 0.1).requires_grad_()
w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
t = torch.randint(0, vocab, (tokens,))
adv = torch.randn(tokens)
# The gradients' own memory, allocated and freed once so that the baseline peak holds them.
g = [torch.ones_like(h), torch.ones_like(w)]
del g
"""


def peak_rise_mib(setup, step):
    """How far the code ``step`` raises the peak RSS (VmHWM) of a fresh child process above where
    ``setup`` left it, in MiB."""
    import subprocess
    import sys

    code = PEAK_CHILD.replace("SETUP", setup).replace("STEP", step)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    base, peak = map(float, out.stdout.split()[-2:])
    return peak - base


def head_peak_rise_mib(step):
    """How far `step` (code over h (8192, 1024), w (32000, 1024), t and adv (8192,), float32, h and
    w requiring grad) raises the peak RSS of a fresh child process above its inputs, weights and
    gradients, in MiB; the whole logits would take 1000 MiB."""
    return peak_rise_mib(HEAD_MEMORY_SETUP, step + "\nassert h.grad is not None and w.grad is not None")


# The small random-weight GPT-2 the decoding tests compare against transformers' generate() with
# (built from a config, nothing downloaded). Call after pytest.importorskip("transformers").
EOS = 3      # also BOS and the pad id
VOCAB = 48


def tiny_gpt2(seed, vocab=VOCAB):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make EOS likely enough that hypotheses finish early
        model.transformer.wte.weight[EOS] *= 4
    return model


def beam_state(batch, nb, prompt, max_length, *, dtype=torch.float32, device="cpu", seed=0):
    """A fresh beam-search state as Beams keeps it (the first 8 arguments of beam_search_advance)."""
    g = torch.Generator().manual_seed(seed)
    running = torch.full((batch, nb, max_length), 7, dtype=torch.int64)
    running[:, :, :prompt] = torch.randint(0, 50, (batch, 1, prompt), generator=g)
    idx = torch.full((batch, nb, max_length - prompt), -1, dtype=torch.int32)
    scores = torch.zeros(batch, nb, dtype=dtype)
    scores[:, 1:] = -1e9
    state = (running, scores, idx, running.clone(), torch.full((batch, nb), -1e9, dtype=dtype), idx.clone(),
             torch.zeros(batch, nb, dtype=torch.bool), torch.ones(batch, 1, dtype=torch.bool))
    return tuple(t.to(device) for t in state)


def beam_step_inputs(state, keep, cur_len, *, stop_prob=0.2, ties=False, seed=0):
    """One step's candidates for ``state``, as beam_search_step and the stopping criteria make them:
    scores sorted descending (equal ones among them with ``ties``), the beams they continue, the
    candidate sequences with their new token at cur_len, and which of them stop."""
    running, running_scores = state[0], state[1]
    batch, nb, _ = running.shape
    g = torch.Generator().manual_seed(seed)
    scores = (running_scores.double().cpu().max(1, keepdim=True)[0] - torch.rand(batch, keep, generator=g,
              dtype=torch.float64) * 3).to(running_scores.dtype)
    if ties:
        scores = (scores * 2).round() / 2  # halves: several candidates share a score
    scores = scores.sort(1, descending=True)[0]
    beams = torch.randint(0, nb, (batch, keep), generator=g)
    tokens = torch.randint(0, 50, (batch, keep), generator=g)
    stopped = torch.rand(batch, keep, generator=g) < stop_prob
    if cur_len + 1 >= running.shape[2]:
        stopped[:] = True  # the max-length criterion
    dev = running.device
    cand = torch.take_along_dim(running, beams.to(dev)[:, :, None], 1)
    cand[:, :, cur_len] = tokens.to(dev)
    return cand, scores.to(dev), beams.to(dev), stopped.to(dev)


# softmax / log_softmax with scale, mask and causal, as the masked_forward op computes them
MASKED_TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
INF = float("inf")


def masked_softmax_reference(x, mask=None, causal=False, causal_offset=0, log=False, scale=1.0, dim=-1):
    """float64: which positions take part, softmax over those, 0 (-inf) elsewhere and on rows with none."""
    v = x.double() * scale
    keep = torch.ones_like(v, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            keep = keep & (mask != -INF)
            v = v + mask.double()
    if causal:
        i = torch.arange(x.shape[-2])[:, None]
        j = torch.arange(x.shape[-1])[None, :]
        keep = keep & (j <= i + causal_offset)
    v = v.masked_fill(~keep, -INF)
    y = torch.log_softmax(v, dim) if log else torch.softmax(v, dim)
    return torch.where(keep, y, torch.tensor(-INF if log else 0.0, dtype=torch.float64))


def assert_masked_close(got, want, dtype, log=False):
    got = got.double()
    assert got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), "infinite positions differ"
    ok = ~nan & ~inf
    tol = MASKED_TOL[dtype] * (20 if log else 1)
    assert torch.allclose(got[ok], want[ok], rtol=tol, atol=tol), (got[ok] - want[ok]).abs().max()


def chi_square_ok(tokens: torch.Tensor, probs: torch.Tensor, z: float = 4.75) -> tuple:
    """Pearson's chi-square of one row's draws against probs, bins with expected count >= 5 (the
    rest pooled). Passes below the Wilson-Hilferty quantile at z (p ~ 1e-6)."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.cpu().double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:  # fold a small pooled bin into the last big one
        obs, exp = torch.cat([obs[:-2], obs[-2:].sum().reshape(1)]), torch.cat([exp[:-2], exp[-2:].sum().reshape(1)])
    stat = float(((obs - exp) ** 2 / exp.clamp_min(1e-300)).sum())
    df = max(1, obs.numel() - 1)
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < limit, stat, limit


def chi_square_counts_ok(counts, probs, draws, z: float = 4.0) -> tuple:
    """Pearson's chi-square of token counts (vocab,) from `draws` draws against probs, over the
    tokens with probability > 0. z = 4.0 is a one-sided bound far in the tail: a correct sampler
    fails about once in 30,000 runs."""
    keep = probs > 0
    expected = probs[keep] * draws
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = max(1, int(keep.sum()) - 1)
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < limit, stat, limit


def next_token_probs(model, ids, settings):
    """The distribution generate(do_sample=True, **settings) draws the token after ids (1, len)
    from: the model's last logits, the repetition penalty if asked, then transformers' warpers
    (generate()'s default top_k of 50 included), as float64 probabilities (vocab,)."""
    import transformers

    from online_softmax.decoding.warpers import warped_probs

    with torch.no_grad():
        logits = model(ids).logits[:, -1].float()
    if "repetition_penalty" in settings:
        logits = transformers.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"])(ids, logits)
    return warped_probs(logits, settings.get("temperature", 1.0), settings.get("top_k", 50), settings.get("top_p"),
                        settings.get("min_p"))[0].double()


def pad_edits(id_lists, value_lists, acc, device="cpu", width=None):
    """Sparse logit edits as the sampling ops take them: (rows, E) ids ascending then -1 padding, and
    their values in the accumulation dtype acc (the padding's are NaN: never read)."""
    width = max([len(ids) for ids in id_lists] + [0]) if width is None else width
    ids = torch.full((len(id_lists), width), -1, dtype=torch.int64)
    values = torch.full((len(id_lists), width), float("nan"), dtype=acc)
    for r, (i, v) in enumerate(zip(id_lists, value_lists)):
        order = torch.as_tensor(i, dtype=torch.int64).argsort()
        ids[r, :len(i)] = torch.as_tensor(i, dtype=torch.int64)[order]
        values[r, :len(i)] = torch.as_tensor(v, dtype=acc)[order]
    return ids.to(device), values.to(device)


def random_edits(vocab, counts, acc, device="cpu", seed=0, scale=4.0):
    """counts[r] distinct random ids of row r with normal(0, scale) values, padded (pad_edits)."""
    g = torch.Generator().manual_seed(seed)
    id_lists, value_lists = [], []
    for c in counts:
        id_lists.append(torch.randperm(vocab, generator=g)[:c].tolist())
        value_lists.append((torch.randn(c, generator=g, dtype=torch.float64) * scale).tolist())
    return pad_edits(id_lists, value_lists, acc, device)


def dense_edited(x, ids, values):
    """x in its accumulation dtype with the real edits written in: the dense copy that the sampling
    ops with edits must match bit for bit."""
    out = x.to(state_dtype(x.dtype)).clone()
    real = ids >= 0
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(ids)
    out[rows[real], ids[real]] = values[real]
    return out


# ---- distillation (tests/ops/test_distillation.py, tests/kernels/test_distillation_kernels_host.py) ----

DISTILLATION_GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def distillation_loss_tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def distillation_case(rows, n, dtype, device="cpu", *, seed=0, target=True, spread=2.0):
    """Student and teacher logits related as trained models' are (the teacher a noisy student), and
    targets with an ignored row."""
    s = random_logits((rows, n), torch.float64, seed=seed, scale=spread)
    t = s + random_logits((rows, n), torch.float64, seed=seed + 1, scale=1.0)
    tgt = None
    if target:
        tgt = torch.randint(0, max(n, 1), (rows,), generator=torch.Generator().manual_seed(seed))
        if rows > 2:
            tgt[1] = -100
    return s.to(dtype).to(device), t.to(dtype).to(device), None if tgt is None else tgt.to(device)


def distillation_oracle(s, t, tgt, **kw):
    """The reference's rows in float64 on the CPU (NaN where either side has no distribution)."""
    return distillation_rows_reference(s.double().cpu(), t.double().cpu(), None if tgt is None else tgt.cpu(), **kw)


def distillation_oracle_grad(s, t, tgt, g, **kw):
    s64 = s.double().cpu().requires_grad_()
    rows = distillation_rows_reference(s64, t.double().cpu(), None if tgt is None else tgt.cpu(), **kw)
    (grad,) = torch.autograd.grad(rows, s64, g.double().cpu())
    return grad


def assert_distillation_grad(got, want, dtype, what):
    """Each row's gradient within DISTILLATION_GRAD_TOL of its largest entry; values below the
    dtype's normal range may round to 0 (or a subnormal) in the output."""
    tol = DISTILLATION_GRAD_TOL[dtype]
    scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-12)  # a row of exactly 0 is its noise
    err = ((got.double().cpu() - want).abs() - torch.finfo(dtype).smallest_normal).clamp_min(0) / scale
    assert float(err.max()) <= 2 * tol + float(torch.finfo(dtype).eps), (what, float(err.max()))


def distillation_formula_grad(s, t, tgt, g, *, kind, beta=0.5, temperature=1.0, hard_weight=0.5, ignore_index=-100):
    """The backward's formula (csrc/ops.cpp) in float64 with its zero-probability guards: the
    oracle where autograd through the reference has none (its where() turns -inf logits into NaN
    gradients)."""
    s, t = s.double().cpu(), t.double().cpu()
    ls, lq = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    p, q = ls.exp(), lq.exp()
    zero = torch.zeros_like(p)
    if kind == "kl":
        d = p - q
    else:
        lm = lq if kind == "reverse_kl" else torch.logaddexp(lq + math.log(beta), ls + math.log1p(-beta))
        r = torch.where(p > 0, ls - lm, zero)
        u = (p * r).sum(-1, keepdim=True)
        d = torch.where(p > 0, p * (r - u), zero) * (1.0 if kind == "reverse_kl" else 1.0 - beta)
    d = d / temperature
    g = g.double().cpu()[:, None]
    if tgt is None:
        return g * d
    tgt = tgt.cpu()
    keep = tgt != ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(keep, tgt, 0), s.shape[-1]).double()
    ce = torch.softmax(s, -1) - onehot
    return torch.where(keep[:, None], g * (hard_weight * ce + (1 - hard_weight) * d), zero)
