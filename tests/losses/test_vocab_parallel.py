"""The vocabulary-parallel cross-entropy with one rank (Gloo on the CPU, NCCL on a GPU): the
numerics at large logits and the device case. Several ranks: tests/distributed/."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import online_softmax.distributed as osd


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(device):
    """A process group of one rank for the device: Gloo on the CPU, NCCL on a GPU."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_backend_available(backend):
        pytest.skip(f"torch.distributed has no {backend} backend here")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0) if device == "cuda" else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.2), dict(reduction="sum", weighted=True)])
def test_one_rank_at_large_logits_equals_torch(one_rank, options):
    """Logits near 1e4 (float32) and -3e38 (float64): the loss is log d - (x[t] - m) and the
    gradient exp(x - m) / d, as torch's, not through a rounded lse."""
    device = one_rank
    options = dict(options)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(17, 300, generator=g) * 3).to(device)
    x[5] += 1e4
    t = torch.randint(0, 300, (17,), generator=g).to(device)
    if options.pop("weighted", False):
        options["weight"] = (torch.rand(300, generator=g) + 0.5).to(device)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    got = osd.cross_entropy(a, t, 0, **options)
    want = F.cross_entropy(b, t, **options)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    (ga,) = torch.autograd.grad(got, a)
    (gb,) = torch.autograd.grad(want, b)
    torch.testing.assert_close(ga, gb, rtol=1.3e-6, atol=1e-5)
    x64 = torch.full((3, 4), -3e38, dtype=torch.float64, device=device)
    t64 = torch.tensor([0, 1, 3], device=device)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items() if k != "weight"}
    torch.testing.assert_close(osd.cross_entropy(x64, t64, 0, **kw64), F.cross_entropy(x64, t64, **kw64),
                               rtol=1e-14, atol=0)

