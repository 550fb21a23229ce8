"""distillation_forward / distillation_backward(_) and online_softmax.distillation_loss against the
float64 oracle (online_softmax.reference.distillation) on every kind, dtype and device, with and
without hard labels, at temperatures; hostile values; nearly equal distributions; in place; bad
input; opcheck; gradcheck; every CPU capability and thread count.

Tolerances. The oracle reads the very values the kernels read (the inputs rounded to their dtype,
then widened), so only the kernels' own arithmetic differs. In float32 accumulation each exp is
within about 20 ulp (ATen's vector exp, 2^-24 each) and the sums add relative errors of that order:
a loss, a difference of terms no larger than (1 + |loss| + the logits' spread), is off by about
1e-6 of that, checked at 2e-5. The gradient's entries are products of probabilities and per-row
factors with the same relative error, then rounded once to the output dtype: checked at rtol
1e-5 (float32), the dtype's eps (float16, bfloat16), 1e-10 (float64), and an atol of that times the
row's largest entry.
"""

import math

import pytest
import torch

import online_softmax as osm
from online_softmax import _C
from online_softmax.reference.distillation import distillation_rows_reference, reduce_rows
from testlib import assert_distillation_grad, distillation_case, distillation_loss_tol, distillation_oracle, \
    distillation_formula_grad, distillation_oracle_grad, random_logits

ops = torch.ops.online_softmax
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KINDS = ["kl", "reverse_kl", "jsd"]


def op_options(kw):
    return (kw["kind"], kw.get("beta", 0.5), kw.get("temperature", 1.0), kw.get("hard_weight", 0.5),
            kw.get("ignore_index", -100))


def run(s, t, tgt, **kw):
    loss, stats = ops.distillation_forward(s, t, tgt, *op_options(kw))
    return loss, stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", [True, False])
def test_matches_the_oracle(device, dtype, kind, target):
    for n, temperature, seed in ((1, 1.0, 1), (37, 0.7, 2), (1000, 1.0, 3), (4099, 2.5, 4)):
        kw = dict(kind=kind, beta=0.3, temperature=temperature, hard_weight=0.4)
        s, t, tgt = distillation_case(5, n, dtype, device, seed=seed, target=target)
        loss, stats = run(s, t, tgt, **kw)
        assert loss.dtype == stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert stats.shape == (5, 7) and loss.device.type == device
        want = distillation_oracle(s, t, tgt, **kw)
        tol = distillation_loss_tol(dtype)
        torch.testing.assert_close(loss.double().cpu(), want, rtol=tol, atol=tol, msg=f"{dtype} n={n}")
        g = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(loss.dtype)
        grad = ops.distillation_backward(g.to(device), s, t, tgt, stats, *op_options(kw))
        assert grad.dtype == dtype and grad.shape == s.shape
        assert_distillation_grad(grad, distillation_oracle_grad(s, t, tgt, g, **kw), dtype, f"{kind} {dtype} n={n}")
        if tgt is not None:
            assert (grad[1] == 0).all() and loss[1] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_formula_is_the_reference_gradient(kind):
    """The backward's formula (the hostile tests' oracle) equals autograd through the reference."""
    s, t, tgt = distillation_case(4, 30, torch.float64, seed=17)
    kw = dict(kind=kind, beta=0.35, temperature=1.7, hard_weight=0.45)
    g = torch.tensor([0.5, -1.0, 2.0, 1.5])
    want = distillation_oracle_grad(s, t, tgt, g, **kw)
    torch.testing.assert_close(distillation_formula_grad(s, t, tgt, g, **kw), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_in_place_equals_out_of_place(device, dtype, kind):
    s, t, tgt = distillation_case(4, 700, dtype, device, seed=7)
    kw = dict(kind=kind, temperature=0.8, hard_weight=0.3)
    loss, stats = run(s, t, tgt, **kw)
    g = torch.rand(4, dtype=loss.dtype, device=device)
    want = ops.distillation_backward(g, s, t, tgt, stats, *op_options(kw))
    over = s.clone()
    ops.distillation_backward_(over, g, t, tgt, stats, *op_options(kw))
    assert torch.equal(over, want)


def test_non_contiguous_inputs_equal_their_contiguous_copies():
    s, t, tgt = distillation_case(6, 33, torch.float32, seed=61)
    wide_s, wide_t = torch.zeros(6, 66), torch.zeros(6, 66)
    wide_s[:, ::2], wide_t[:, ::2] = s, t
    tgt_wide = torch.stack([tgt, tgt], 1)[:, 0]
    opts = ("jsd", 0.5, 0.9, 0.3, -100)
    loss, stats = ops.distillation_forward(wide_s[:, ::2], wide_t[:, ::2], tgt_wide, *opts)
    want_loss, want_stats = ops.distillation_forward(s, t, tgt, *opts)
    assert torch.equal(loss, want_loss) and torch.equal(stats, want_stats)
    g = torch.rand(6)
    assert torch.equal(ops.distillation_backward(g[::1], wide_s[:, ::2], wide_t[:, ::2], tgt_wide, stats, *opts),
                       ops.distillation_backward(g, s, t, tgt, stats, *opts))
    s3 = s.t().contiguous().t().requires_grad_()  # (rows, vocab) with rows contiguous
    out = osm.distillation_loss(s3, t, tgt, kind="jsd", beta=0.5, temperature=0.9, hard_weight=0.3)
    torch.testing.assert_close(out, osm.distillation_loss(s, t, tgt, kind="jsd", beta=0.5, temperature=0.9,
                                                          hard_weight=0.3))
    out.backward()
    assert s3.grad.shape == s.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_values(device, dtype, kind):
    """-inf in the teacher where the student is finite and the reverse, all -inf rows, NaN, +inf,
    1e4-scale logits (both models shifted alike), and a target at -inf."""
    n = 70
    s, t, _ = distillation_case(8, n, dtype, device, seed=9, target=False)
    s[0, ::3] = -math.inf  # student zero where the teacher is not: kl infinite, reverse_kl finite
    t[1, ::4] = -math.inf  # and the reverse
    s[2] = -math.inf
    t[3] = -math.inf
    s[4, 5] = math.nan
    t[5, 6] = math.inf
    shift = (random_logits((n,), torch.float64, seed=10) + 1e4).to(dtype).to(device)
    s[6], t[6] = shift, shift + (random_logits((n,), torch.float64, seed=11) * 0.5).to(dtype).to(device)
    s[7, ::5] = -math.inf
    t[7, ::5] = -math.inf  # both zero at the same tokens: those terms are 0, not NaN
    kw = dict(kind=kind, beta=0.6, temperature=0.9)
    loss, stats = run(s, t, None, **kw)
    want = distillation_oracle(s, t, None, **kw)
    tol = distillation_loss_tol(dtype)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=tol, atol=tol, equal_nan=True)
    assert loss[2:6].isnan().all() and torch.isfinite(loss[6]) and torch.isfinite(loss[7])
    g = torch.ones(8, dtype=loss.dtype, device=device)
    grad = ops.distillation_backward(g, s, t, None, stats, *op_options(kw)).double().cpu()
    assert grad[2:6].isnan().all()
    finite_rows = [r for r in (0, 1, 6, 7) if math.isfinite(float(want[r]))]
    ref = distillation_formula_grad(s, t, None, g, **kw)
    for r in finite_rows:
        assert torch.isfinite(grad[r]).all(), r
        assert_distillation_grad(grad[r][None], ref[r][None], dtype, f"hostile row {r}")
    # Hard labels: a target whose logit is -inf has an infinite cross-entropy.
    tgt = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], device=device)
    loss_t, _ = run(s, t, tgt, **dict(kw, hard_weight=0.5))
    assert loss_t[0] == math.inf


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gap", [1e-2, 1e-3])
def test_nearly_equal_distributions_keep_their_digits(kind, gap):
    """Two nearly equal float32 rows (the teacher the student plus noise of size gap, and a common
    offset): the divergence, about gap^2 / 2, is never computed as a difference of log-sums of the
    size of log(vocab) (whose float32 rounding, 1e-6, would be all of it). Each element's terms
    carry an error of about 20 ulp of gap, which relative to the loss is about 40 eps / gap (measured: 15):
    checked at 100 eps / gap."""
    n = 5000
    s = random_logits((3, n), torch.float64, seed=12, scale=2.0)
    t = s + 3.0 + gap * random_logits((3, n), torch.float64, seed=13, scale=1.0)
    s, t = s.float(), t.float()
    kw = dict(kind=kind)
    loss, _ = run(s, t, None, **kw)
    want = distillation_oracle(s, t, None, **kw)
    rel = ((loss.double() - want).abs() / want).max()
    assert float(rel) < 100 * torch.finfo(torch.float32).eps / gap, float(rel)


def test_empty_and_vocab_one(device):
    s = torch.empty(0, 5, device=device)
    loss, stats = ops.distillation_forward(s, s, None, "kl", 0.5, 1.0, 0.0, -100)
    assert loss.shape == (0,) and stats.shape == (0, 7)
    assert ops.distillation_backward(loss, s, s, None, stats, "kl", 0.5, 1.0, 0.0, -100).shape == (0, 5)
    # An empty vocabulary is no distribution: NaN (an ignored row stays 0).
    z = torch.empty(2, 0, device=device)
    loss, stats = ops.distillation_forward(z, z, torch.tensor([-100, -100], device=device), "jsd", 0.5, 1.0, 0.5, -100)
    assert (loss == 0).all()
    loss, stats = ops.distillation_forward(z, z, None, "jsd", 0.5, 1.0, 0.5, -100)
    assert loss.isnan().all()
    # One token: both distributions are that token, every divergence 0, the cross-entropy 0.
    one = torch.randn(3, 1, device=device)
    for kind in KINDS:
        loss, stats = ops.distillation_forward(one, one * 2, torch.zeros(3, dtype=torch.long, device=device), kind,
                                               0.5, 1.0, 0.5, -100)
        assert (loss == 0).all()
        grad = ops.distillation_backward(torch.ones(3, device=device), one, one * 2, None, stats, kind, 0.5, 1.0,
                                         0.5, -100)
        assert (grad == 0).all()


def test_bad_input_names_the_argument():
    s, t, tgt = distillation_case(4, 10, torch.float32)
    fwd = ops.distillation_forward
    with pytest.raises(ValueError, match="kind must be one of .* got 'kld'"):
        fwd(s, t, tgt, "kld", 0.5, 1.0, 0.5, -100)
    with pytest.raises(ValueError, match="beta must satisfy 0 < beta < 1"):
        fwd(s, t, tgt, "jsd", 1.0, 1.0, 0.5, -100)
    with pytest.raises(ValueError, match="temperature"):
        fwd(s, t, tgt, "kl", 0.5, 0.0, 0.5, -100)
    with pytest.raises(ValueError, match="hard_weight must lie in"):
        fwd(s, t, tgt, "kl", 0.5, 1.0, 1.5, -100)
    with pytest.raises(TypeError, match=r"teacher must have the dtype of student \(Float\)"):
        fwd(s, t.double(), tgt, "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(ValueError, match="teacher must have the shape of student"):
        fwd(s, t[:, :9], tgt, "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(ValueError, match="student must be 2-D"):
        fwd(s[0], t[0], None, "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(TypeError, match="target must be int64"):
        fwd(s, t, tgt.int(), "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(IndexError, match=r"target must lie in \[0, 10\)"):
        fwd(s, t, torch.tensor([0, 10, 1, 2]), "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(IndexError, match=r"target must lie in \[0, 10\)"):
        fwd(s, t, torch.tensor([0, -1, 1, 2]), "kl", 0.5, 1.0, 0.5, -100)
    loss, stats = fwd(s, t, tgt, "kl", 0.5, 1.0, 0.5, -100)
    bwd = ops.distillation_backward
    with pytest.raises(ValueError, match=r"stats must have shape \[4, 7\]"):
        bwd(loss, s, t, tgt, stats[:, :6], "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(TypeError, match="grad_loss must be"):
        bwd(loss.double(), s, t, tgt, stats, "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(IndexError, match="target must lie"):
        bwd(loss, s, t, torch.tensor([0, 11, 1, 2]), stats, "kl", 0.5, 1.0, 0.5, -100)
    with pytest.raises(ValueError, match="student must be contiguous"):
        ops.distillation_backward_(s.t().contiguous().t(), loss, t, tgt, stats, "kl", 0.5, 1.0, 0.5, -100)


def test_opcheck():
    """The ops are differentiated through distillation_loss, never directly: each raises when asked
    for a derivative of its own."""
    s, t, tgt = distillation_case(5, 37, torch.float32, seed=3)
    for kind in KINDS:
        for target in (tgt, None):
            args = (s, t, target, kind, 0.3, 0.8, 0.4, -100)
            torch.library.opcheck(ops.distillation_forward, args)
            loss, stats = ops.distillation_forward(*args)
            torch.library.opcheck(ops.distillation_backward, (loss, s, t, target, stats) + args[3:])
            torch.library.opcheck(ops.distillation_backward_, (s.clone(), loss, t, target, stats) + args[3:])
    x = s.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="distillation_forward: the op has no derivative"):
        ops.distillation_forward(x, t, tgt, "kl", 0.5, 1.0, 0.5, -100)[0].sum().backward()


# ---- distillation_loss ----

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", [True, False])
def test_loss_reductions_and_gradient(device, reduction, target):
    s, t, tgt = distillation_case(6, 50, torch.float32, device, seed=21, target=target)
    s3, t3 = s.view(2, 3, 50).requires_grad_(), t.view(2, 3, 50)
    tgt3 = None if tgt is None else tgt.view(2, 3)
    kw = dict(kind="jsd", beta=0.2, temperature=1.5, hard_weight=0.25)
    out = osm.distillation_loss(s3, t3, tgt3, reduction=reduction, **kw)
    rows = distillation_oracle(s, t, tgt, **kw)
    want = reduce_rows(rows, None if tgt is None else tgt.cpu(), -100, reduction)
    if reduction == "none":
        want = want.view(2, 3)
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-5, atol=2e-5)
    (g,) = torch.autograd.grad(out.sum(), s3)
    s64 = s.double().cpu().requires_grad_()
    ref = reduce_rows(distillation_rows_reference(s64, t.double().cpu(), None if tgt is None else tgt.cpu(), **kw),
                      None if tgt is None else tgt.cpu(), -100, reduction).sum()
    (g_ref,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(g.double().cpu().view(6, 50), g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    s, t, tgt = distillation_case(3, 9, torch.float64, seed=5)
    s.requires_grad_()
    for target in (tgt, None):
        assert torch.autograd.gradcheck(
            lambda x: osm.distillation_loss(x, t, target, kind=kind, temperature=0.7, hard_weight=0.3), (s,))
        # Second derivatives through the composition (create_graph=True).
        assert torch.autograd.gradgradcheck(
            lambda x: osm.distillation_loss(x, t, target, kind=kind, temperature=0.7, hard_weight=0.3,
                                            reduction="sum"), (s,))


def test_teacher_requiring_grad_raises():
    s, t, tgt = distillation_case(3, 9, torch.float32)
    with pytest.raises(ValueError, match=r"teacher_logits requires grad.*teacher_logits.detach\(\)"):
        osm.distillation_loss(s.requires_grad_(), t.requires_grad_(), tgt)
    with torch.no_grad():
        osm.distillation_loss(s, t, tgt)  # no graph: nothing to refuse


def test_loss_bad_input():
    s, t, tgt = distillation_case(3, 9, torch.float32)
    f = osm.distillation_loss
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        f([1.0], t)
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(s, t, reduction="avg")
    with pytest.raises(ValueError, match=r"target must have shape \[3\]"):
        f(s, t, tgt[:2])
    with pytest.raises(TypeError, match="target must be an int64"):
        f(s, t, tgt.float())
    with pytest.raises(ValueError, match="kind must be one of"):
        f(s, t, kind="forward")
    with pytest.raises(TypeError, match="kind must be a str"):
        f(s, t, kind=1)
    with pytest.raises(TypeError, match="beta must be a number"):
        f(s, t, beta=None)
    with pytest.raises(ValueError, match="teacher_logits must have the shape of student_logits"):
        f(s, t[:, :4])


def test_vmap_matches_the_loop():
    s, t, tgt = distillation_case(6, 40, torch.float32, seed=31)
    s3, t3, tgt3 = s.view(2, 3, 40), t.view(2, 3, 40), tgt.view(2, 3)
    got = torch.vmap(lambda a, b, c: osm.distillation_loss(a, b, c, kind="reverse_kl"))(s3, t3, tgt3)
    want = torch.stack([osm.distillation_loss(s3[i], t3[i], tgt3[i], kind="reverse_kl") for i in range(2)])
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# ---- every CPU capability and thread count ----

def _runnable():
    found = []
    for c in _C.cpu_capabilities():
        try:
            _C._set_cpu_capability(c)
            found.append(c)
        except ValueError:
            pass
        finally:
            _C._set_cpu_capability("")
    return found


@pytest.mark.parametrize("capability", _runnable())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_each_capability_and_thread_count(capability, dtype):
    """Rows crossing the vector widths and the 1024-element blocks, under each compiled capability
    against the oracle; a row's bits the same with 1 and 3 threads, and alone or in a batch."""
    s, t, tgt = distillation_case(7, 2 * 1024 + 77, dtype, seed=41)
    s[2, 5] = -math.inf
    kw = dict(kind="jsd", beta=0.4, temperature=0.8, hard_weight=0.2)
    old = torch.get_num_threads()
    _C._set_cpu_capability(capability)
    try:
        results = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            for kind in KINDS:
                loss, stats = run(s, t, tgt, **dict(kw, kind=kind))
                grad = ops.distillation_backward(torch.ones_like(loss), s, t, tgt, stats,
                                                 *op_options(dict(kw, kind=kind)))
                results.append((loss, stats, grad))
                want = distillation_oracle(s, t, tgt, **dict(kw, kind=kind))
                torch.testing.assert_close(loss.double(), want, rtol=distillation_loss_tol(dtype), atol=distillation_loss_tol(dtype))
        for a, b in zip(results[:3], results[3:]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        alone, _ = run(s[3:4], t[3:4], tgt[3:4], **kw)
        batch, _ = run(s, t, tgt, **kw)
        assert torch.equal(alone[0], batch[3])
    finally:
        torch.set_num_threads(old)
        _C._set_cpu_capability("")


def test_ops_vmap_rules():
    """The three ops under vmap (the vmapped dim folded into the rows; an unbatched teacher and
    target expanded) equal the loop, and the in-place op writes each vmapped call's rows."""
    s, t, tgt = distillation_case(6, 40, torch.float32, seed=51)
    s3, tgt3 = s.view(2, 3, 40), tgt.view(2, 3)
    teacher = t[:3]  # one teacher for both calls
    opts = ("jsd", 0.4, 0.9, 0.3, -100)
    got = torch.vmap(lambda a, c: ops.distillation_forward(a, teacher, c, *opts))(s3, tgt3)
    want = [ops.distillation_forward(s3[i], teacher, tgt3[i], *opts) for i in range(2)]
    for k in range(2):
        torch.testing.assert_close(got[k], torch.stack([w[k] for w in want]))
    g = torch.rand(2, 3)
    grad = torch.vmap(lambda gl, a, c, st: ops.distillation_backward(gl, a, teacher, c, st, *opts))(g, s3, tgt3,
                                                                                                     got[1])
    want_grad = torch.stack([ops.distillation_backward(g[i], s3[i], teacher, tgt3[i], got[1][i], *opts)
                             for i in range(2)])
    assert torch.equal(grad, want_grad)
    over = s3.clone()
    torch.vmap(lambda a, gl, c, st: ops.distillation_backward_(a, gl, teacher, c, st, *opts), out_dims=None)(
        over, g, tgt3, got[1])
    assert torch.equal(over, want_grad)
