"""What the tests of this folder share: Gloo processes on 127.0.0.1 (one spawn per test, its worker
running many cases), logits with hostile rows, per-dtype tolerances, a record of the failing cases
(so that a spawn that runs a hundred cases says which ones failed), and the DTensor meshes,
placements and collective counts of the DTensor tests."""

import contextlib
import datetime
import re
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

from testlib import random_logits

# A rank that raises before a collective the others entered leaves them waiting: fail in minutes,
# not after Gloo's default half hour.
TIMEOUT = datetime.timedelta(seconds=120)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world, *args):
    """worker(rank, world, *args) in ``world`` processes joined in one Gloo process group; an
    exception in any of them fails the caller with that process's traceback."""
    mp.spawn(_joined, args=(worker, world, free_port(), args), nprocs=world, join=True)


def _joined(rank, worker, world, port, args):
    # The processes share 2 cores: intra-op threads would only contend.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


class Cases:
    """The cases of one worker: ``with cases("name"):`` records an exception under the case's name
    and goes on with the next case; ``report()`` raises them all at the end.

    ``known``: a regex of the names of cases that fail for a reason reported and not yet fixed; they
    are left out (``skip(name)``), or with ``only_known`` are the only ones run (by an xfail test)."""

    def __init__(self, rank, known=None, only_known=False):
        self.rank, self.count, self.failures = rank, 0, []
        self.known, self.only_known = known, only_known

    def skip(self, name):
        is_known = bool(self.known and re.search(self.known, name))
        return is_known != self.only_known

    @contextlib.contextmanager
    def __call__(self, name):
        self.count += 1
        try:
            yield
        except Exception as e:  # noqa: BLE001  (every failure is reported, by report())
            self.failures.append(f"{name}: {type(e).__name__}: {str(e)[:1500]}")
            # Now too: a rank that fails alone leaves the others in a collective it never joins,
            # and Gloo may end the processes before report().
            print(f"rank {self.rank}: {self.failures[-1]}", file=sys.stderr, flush=True)

    def report(self):
        if self.failures:
            shown = self.failures[:40] + [f"... and {len(self.failures) - 40} more"] * (len(self.failures) > 40)
            raise AssertionError(f"rank {self.rank}: {len(self.failures)} of {self.count} cases failed:\n"
                                 + "\n".join(shown))


def worlds(known_bugs):
    """The parameters (world, only_known) of a test whose worker takes them: 1 to 4 ranks, and where
    the test has ``known_bugs``, those cases alone on 4 ranks (every case runs there), which must
    fail until fixed: strict, so that a fix is noticed and its cases leave the regex."""
    out = [pytest.param(world, False, id=str(world)) for world in (1, 2, 3, 4)]
    if known_bugs:
        out.append(pytest.param(4, True, id="known_failures", marks=pytest.mark.xfail(
            strict=True, reason=f"cases the implementation fails (KNOWN_BUGS: {known_bugs})")))
    return out


def full_logits(shape, dtype, seed, dim, ties=slice(10, 20), nonfinite=True):
    """Random logits whose first rows along ``dim`` are hostile: all -inf (NaN, as in torch), a NaN,
    a +inf (``nonfinite``), 1e4-scale, and equal values over ``ties`` (spanning shard boundaries)."""
    x = random_logits(shape, dtype, seed=seed)
    rows = x.movedim(dim, -1)               # a view: rows along the softmax dim
    if nonfinite:
        rows[0] = float("-inf")
        rows[1, ..., min(7, rows.shape[-1] - 1)] = float("nan")
        rows[2, ..., -1] = float("inf")
    if dtype != torch.float16:
        rows[3] = rows[3] * 1e4
    rows[4, ..., ties] = 5.0
    return x


def tolerance(dtype):
    # float64: 1e4-scale logits leave x/t - m a few ulps of 1e4 (~1e-11) from the kernel's (x - M)/t.
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else (1e-10 if dtype == torch.float64 else 1e-5)


def close(a, b, dtype):
    tol = tolerance(dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


# DTensor


def vocab_sizes(mesh):
    """Class counts under DTensor's torch.chunk split over the ranks of a 1-D mesh: divisible by
    every world, not divisible, one more than the world (a rank holds no class for world 3 and 4)
    and one less (fewer classes than ranks). On the 2 x 2 mesh (2 ranks share the classes) one
    uneven split and one with an empty shard."""
    if mesh.ndim == 2:
        return [1, 13]
    world = mesh.size()
    return sorted({12, 13, world + 1} | ({world - 1} if world > 1 else set()))


def meshes(world):
    """The 1-D mesh of all ranks, and for 4 ranks the 2 x 2 mesh ("dp", "tp")."""
    out = [init_device_mesh("cpu", (world,))]
    if world == 4:
        out.append(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
    return out


def placements(ndim, classes, other):
    """Placements of a tensor whose softmax (class) dim is ``classes``, on a mesh of ``ndim`` dims:
    classes sharded, another dim sharded, replicated; on 2-D meshes the classes on either mesh dim
    with ``other`` on the other one, and ``other`` alone."""
    if ndim == 1:
        return [(Shard(classes),), (Shard(other),), (Replicate(),)]
    return [(Shard(other), Shard(classes)), (Shard(classes), Shard(other)), (Shard(other), Replicate())]


def empty_shard(mesh, placements, shape):
    """Whether some rank holds none of a sharded dim (DTensor splits as torch.chunk does)."""
    return any(p.is_shard() and len(torch.arange(shape[p.dim]).chunk(mesh.size(i))) < mesh.size(i)
               for i, p in enumerate(placements))


def distribute(t, mesh, placements):
    # Every rank holds the same full tensor: each takes its shard, with no collective.
    return distribute_tensor(t, mesh, list(placements), src_data_rank=None)


def reduced(placements, dim, keepdim):
    """The placements of a reduction along tensor dim ``dim`` of a tensor placed so: Replicate where
    ``dim`` was sharded, the other shards kept (their dim shifted down when ``dim`` goes away)."""
    out = []
    for p in placements:
        if p.is_shard(dim):
            out.append(Replicate())
        elif p.is_shard() and not keepdim and p.dim > dim:
            out.append(Shard(p.dim - 1))
        else:
            out.append(p)
    return tuple(out)


def collectives(mesh, placements, dims):
    """The collective counts a call may issue: one per mesh dim sharding one of tensor dims ``dims``
    (the class dim: the merge of the row states; the rows: the O(1) all-reduce of a reduced loss);
    over a mesh dim of one rank it may be left out."""
    sharding = [i for i, p in enumerate(placements) if any(p.is_shard(d) for d in dims)]
    return range(sum(1 for i in sharding if mesh.size(i) > 1), len(sharding) + 1)


def counted(fn, *args, **kwargs):
    """fn's result and the number of collectives it issued."""
    mode = CommDebugMode()
    with mode:
        out = fn(*args, **kwargs)
    return out, mode.get_total_counts()


def check_count(count, allowed, what):
    assert count in allowed, f"{what}: {count} collectives, expected {' or '.join(map(str, allowed))}"


def gathered(t, what):
    """The whole of DTensor t (a collective)."""
    assert isinstance(t, DTensor), f"{what} is a {type(t).__name__}, not a DTensor"
    return t.full_tensor()


def check_placements(*checks):
    """(DTensor, expected placements, what) triples; checked after the values, so that a case with
    wrong values says so even where the placements are wrong too."""
    wrong = [f"{what} placed {tuple(t.placements)}, expected {tuple(p)}" for t, p, what in checks
             if tuple(t.placements) != tuple(p)]
    assert not wrong, "; ".join(wrong)


# How a refusal may name a placement: DTensor's short form (P(sum), S(0)) or the class.
PARTIAL = r"P\(sum\)|Partial"
SHARD = r"S\(\d\)|Shard"


def check_refused(fn, arg, placement):
    """fn raises a ValueError naming the argument ``arg`` and the placement (a regex)."""
    with pytest.raises(ValueError, match=placement) as info:
        fn()
    assert re.search(rf"\b{arg}\b", str(info.value)), f"the message does not name {arg}: {info.value}"
