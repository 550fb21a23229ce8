"""The softmax backward as autograd runs it inside a graph, where the incoming gradient is the
engine's own: ours written over that gradient (the backward_ op), ours out of place (the same
graph with a hook that keeps a reference to the gradient, so the node does not own it), and
torch.softmax's. One process, interleaved rounds, the backward alone timed (the forward builds a
fresh graph before each timed call).

    python benchmarks/bench_backward_inplace.py [--shapes 1024x1024,4096x1024,64x32768,4x262144,8x262144]
                                                [--dtype float32] [--log] [--rounds 31]

The graph is loss = (softmax(x) * w).sum(): mul's backward hands the softmax node a fresh
gradient, as most graphs do (a loss, a projection, attention's matmul).
"""

import argparse
import statistics
import time

import torch

import online_softmax as osm
from online_softmax.bench import balanced_order, machine_info, machine_line


def shapes_arg(text):
    return [tuple(int(n) for n in s.split("x")) for s in text.split(",")]


def make_step(kind, x, w, log):
    ours = osm.log_softmax if log else osm.softmax
    theirs = torch.log_softmax if log else torch.softmax
    kept = []

    def keep(g):
        kept.append(g)  # a second reference: the node does not own the gradient

    def step():
        x.grad = None
        kept.clear()
        y = theirs(x, -1) if kind == "torch" else ours(x, -1)
        if kind == "ours, out of place":
            y.register_hook(keep)
        loss = (y * w).sum()
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=shapes_arg, default=shapes_arg("1024x1024,4096x1024,64x32768,4x262144,8x262144"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--log", action="store_true", help="log_softmax instead of softmax")
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(machine_line(machine_info(torch.device("cpu"))))
    print(f"{'log_softmax' if args.log else 'softmax'}, {args.dtype}, {torch.get_num_threads()} threads; "
          f"backward of (f(x) * w).sum(), medians of {args.rounds} interleaved rounds")
    kinds = ["ours, in place", "ours, out of place", "torch"]
    print("| shape | " + " | ".join(f"{k} ms" for k in kinds) + " | in place vs out of place | ours vs torch |")
    print("|---|" + "---|" * (len(kinds) + 2))
    for shape in args.shapes:
        x = torch.randn(shape).to(dtype).requires_grad_()
        w = torch.randn(shape).to(dtype)
        steps = [make_step(k, x, w, args.log) for k in kinds]
        for s in steps:
            s()
        times = [[] for _ in kinds]
        order = balanced_order(len(kinds))
        for _ in range(args.rounds):
            for i in order:
                times[i].append(steps[i]())
        med = [statistics.median(t) * 1e3 for t in times]
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{m:.3f}" for m in med)
              + f" | {med[1] / med[0]:.2f}x | {med[2] / med[0]:.2f}x |")


if __name__ == "__main__":
    main()
