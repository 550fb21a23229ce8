"""Every op through torch.library.opcheck, torch.compile without graph breaks, bad input, threads."""

import concurrent.futures

import pytest
import torch

import online_softmax as osm
from testlib import beam_state, beam_step_inputs, random_logits

ops = torch.ops.online_softmax


def _samples(device):
    x = random_logits((5, 37), torch.float32, device).requires_grad_()
    x3 = random_logits((3, 20, 6), torch.float64, device).requires_grad_()
    xh = random_logits((4, 40), torch.bfloat16, device)
    y = torch.softmax(x.detach(), -1)
    m, d = ops.stats(x.detach(), -1)
    v, i, tm, td = ops.softmax_topk(x.detach(), 4, -1)
    t64 = torch.full((5,), 0.9, dtype=torch.float64, device=device)
    u64 = torch.rand(5, 3, dtype=torch.float64, device=device)
    xr = random_logits((2, 3, 37), torch.float32, device)
    xt = random_logits((5, 37), torch.float32, device, seed=1)
    _dl, dst = ops.distillation_forward(x.detach(), xt, None, "kl", 0.5, 0.8, 0.0, -100)
    accept_all = torch.cat([torch.zeros(2, 2, dtype=torch.float64, device=device), u64[:2, :1]], 1)  # no padding
    edit_ids = torch.tensor([[0, 36, -1], [5, -1, -1], [-1, -1, -1], [1, 2, 3], [36, -1, -1]], device=device)
    edit_values = torch.tensor([[2.0, float("-inf"), 0.0], [9.0, 0.0, 0.0], [0.0] * 3, [-1.0, 1.0, 3.0],
                                [float("-inf"), 0.0, 0.0]], device=device)
    return [
        (ops.forward, (x, -1)),
        (ops.forward, (x, 1, True, 0.5, None)),
        (ops.forward, (x3, 1, False, 2.0, None)),
        (ops.forward, (xh, -1, False, 1.0, torch.float32)),
        (ops.masked_forward, (x3, torch.rand(20, 1, device=device) > 0.3, False, 0, False, 0.5, 1, None)),
        (ops.masked_forward, (x, torch.randn(37, device=device), True, 2, True, 1.0, -1, None)),
        (ops.backward, (torch.randn_like(y), y, -1, False, 1.0, None)),
        (ops.backward, (torch.randn_like(y), y.log(), -1, True, 1.0, torch.float16)),
        (ops.backward_, (torch.randn_like(y), y, -1, False, 1.0)),
        (ops.backward_, (torch.randn(3, 20, 6, dtype=torch.float64, device=device),
                         torch.softmax(x3.detach(), 1), 1, False, 0.5)),
        (ops.stats, (x.detach(), -1, 1.0)),
        (ops.stats, (x3.detach(), 0, 0.5)),
        (ops.softmax_topk, (x, 4, -1, False, 1.0)),
        (ops.softmax_topk, (x3, 3, 1, True, 0.7)),
        (ops.softmax_topk_backward, (torch.randn_like(v), x.detach(), i, tm, td, -1, False, 1.0)),
        (ops.beam_search_step, (x.detach(), torch.zeros(1, 5, device=device), 5, 10, 1.0,
                                torch.tensor([[1, -1]] * 5, device=device), None, 1.0)),
        (ops.ngram_banned_tokens, (torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4]], device=device), 3)),
        (ops.beam_search_advance, beam_state(2, 3, 4, 9, device=device)
         + beam_step_inputs(beam_state(2, 3, 4, 9, device=device), 6, 4, stop_prob=0.5) + (4, 4, 1.0, 0)),
        (ops.sample_categorical, (x.detach(), t64, None, u64)),
        (ops.sample_categorical, (xh, t64[:4], torch.full((4,), -1.0, dtype=torch.float64, device=device),
                                  u64[:4])),
        (ops.sample_categorical, (xh, t64[:4], None, u64[:4], edit_ids[:4], edit_values[:4])),
        (ops.top_p_threshold, (x.detach(), t64, torch.full((5,), 0.8, dtype=torch.float64, device=device))),
        (ops.top_p_threshold, (x.detach(), t64, torch.full((5,), 0.8, dtype=torch.float64, device=device), edit_ids,
                               edit_values)),
        (ops.rejection_sample, (xr, xr[:, :2].argmax(-1), torch.softmax(xr[:, :2], -1), torch.full((2,), 2, device=device),
                                torch.tensor([0.0, 0.8], dtype=torch.float64, device=device), None, accept_all)),
        (ops.token_logprobs, (x.detach(), torch.tensor([0, 3, 36, 5, 1], device=device), 4, 0.8, None)),
        (ops.token_logprobs, (xh, torch.tensor([1, 0, 39, 7], device=device), 0, 1.0,
                              torch.randn(4, device=device))),
        (ops.cross_entropy_backward, (x.detach(), m, d, torch.tensor([0, 3, 36, 5, 1], device=device),
                                      torch.rand(5, device=device), torch.rand(5, device=device))),
        (ops.cross_entropy_backward, (x3.detach()[:, :, 0].contiguous(), torch.zeros(3, dtype=torch.float64,
                                      device=device), torch.full((3,), 20.0, dtype=torch.float64, device=device),
                                      torch.tensor([0, 19, 4], device=device),
                                      torch.ones(3, dtype=torch.float64, device=device),
                                      torch.ones(3, dtype=torch.float64, device=device),
                                      torch.full((3,), 0.1, dtype=torch.float64, device=device),
                                      torch.rand(20, dtype=torch.float64, device=device))),
        (ops.cross_entropy_backward_, (x.detach().clone(), m, d, torch.tensor([4, 0, 36, 2, 1], device=device),
                                       torch.rand(5, device=device), torch.rand(5, device=device),
                                       torch.full((5,), 0.01, device=device), None)),
        (ops.token_logprobs_backward, (torch.randn(5, device=device), torch.randn(5, device=device), x.detach(),
                                       torch.tensor([0, 3, 36, 5, 1], device=device), m, d,
                                       torch.rand(5, device=device), 0.8)),
        (ops.token_logprobs_backward, (torch.randn(3, dtype=torch.float64, device=device), None,
                                       x3.detach()[:, :, 0].contiguous(),
                                       torch.tensor([0, 19, 4], device=device), *ops.stats(x3.detach()[:, :, 0], -1),
                                       torch.ones(3, dtype=torch.float64, device=device), 1.0)),
        (ops.token_logprobs_backward_, (x.detach().clone(), torch.randn(5, device=device),
                                        torch.randn(5, device=device), torch.tensor([4, 0, 36, 2, 1], device=device),
                                        m, d, torch.rand(5, device=device), 1.0)),
        (ops.distillation_forward, (x.detach(), xt, torch.tensor([0, 3, -100, 5, 36], device=device), "jsd", 0.3, 0.8,
                                    0.4, -100)),
        (ops.distillation_forward, (x3.detach()[:, :, 0].contiguous(), x3.detach()[:, :, 1].contiguous(), None,
                                    "reverse_kl", 0.5, 1.0, 0.0, -100)),
        (ops.distillation_backward, (torch.rand(5, device=device), x.detach(), xt, None, dst, "kl", 0.5, 0.8, 0.0,
                                     -100)),
        (ops.distillation_backward_, (x.detach().clone(), torch.rand(5, device=device), xt,
                                      torch.tensor([1, 2, 3, -100, 0], device=device), dst, "kl", 0.5, 0.8, 0.5, -100)),
    ]


def test_opcheck_every_op(device):
    covered = set()
    for op, args in _samples(device):
        torch.library.opcheck(op, args)
        covered.add(op._name if hasattr(op, "_name") else str(op))
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("online_softmax::")}
    assert len(covered) == len(registered) == 21, (covered, registered)


def test_torch_compile_fullgraph():
    def f(x):
        p = osm.softmax(x, -1, temperature=0.9)
        lp = osm.log_softmax(x, 0)
        values, indices = osm.softmax_topk(x, 3)
        st = osm.softmax_stats(x)
        return p.sum() + lp.sum() + values.sum() + st.logsumexp().sum(), indices

    x = random_logits((8, 50), torch.float32).requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    loss, idx = compiled(x)
    ref_loss, ref_idx = f(x)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(idx, ref_idx)
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(g, g_ref)


def test_torch_compile_module_dynamic_shapes():
    m = torch.compile(osm.OnlineSoftmax(-1), fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (7, 19, 33):
        x = random_logits((3, n), torch.float32)
        torch.testing.assert_close(m(x), torch.softmax(x, -1))


@pytest.mark.parametrize("fn", [osm.softmax, osm.log_softmax])
def test_bad_input_raises_clear_errors(fn):
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fn(torch.arange(12).reshape(3, 4), -1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fn(torch.ones(3, dtype=torch.bool), -1)
    with pytest.raises(TypeError, match="dtype"):
        fn(x, -1, dtype=torch.int32)
    with pytest.raises(IndexError, match="dim=2"):
        fn(x, 2)
    with pytest.raises(IndexError, match="dim=-3"):
        fn(x, -3)
    with pytest.raises(ValueError, match="temperature"):
        fn(x, -1, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        fn(x, -1, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        fn(x, -1, temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        fn(x, -1, temperature=1e-39)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fn([1.0, 2.0], -1)
    with pytest.raises(TypeError, match="complex|floating"):
        fn(torch.randn(3, dtype=torch.complex64), -1)


def test_fake_kernels_raise_the_same_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4)
        with pytest.raises(IndexError, match="dim"):
            ops.forward(x, 5)
        with pytest.raises(ValueError, match="k"):
            ops.softmax_topk(x, 9, -1)
        with pytest.raises(ValueError, match="temperature"):
            ops.stats(x, -1, -2.0)
        assert ops.softmax_topk(x, 2, 0)[0].shape == (2, 4)


def test_concurrent_calls_from_threads():
    xs = [random_logits((64, 4099), torch.float32, seed=s) for s in range(8)]
    expected = [torch.softmax(x, -1) for x in xs]

    def work(i):
        return i, osm.softmax(xs[i], -1), osm.softmax_topk(xs[i], 5)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for i, y, (v, idx) in pool.map(work, list(range(8)) * 3):
            torch.testing.assert_close(y, expected[i])
            torch.testing.assert_close(v, expected[i].topk(5).values)


def test_build_info():
    """build_info() against facts found another way: the dispatcher's kernels for every op, the
    torch that runs, the installed package's metadata."""
    import importlib.metadata

    info = osm.build_info()
    op_names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("online_softmax::"))
    backend_ops = [n for n in op_names if n != "online_softmax::beam_search_step"]  # a composite, on every backend
    assert backend_ops and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU") for n in backend_ops)
    assert info["cpu"] is True
    cuda_kernels = [torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in backend_ops]
    assert all(cuda_kernels) or not any(cuda_kernels), "a build has CUDA kernels for every op or for none"
    assert info["cuda"] is cuda_kernels[0]
    if torch.version.cuda is None:  # a CPU build of torch cannot have loaded CUDA kernels
        assert info["cuda"] is False
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["torch"] == torch.__version__
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_capabilities"][0] == "DEFAULT"
    assert info["cpu_capability"] in info["cpu_capabilities"]
    assert info["version"] == osm.__version__ == importlib.metadata.version("online_softmax")
