"""token_logprobs_backward(_) against the float64 formula on every dtype and device, in place, on
hostile values and bad input; and token_logprobs' autograd node (its log_probs, top_log_probs and
entropy differentiable, in float64 gradcheck, double backward, forward mode and torch.func)."""

import pytest
import torch

from testlib import assert_token_logprobs_grad, random_logits, state_dtype, token_logprobs_backward_case, \
    token_row_state

ops = torch.ops.online_softmax
ARGS = ("grad_log_probs", "grad_entropy", "x", "token_ids", "max", "sumexp", "entropy", "temperature")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def call(args, **change):
    a = dict(args, **change)
    return ops.token_logprobs_backward(*[a[k] for k in ARGS])


def call_(args, **change):
    a = dict(args, **change)
    ops.token_logprobs_backward_(a["x"], *[a[k] for k in ARGS if k != "x"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("n,temperature", [(1, 1.0), (37, 0.7), (1000, 1.0), (4099, 2.5)])
def test_equals_the_formula(device, dtype, entropy, n, temperature):
    args = token_logprobs_backward_case(6, n, dtype, device=device, seed=n, offset=1, entropy=entropy,
                                        temperature=temperature)
    out = call(args)
    assert out.device.type == device
    assert_token_logprobs_grad(out, args, what=f"{dtype} n={n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_equals_out_of_place(device, dtype):
    args = token_logprobs_backward_case(5, 300, dtype, device=device, seed=2, temperature=0.6)
    want = call(args)
    x = args["x"].clone()
    call_(args, x=x)
    assert torch.equal(x, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hostile_values(device, dtype):
    """-inf logits (exactly 0 with grad_entropy: not 0 * -inf), a token at -inf, an all -inf row
    (NaN, as torch), NaN in x, and 1e4-scale logits at a temperature keep their digits."""
    n = 70
    args = token_logprobs_backward_case(5, n, dtype, device=device, seed=3, temperature=0.9)
    x = args["x"]
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x[2, 5] = float("nan")
    x[3] = (torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 1e4).to(dtype)
    m, d, h = token_row_state(x, 0.9)
    acc = state_dtype(dtype)
    args.update(max=m.to(acc).to(device), sumexp=d.to(acc).to(device), entropy=h.to(acc).to(device))
    args["token_ids"][0] = 0
    out = call(args)
    assert_token_logprobs_grad(out, args, what=f"hostile {dtype}")
    assert (out[0, 3::3] == 0).all() and torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.isfinite(out[3]).all()


def test_empty():
    for rows, n in ((0, 5), (3, 0)):
        args = token_logprobs_backward_case(rows, n, torch.float32)
        assert call(args).shape == (rows, n)


def test_bad_input_names_the_argument():
    args = token_logprobs_backward_case(4, 10, torch.float32)
    with pytest.raises(IndexError, match=r"token_ids must lie in \[0, 10\), got 10"):
        call(args, token_ids=torch.tensor([0, 10, 1, 2]))
    with pytest.raises(IndexError, match="token_ids must lie"):
        call(args, token_ids=torch.tensor([0, -1, 1, 2]))
    with pytest.raises(TypeError, match="token_ids must be int64"):
        call(args, token_ids=args["token_ids"].int())
    with pytest.raises(ValueError, match=r"token_ids must have shape \[4\]"):
        call(args, token_ids=args["token_ids"][:3])
    with pytest.raises(TypeError, match="grad_entropy must be Float"):
        call(args, grad_entropy=args["grad_entropy"].double())
    with pytest.raises(ValueError, match=r"max must have shape \[4\]"):
        call(args, max=args["max"][:2])
    with pytest.raises(ValueError, match="x must be 2-D"):
        call(args, x=args["x"][0])
    with pytest.raises(ValueError, match="temperature"):
        call(args, temperature=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        call_(args, x=args["x"].t().contiguous().t())


def test_vmap_folds_into_rows():
    args = [token_logprobs_backward_case(3, 20, torch.float32, seed=s) for s in range(4)]
    stacked = {k: torch.stack([a[k] for a in args]) for k in ARGS if k != "temperature"}
    got = torch.vmap(lambda *t: ops.token_logprobs_backward(*t, 1.0))(*[stacked[k] for k in ARGS[:-1]])
    for i, a in enumerate(args):
        assert torch.equal(got[i], call(a))
    # An unbatched grad_entropy and entropy are shared by every vmapped call.
    got = torch.vmap(lambda g, x: ops.token_logprobs_backward(g, args[0]["grad_entropy"], x, args[0]["token_ids"],
                                                               args[0]["max"], args[0]["sumexp"], args[0]["entropy"]),
                     in_dims=(0, 0))(stacked["grad_log_probs"], stacked["x"])
    assert torch.equal(got[1], call(args[0], grad_log_probs=args[1]["grad_log_probs"], x=args[1]["x"]))


def test_its_own_derivative_raises():
    args = token_logprobs_backward_case(3, 9, torch.float64)
    g = args["grad_log_probs"].clone().requires_grad_()
    out = call(args, grad_log_probs=g)
    with pytest.raises(NotImplementedError, match="no derivative of its own"):
        out.sum().backward()


# ---- token_logprobs' autograd node ----

needs_forward = pytest.mark.skipif(not hasattr(ops, "token_logprobs"), reason="the token_logprobs op is not built")


def composition(x, ids, top_ids, t, values=None):
    """(log_probs, top_log_probs, entropy) in differentiable torch ops."""
    log_p = torch.log_softmax(x.double() / t, -1)
    p = log_p.exp()
    lp = log_p.gather(-1, ids[:, None]).squeeze(-1)
    if values is not None:
        lp = lp - x.double().gather(-1, ids[:, None]).squeeze(-1) / t + values / t
    return lp, log_p.gather(-1, top_ids), -(p * log_p).sum(-1)


@needs_forward
@pytest.mark.parametrize("top_n", [0, 3])
@pytest.mark.parametrize("with_values", [False, True])
def test_gradcheck_and_double_backward(device, top_n, with_values):
    x = random_logits((4, 11), torch.float64, device, seed=top_n).requires_grad_()
    ids = torch.tensor([0, 5, 10, 3], device=device)
    values = (x.detach().gather(-1, ids[:, None]).squeeze(-1) + 0.25).requires_grad_() if with_values else None

    def fn(x, values=None):
        lp, _r, _i, top, _m, _d, ent = ops.token_logprobs(x, ids, top_n, 0.8, values)
        return lp, top, ent

    inputs = (x, values) if with_values else (x,)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    # Against the composition, one gradient for all three outputs.
    got = fn(*inputs)
    want = composition(x, ids, ops.token_logprobs(x.detach(), ids, top_n, 0.8)[2], 0.8, values)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    ws = [torch.randn_like(o) for o in got]
    g_ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got, ws)), inputs)
    g_want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, ws)), inputs)
    for a, b in zip(g_ours, g_want):
        torch.testing.assert_close(a, b)


@needs_forward
def test_forward_mode_and_torch_func():
    x = random_logits((3, 9), torch.float64, seed=5)
    ids = torch.tensor([1, 8, 0])
    top_ids = ops.token_logprobs(x, ids, 2, 1.3)[2]
    tx = torch.randn_like(x)

    def ours(x):
        lp, _r, _i, top, _m, _d, ent = ops.token_logprobs(x, ids, 2, 1.3)
        return lp, top, ent

    _, t_ours = torch.func.jvp(ours, (x,), (tx,))
    _, t_want = torch.func.jvp(lambda x: composition(x, ids, top_ids, 1.3), (x,), (tx,))
    for a, b in zip(t_ours, t_want):
        torch.testing.assert_close(a, b)
    h_ours = torch.func.hessian(lambda x: ours(x)[2].sum())(x)
    h_want = torch.func.hessian(lambda x: composition(x, ids, top_ids, 1.3)[2].sum())(x)
    torch.testing.assert_close(h_ours, h_want)
