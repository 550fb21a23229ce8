"""The vocabulary-parallel cross-entropy over Gloo: 2, 3 (uneven shards) and 4 processes must give
every rank the unsharded loss and each rank its shard of the unsharded gradient."""

import pytest
import torch

import online_softmax.distributed as osd
from online_softmax.losses import cross_entropy
from gloo import spawn
from testlib import random_logits

VOCAB = 101
SETTINGS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.2),
            dict(weighted=True, label_smoothing=0.1), dict(weighted=True, reduction="mean"),
            dict(z_loss=1e-3, softcap=4.0), dict(ignore_index=7)]


def bounds(world):
    # Uneven shards: rank r gets a share proportional to r + 1.
    weights = [r + 1 for r in range(world)]
    return [round(VOCAB * sum(weights[:r]) / sum(weights)) for r in range(world + 1)]


def worker(rank, world):
    lo, hi = bounds(world)[rank], bounds(world)[rank + 1]
    x = random_logits((3, 6, VOCAB), torch.float64, seed=11)
    targets = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(12))
    targets[0, 2] = -100
    targets[1, 4] = 7
    class_w = torch.rand(VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(13)) + 0.1
    for setting in SETTINGS:
        kw = dict(setting)
        weighted = kw.pop("weighted", False)
        t = targets.masked_fill(targets == -100, kw.get("ignore_index", -100))
        full = x.clone().requires_grad_()
        want = cross_entropy(full.movedim(-1, 1), t, weight=class_w if weighted else None, **kw)
        part = x[..., lo:hi].clone().requires_grad_()
        got = osd.cross_entropy(part, t, lo, weight=class_w[lo:hi] if weighted else None, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
        (want * g).sum().backward()
        (got * g).sum().backward()
        torch.testing.assert_close(part.grad, full.grad[..., lo:hi], rtol=1e-10, atol=1e-12)
    # bfloat16 logits: the loss in float32 from the same rounded logits as the unsharded op.
    xb = x.to(torch.bfloat16)
    got = osd.cross_entropy(xb[..., lo:hi], t, lo)
    want = cross_entropy(xb.movedim(-1, 1), t)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel_cross_entropy_equals_unsharded(world):
    spawn(worker, world)


def test_bad_arguments_before_any_collective():
    x = torch.randn(4, 10)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        osd.cross_entropy(x, torch.zeros(4, dtype=torch.int64), 1.5)
    with pytest.raises(ValueError, match="reduction"):
        osd.cross_entropy(x, torch.zeros(4, dtype=torch.int64), 0, reduction="avg")
