"""Vocabulary-parallel ops over torch.distributed: 2 and 4 Gloo processes on 127.0.0.1, each with a
shard (of uneven length) of the softmax dim, must reproduce the single-process ops on the full
tensor, gradients included."""

import pytest
import torch
import torch.distributed as dist

import online_softmax as osm
import online_softmax.distributed as osd
from gloo import close, full_logits, spawn


def shard(x, dim, rank, world):
    # Uneven shards: rank r gets a share proportional to r + 1.
    n = x.shape[dim]
    weights = [r + 1 for r in range(world)]
    bounds = [round(n * sum(weights[:r]) / sum(weights)) for r in range(world + 1)]
    return x.narrow(dim, bounds[rank], bounds[rank + 1] - bounds[rank]), bounds[rank]


def worker(rank, world):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape, dim in (((6, 103), -1), ((6, 40, 3), 1)):
            x = full_logits(shape, dtype, world, dim)
            xs, start = shard(x, dim, rank, world)
            for t in (1.0, 0.7):
                for log in (False, True):
                    fn = osd.log_softmax if log else osd.softmax
                    ref = (osm.log_softmax if log else osm.softmax)(x, dim=dim, temperature=t)
                    got = fn(xs, dim=dim, temperature=t)
                    want = ref.narrow(dim, start, xs.shape[dim])
                    if t != 1.0:
                        # Row 3 holds 1e4-scale logits: the sharded ops round x / t as torch does,
                        # the fused kernels keep (x - max) exact. Compare that row to float64.
                        exact = (torch.log_softmax if log else torch.softmax)(x.double() / t, dim)
                        close(got.movedim(dim, -1)[3].double(),
                              exact.narrow(dim, start, xs.shape[dim]).movedim(dim, -1)[3], torch.bfloat16)
                        got, want = got.movedim(dim, -1)[torch.arange(6) != 3], want.movedim(dim, -1)[torch.arange(6) != 3]
                    close(got, want, dtype)
                lse = osd.logsumexp(xs, dim=dim, temperature=t)
                close(lse.double(), torch.logsumexp(x.double() / t, dim), dtype)
            if dim == -1:
                for k in (1, 5, 17):
                    v, i = osd.softmax_topk(xs, k, dim=dim)
                    want_v, want_i = osm.softmax_topk(x, k, dim=dim)
                    assert torch.equal(i, want_i), (rank, dtype, k, i, want_i)
                    close(v, want_v, dtype)
    # The fused beam-search step with a sharded vocabulary: same ids and scores on every rank.
    for beams, vocab, t in ((4, 1001, 1.0), (3, 64, 0.7), (2, 9, 1.0)):
        logits = torch.randn(2 * beams, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        logits[0, 5] = float("-inf")
        scores = -torch.rand(2, beams, generator=torch.Generator().manual_seed(1))
        shard_logits, _ = shard(logits, 1, rank, world)
        got = osd.beam_search_step(shard_logits, scores, beams, temperature=t, num_candidates=min(2 * beams, vocab))
        want = osm.beam_search_step(logits, scores, beams, temperature=t, num_candidates=min(2 * beams, vocab))
        assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.beam_ids, want.beam_ids)
        close(got.scores, want.scores, torch.float32)
    # Autograd through the sharded softmax, log-softmax and logsumexp (finite rows only).
    x = torch.randn(5, 97, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w = torch.randn(5, 97, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for which in ("softmax", "log_softmax", "logsumexp"):
        xs, start = shard(x, 1, rank, world)
        xs = xs.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        ws = w.narrow(1, start, xs.shape[1])
        if which == "logsumexp":
            (osd.logsumexp(xs, temperature=0.5) * w[:, 0]).sum().backward()
            (torch.logsumexp(xf / 0.5, 1) * w[:, 0]).sum().backward()
        else:
            f = getattr(osd, which)
            g = getattr(torch, which)
            (f(xs, temperature=0.5) * ws).sum().backward()
            (g(xf / 0.5, 1) * w).sum().backward()
        torch.testing.assert_close(xs.grad, xf.grad.narrow(1, start, xs.shape[1]), rtol=1e-10, atol=1e-12)
    # Communication: O(rows) for the state, against gathering the logits.
    stats = osd.communication_bytes(torch.empty(64, 32000), k=None)
    assert stats.state_bytes < stats.gather_logits_bytes / 100


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_ops_equal_single_process(world):
    spawn(worker, world)


def test_requires_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        osd.softmax(torch.randn(2, 3))
