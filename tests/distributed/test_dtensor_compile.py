"""DTensors through torch.compile: a softmax split along its dim, log_softmax's backward and
cross_entropy compile (DTensor traces the ops' rules and their collectives) and give eager's values
and gradients, on 2 Gloo processes.

The ranks' shards are uneven (19 and 18 classes) and torch's on-disk compile caches key a graph on
the DTensor's global shape: two ranks of one host sharing the cache can load each other's graph
(an assert_size_stride failure, on a second run or a race). Each rank here compiles without them."""

import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

import online_softmax as osm
from gloo import close, spawn


def worker(rank, world):
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # every rank the same full tensors
    full = torch.randn(6, 37)
    target = torch.randint(0, 37, (6,))
    target[2] = -100
    x = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
    t = distribute_tensor(target, mesh, [Replicate()])

    y = torch.compile(lambda a: osm.softmax(a, dim=-1) * 2)(x)
    close(y.full_tensor(), torch.softmax(full, -1) * 2, torch.float32)

    torch.compile(lambda a: osm.log_softmax(a, dim=-1).square().sum())(x).backward()
    xf = full.clone().requires_grad_()
    torch.log_softmax(xf, -1).square().sum().backward()
    close(x.grad.full_tensor(), xf.grad, torch.float32)
    assert tuple(x.grad.placements) == (Shard(1),)

    x.grad, xf.grad = None, None
    loss = torch.compile(lambda a, b: osm.cross_entropy(a, b, label_smoothing=0.1))(x, t)
    loss.backward()
    want = torch.nn.functional.cross_entropy(xf, target, label_smoothing=0.1)
    want.backward()
    close(loss.full_tensor(), want, torch.float32)
    close(x.grad.full_tensor(), xf.grad, torch.float32)


def test_dtensor_ops_compile():
    spawn(worker, 2)
