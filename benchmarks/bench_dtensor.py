"""Vocabulary-sharded DTensor cross-entropy over Gloo ranks: online_softmax against loss_parallel.

Forward + backward of both, in one run: time, the collectives each rank issues and their bytes,
extra peak memory.

    python benchmarks/bench_dtensor.py [--ranks 4] [--rows 8192] [--vocab 128256] [--dtype float32]
                                       [--repeats 5] [--json results.json]

Logits x (rows, vocab) are a DTensor ``Shard(1)`` (classes split across the ranks like torch.chunk)
on a 1-D CPU mesh, requires_grad; the target a ``Replicate`` DTensor of class indices. Peers:

- ``ours``: ``online_softmax.cross_entropy(x, target)``, ``loss.backward()``
  (``--ours process_group``: ``online_softmax.distributed.cross_entropy(x.to_local(),
  target.to_local(), vocab_start)``, the same kernels without the DTensor rule);
- ``loss_parallel``: ``with loss_parallel(): F.cross_entropy(x, target)`` and ``loss.backward()``
  inside the context, as its documentation asks.

Each rank builds its own shard from a generator seeded by its rank (no full tensor is ever
distributed). Threads per rank: max(1, cores // ranks). A timed call is one forward + backward on
every rank after a barrier; its time is the slowest rank's (all_reduce MAX of the elapsed times).
After one warm-up call of each peer and the measured call below, the peers alternate (ours,
loss_parallel, ours, ...; online_softmax.bench.balanced_order); the table gives the median of
--repeats calls.

Communication is measured, not modelled: one more call of each peer runs under a TorchDispatchMode
that records every c10d / _c10d_functional collective (DTensor is let desugar first, as
CommDebugMode does) with the tensors it sends. Accounting, per rank: all_reduce of S bytes counts
S; all_gather of an S-byte piece counts S; reduce_scatter of an S-byte input counts S; broadcast
counts S on every rank; wait_tensor and barrier count nothing. Bytes per row = bytes / rows. The
ring model column is what the ring algorithms would put on the wire (ring_factor): an all_gather
forwards every other rank's piece, so one all_gather of S is not cheaper in bytes than all_reduces of
S, only in round trips.
The same call gives the extra peak memory: each rank's VmHWM above its RSS before the call (the
logits shard and the target are in that baseline, the gradient and all temporaries are not), reset
through /proc/self/clear_refs; the table gives the largest rank's. It also checks the peers agree:
the losses, and the gradients of the first 64 rows of each rank's shard.

The default size fills a 24 GiB machine: 4 GiB of logits, and at loss_parallel's peaks about 22 GiB
in use (a 2-core AMD EPYC, 2026-12-08); both peers' times include first-touch page faults of their
fresh logits-sized buffers (most of the run's time is system time), loss_parallel's the most.
"""

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from online_softmax.bench import balanced_order, machine_info, machine_line

PEERS = ("ours", "loss_parallel")
OURS_CALL = {"dtensor": "online_softmax.cross_entropy(x, target)",
             "process_group": "online_softmax.distributed.cross_entropy(x.to_local(), target.to_local(), vocab_start)"}
PEAK_SHARDS = 4  # see memory_estimate_gib
PROCESS_BYTES = 300 * 2 ** 20
CHECK_ROWS = 64  # rows of each rank's gradient compared between the peers
# The arguments a collective sends from, by schema name: the input of out-of-place collectives,
# else the in-place buffer (all_reduce_, broadcast_).
SENT_ARGS = ("input", "input_tensor", "input_tensors", "inputs", "tensors", "tensor", "self")
# Ops of those namespaces that send nothing: waits, barriers, receives, autograd wrappers, checks.
NOT_SENDING = ("wait_tensor", "barrier", "monitored_barrier_", "recv_", "recv_any_source_", "irecv",
               "_wrap_tensor_autograd", "check_for_nan")


class CollectiveRecorder(TorchDispatchMode):
    """Records every c10d and _c10d_functional op with the bytes it sends, under a phase label the
    caller sets (``forward`` / ``backward``)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.calls = []  # (phase, op name, [(shape, dtype)], bytes sent)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into local ops and collectives, then see those
        namespace = func.namespace
        if namespace in ("c10d", "_c10d_functional") and func._opname not in NOT_SENDING:
            sent = []
            for arg, value in zip(func._schema.arguments, args):
                if arg.name in SENT_ARGS:
                    sent = _tensors(value)
                    break
            self.calls.append((self.phase, f"{namespace}.{func._opname}",
                               [(tuple(t.shape), str(t.dtype)[6:]) for t in sent],
                               sum(t.numel() * t.element_size() for t in sent)))
        return func(*args, **kwargs)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def shard_range(vocab, world, rank):
    """[start, end) of rank's classes under DTensor's Shard (torch.chunk's split: ceil-sized pieces,
    the last ranks possibly short or empty)."""
    piece = -(-vocab // world)
    start = min(rank * piece, vocab)
    return start, min(start + piece, vocab)


def make_inputs(args, mesh, rank, world):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dtype = getattr(torch, args.dtype)
    start, end = shard_range(args.vocab, world, rank)
    g = torch.Generator().manual_seed(1000 + rank)
    local = torch.empty(args.rows, end - start, dtype=dtype)
    for a in range(0, args.rows, 1024):  # in float32 blocks: no second full-size temporary for bfloat16
        local[a:a + 1024] = torch.randn(min(1024, args.rows - a), end - start, generator=g).mul_(2)
    x = DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=torch.Size((args.rows, args.vocab)),
                           stride=(args.vocab, 1)).requires_grad_()
    t = torch.randint(0, args.vocab, (args.rows,), generator=torch.Generator().manual_seed(7))
    return x, DTensor.from_local(t, mesh, [Replicate()], run_check=False), start


def _nothing(phase):
    pass


def steps(args, start):
    """{peer: step(x, target, mark)}: one forward + backward, calling mark(phase) before each."""
    import online_softmax as osm
    import online_softmax.distributed as osd
    from torch.distributed.tensor.parallel import loss_parallel

    def ours(x, t, mark=_nothing):
        x.grad = None
        mark("forward")
        if args.ours == "dtensor":
            loss = osm.cross_entropy(x, t)
        else:
            loss = osd.cross_entropy(x.to_local(), t.to_local(), start)
        mark("backward")
        loss.backward()
        return loss

    def torch_loss_parallel(x, t, mark=_nothing):
        x.grad = None
        with loss_parallel():
            mark("forward")
            loss = F.cross_entropy(x, t)
            mark("backward")
            loss.backward()
        return loss

    return {"ours": ours, "loss_parallel": torch_loss_parallel}


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _max_over_ranks(value):
    v = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return float(v)


def timed(step, x, t):
    dist.barrier()
    t0 = time.perf_counter()
    step(x, t)
    return _max_over_ranks(time.perf_counter() - t0)


def measured(step, x, t):
    """One call under the recorder: (collectives, extra peak MiB of this rank, loss, first grad rows)."""
    x.grad = None
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    rec = CollectiveRecorder()
    with rec:
        def mark(phase):
            rec.phase = phase
        loss = step(x, t, mark)
    peak = (_status_kib("VmHWM") - base) / 1024
    loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
    grad = x.grad.to_local()[:CHECK_ROWS].float().clone()
    x.grad = None
    return rec.calls, peak, float(loss.detach()), grad


def ring_factor(op, world):
    """Bytes a rank puts on the wire per counted byte under the ring algorithms: all_reduce
    2 (w - 1) / w, all_gather (w - 1) (every other rank's piece passes through), reduce_scatter and
    all_to_all (w - 1) / w, anything else 1. A model: Gloo picks its own algorithms."""
    name = op.split(".")[-1].replace("_", "")
    if "allreduce" in name:
        return 2 * (world - 1) / world
    if "allgather" in name:
        return world - 1
    if "reducescatter" in name or "alltoall" in name:
        return (world - 1) / world
    return 1


def summarize_calls(calls, rows, world):
    out = {}
    for phase in ("forward", "backward"):
        mine = [c for c in calls if c[0] == phase]
        out[phase] = {"collectives": len(mine), "bytes": sum(c[3] for c in mine),
                      "bytes_per_row": sum(c[3] for c in mine) / rows,
                      "ring_bytes_per_row": sum(c[3] * ring_factor(c[1], world) for c in mine) / rows,
                      "ops": [{"op": c[1], "sent": [f"{list(s)} {d}" for s, d in c[2]], "bytes": c[3]} for c in mine]}
    return out


def worker(rank, args, port):
    world = args.ranks
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run(rank, world, threads, args)
    except BaseException:
        # mp.spawn reports one rank's error, often a peer's "connection closed": name each rank's own.
        print(f"rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


def run(rank, world, threads, args):
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    x, t, start = make_inputs(args, mesh, rank, world)
    calls = steps(args, start)
    say = (lambda s: print(s, flush=True)) if rank == 0 else _nothing
    info = machine_info(torch.device("cpu"))
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["cores"] = os.cpu_count()
    shard_mib = x.to_local().numel() * x.element_size() / 2 ** 20
    say(machine_line(info))
    say(f"{world} Gloo ranks on 127.0.0.1, {threads} thread(s) per rank (torch.set_num_threads(max(1, "
        f"{info['cores']} cores // {world} ranks))); torch.backends.cpu.get_cpu_capability() "
        f"{info['cpu_capability']}; {info['date']}")
    say(f"logits {args.rows} x {args.vocab} {args.dtype}, Shard(1): {shard_mib:.0f} MiB per rank (rank 0); "
        f"ours = {OURS_CALL[args.ours]}")

    results = {}
    checks = {}
    for peer in PEERS:  # a warm-up call each: first-call costs (imports, caches) are in neither peak
        calls[peer](x, t)
        x.grad = None
    for peer in PEERS:
        coll, peak, loss, grad = measured(calls[peer], x, t)
        results[peer] = {"comm": summarize_calls(coll, args.rows, world), "extra_peak_mib": _max_over_ranks(peak),
                         "times_s": []}
        checks[peer] = (loss, grad)
        gc.collect()
    loss_diff = abs(checks["ours"][0] - checks["loss_parallel"][0])
    grad_diff = _max_over_ranks((checks["ours"][1] - checks["loss_parallel"][1]).abs().max())
    del checks
    order = balanced_order(len(PEERS))
    while len(results[PEERS[0]]["times_s"]) < args.repeats:
        for i in order:
            results[PEERS[i]]["times_s"].append(timed(calls[PEERS[i]], x, t))
            x.grad = None
    if rank != 0:
        return
    for r in results.values():
        r["median_s"] = statistics.median(r["times_s"])
    ratio = results["loss_parallel"]["median_s"] / results["ours"]["median_s"]
    print("\ncollectives per rank, in call order (bytes sent: all_reduce of S bytes = S, all_gather of an "
          "S-byte piece = S; the ring model: all_reduce 2 (w - 1) / w S, all_gather (w - 1) S)")
    for peer in PEERS:
        for phase in ("forward", "backward"):
            for op in results[peer]["comm"][phase]["ops"]:
                print(f"  {peer:<13} {phase:<8} {op['op']:<40} {', '.join(op['sent']):<28} {op['bytes']:>10} B")
    print(f"\ncross_entropy forward + backward, {args.rows} x {args.vocab} {args.dtype}, {world} ranks, "
          f"median of {args.repeats} (the slowest rank's time per call)")
    print("| peer | median ms | min ms | collectives fwd / bwd | bytes sent per row fwd / bwd | "
          "ring model fwd / bwd | extra peak per rank |")
    print("|---|---|---|---|---|---|---|")
    for peer in PEERS:
        r, c = results[peer], results[peer]["comm"]
        print(f"| {peer} | {r['median_s'] * 1e3:.0f} | {min(r['times_s']) * 1e3:.0f} | "
              f"{c['forward']['collectives']} / {c['backward']['collectives']} | "
              f"{c['forward']['bytes_per_row']:.1f} / {c['backward']['bytes_per_row']:.1f} | "
              f"{c['forward']['ring_bytes_per_row']:.1f} / {c['backward']['ring_bytes_per_row']:.1f} | "
              f"{r['extra_peak_mib']:.0f} MiB |")
    print(f"loss_parallel / ours: {ratio:.2f}x; logits shard {shard_mib:.0f} MiB per rank; "
          f"|loss difference| {loss_diff:.2e}, max |gradient difference| (first {CHECK_ROWS} rows) {grad_diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            config = vars(args) | {"threads_per_rank": threads, "ours_call": OURS_CALL[args.ours]}
            json.dump({"machine": info, "config": config,
                       "time_ratio_loss_parallel_over_ours": ratio, "loss_difference": loss_diff,
                       "grad_difference_first_rows": grad_diff, "logits_shard_mib": shard_mib,
                       "results": results}, f, indent=1)
        print("wrote", args.json)


def memory_estimate_gib(args):
    """What the run holds at once on this machine: every rank's logits shard and the larger peer's
    extra peak, loss_parallel's, counted in float32 bytes whatever the dtype: about four float32
    shards (its log-softmax, the backward's two gradients and a temporary: 4.0x the shard at
    2048 x 128256 float32, 877 MiB in bfloat16); ours holds one gradient. Plus each process's torch."""
    elements = args.rows * -(-args.vocab // args.ranks)
    return args.ranks * (elements * 4 * (1 + PEAK_SHARDS) + PROCESS_BYTES) / 2 ** 30


def available_gib():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2 ** 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per peer")
    parser.add_argument("--ours", default="dtensor", choices=["dtensor", "process_group"],
                        help="ours through the DTensor rule, or the process-group function on the local shards")
    parser.add_argument("--force", action="store_true", help="run even where the memory estimate exceeds "
                        "MemAvailable")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.rows < 1 or args.vocab < 1 or args.repeats < 1:
        parser.error("--ranks, --rows, --vocab and --repeats must be positive")
    if args.vocab < args.ranks:
        # A rank without classes: ours works (tests/distributed cover it), loss_parallel() fails in
        # its gather (index out of bounds, torch 2.13), so there is nothing to compare.
        parser.error("--vocab must be at least --ranks: torch's loss_parallel() fails on a rank holding no classes")
    need, have = memory_estimate_gib(args), available_gib()
    print(f"memory: about {need:.1f} GiB needed at once, {have:.1f} GiB available", flush=True)
    if need > have and not args.force:
        parser.error(f"this size needs about {need:.1f} GiB and {have:.1f} GiB is available: use fewer --rows, "
                     f"or --force")
    mp.spawn(worker, args=(args, free_port()), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
