"""The softmax ops on DTensors over Gloo (1 to 4 processes; a 1-D mesh of all ranks and, for 4, a
2 x 2 mesh): each op on a DTensor placed with its softmax dim sharded (evenly, unevenly, ranks with no
class), another dim sharded or replicated must equal the same op on the full tensor, values and
gradients, with the placements and the collective count the DTensor rules promise (one collective
per call where the softmax dim is sharded, none elsewhere)."""

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import online_softmax as osm
import online_softmax.distributed  # noqa: F401  (installs the DTensor rules)
from gloo import (PARTIAL, Cases, check_count, check_placements, check_refused, close, collectives, counted, distribute,
                  empty_shard, full_logits, gathered, meshes, placements, reduced, spawn, vocab_sizes, worlds)
from testlib import random_logits

_ops = torch.ops.online_softmax
# Cases that fail for reasons reported and not yet fixed (a regex of their names): a known_failures
# case runs them alone, expecting them to fail; the others leave them out.
KNOWN_BUGS = None


def outputs(result):
    if isinstance(result, osm.SoftmaxState):
        return result.max, result.sumexp
    return tuple(result) if isinstance(result, tuple) else (result,)


def compare(got, want, dtype, loose_row):
    """got == want; with ``loose_row`` the 1e4-scale row (index 3 of dim 0) to a few ulps of x / t
    there: float32 rounds x / t of 3e4 to 0.004 (the fused kernel keeps x - max exact, a merge of
    shards' states cannot), an error of the exponent that the gradient multiplies by |weight| / t."""
    if not want.dtype.is_floating_point:
        assert torch.equal(got, want), (got, want)
        return
    if loose_row:
        torch.testing.assert_close(got[3], want[3], rtol=5e-2, atol=5e-2, equal_nan=True)
        keep = torch.arange(want.shape[0]) != 3
        got, want = got[keep], want[keep]
    close(got, want, dtype)


def check_op(cases, name, fn, full, mesh, pl, dim, out_placements, loose_row=False):
    """fn on full placed ``pl`` against fn on full: values and placements of every output, one
    collective per mesh dim sharding ``dim``, and the gradient of a random weighting of the floating
    outputs, which must come back placed like the input."""
    if cases.skip(name):
        return
    with cases(name):
        x = distribute(full, mesh, pl).requires_grad_()
        got, count = counted(fn, x)
        check_count(count, collectives(mesh, pl, [dim]), "forward")
        xf = full.clone().requires_grad_()
        got, want = outputs(got), outputs(fn(xf))
        assert len(got) == len(want) == len(out_placements), (len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            compare(gathered(g, f"output {i}"), w, full.dtype, loose_row)
        floating = [(g, w) for g, w in zip(got, want) if w.dtype.is_floating_point]
        weights = [random_logits(w.shape, w.dtype, seed=i + 5) for i, (_, w) in enumerate(floating)]
        sum((g.full_tensor() * c).sum() for (g, _), c in zip(floating, weights)).backward()
        sum((w * c).sum() for (_, w), c in zip(floating, weights)).backward()
        compare(gathered(x.grad, "x.grad"), xf.grad, full.dtype, loose_row)
        check_placements(*((g, p, f"output {i}") for i, (g, p) in enumerate(zip(got, out_placements))),
                         (x.grad, pl, "x.grad"))


def shapes(mesh):
    """(shape, softmax dim, another dim): rows of every vocabulary size, and a softmax dim in the middle."""
    return [((7, v), -1, 0) for v in vocab_sizes(mesh)] + [((7, 13, 3), 1, 2)]


def check_ops(cases, mesh, full, dim, other):
    sdim = dim % full.dim()
    n = full.shape[sdim]
    for pl in placements(mesh.ndim, sdim, other):
        if full.dtype != torch.float64 and not any(p.is_shard(sdim) for p in pl):
            continue  # the local op on each shard: float64 suffices there
        where = f"mesh {tuple(mesh.shape)} {full.dtype} {tuple(full.shape)} dim {dim} {pl}"
        where += " [empty shard]" * empty_shard(mesh, pl, full.shape)
        same, stats, kept = (pl,), (reduced(pl, sdim, False),) * 2, (reduced(pl, sdim, True),) * 2
        # Unsplit rows (each rank's op is the local one) with the temperature only.
        for t in (1.0, 0.7) if any(p.is_shard(sdim) for p in pl) else (0.7,):
            # float32 rounds x / t of the 1e4-scale row; float64 keeps it within its tolerance.
            loose = t != 1.0 and full.dtype != torch.float64
            check_op(cases, f"{where}: softmax t={t}", lambda x: osm.softmax(x, dim, temperature=t),
                     full, mesh, pl, sdim, same, loose)
            check_op(cases, f"{where}: log_softmax t={t}", lambda x: osm.log_softmax(x, dim=dim, temperature=t),
                     full, mesh, pl, sdim, same, loose)
            check_op(cases, f"{where}: softmax_stats t={t}", lambda x: osm.softmax_stats(x, dim, temperature=t),
                     full, mesh, pl, sdim, stats, loose)
        # The op itself (what softmax and log_softmax call), with its dtype argument.
        out = torch.float64 if full.dtype == torch.float32 else None
        check_op(cases, f"{where}: online_softmax.forward log dtype={out}",
                 lambda x: _ops.forward(x, dim, True, 1.0, out), full, mesh, pl, sdim, same)
        for k in sorted({1, n}):
            check_op(cases, f"{where}: softmax_topk k={k}", lambda x: osm.softmax_topk(x, k, dim), full, mesh,
                     pl, sdim, kept)
        check_op(cases, f"{where}: softmax_topk k=2 log t=0.7",
                 lambda x: osm.softmax_topk(x, min(2, n), dim, log=True, temperature=0.7), full, mesh, pl, sdim,
                 kept, full.dtype != torch.float64)


def check_bad_placements(cases, mesh, world):
    """A Partial input is refused before any collective, naming the argument and the placement."""
    local = random_logits((4, 9), torch.float64, seed=3)
    x = DTensor.from_local(local, mesh, [Partial()], run_check=False)
    for name, fn, arg in (("softmax", lambda: osm.softmax(x, -1), "input"),
                          ("log_softmax", lambda: osm.log_softmax(x, -1, temperature=0.5), "input"),
                          ("softmax_stats", lambda: osm.softmax_stats(x, -1), "input"),
                          ("softmax_topk", lambda: osm.softmax_topk(x, 2, -1), "input"),
                          ("online_softmax.forward", lambda: _ops.forward(x, -1, False, 1.0, None), "x")):
        case = f"world {world}: {name} of a Partial DTensor"
        if not cases.skip(case):
            with cases(case):
                check_refused(fn, arg, PARTIAL)


def worker(rank, world, only_known=False):
    cases = Cases(rank, KNOWN_BUGS, only_known)
    every = meshes(world)
    for mesh in every:
        for shape, dim, other in shapes(mesh):
            for dtype in (torch.float32, torch.float64):
                check_ops(cases, mesh, full_logits(shape, dtype, world, dim, ties=slice(1, None)), dim, other)
    mesh = every[0]
    full = full_logits((7, 13), torch.bfloat16, 1, -1, ties=slice(1, None))
    for log in (False, True):
        check_op(cases, f"world {world}: bfloat16 (7, 13) Shard(1) log={log}",
                 lambda x: _ops.forward(x, -1, log, 1.0, None), full, mesh, (Shard(1),), 1, ((Shard(1),),))
    check_op(cases, f"world {world}: bfloat16 (7, 13) Replicate softmax", lambda x: osm.softmax(x, -1), full,
             mesh, (Replicate(),), 1, ((Replicate(),),))
    check_bad_placements(cases, mesh, world)
    cases.report()


@pytest.mark.parametrize("world, only_known", worlds(KNOWN_BUGS))
def test_dtensor_ops_equal_full_tensor_ops(world, only_known):
    spawn(worker, world, only_known)
