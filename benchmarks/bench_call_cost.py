"""The cost of one small call: online_softmax.softmax against torch.softmax on a tiny tensor.

    python benchmarks/bench_call_cost.py [--shape 4x8] [--rounds 15]

On a 4 x 8 tensor the softmax itself is a few nanoseconds, so what is timed is everything around it:
the Python layer, the dispatcher, the autograd node (with requires_grad) and the allocation. Each
round times every call (min of 3 repeats of 2000 calls, timeit), the calls interleaved, and the
table gives the median over the rounds and the ratio to torch.softmax with the same requires_grad.
torch's own time varies by tens of percent from one process to the next, so compare within a run.
"""

import argparse
import statistics
import timeit

import torch

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x8")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    x_grad = torch.randn(shape, requires_grad=True)
    x = torch.randn(shape)
    forward = torch.ops.online_softmax.forward.default
    calls = {
        ("torch.softmax", True): lambda: torch.softmax(x_grad, -1),
        ("online_softmax.softmax", True): lambda: osm.softmax(x_grad, -1),
        ("torch.ops.online_softmax.forward", True): lambda: forward(x_grad, -1, False, 1.0, None),
        ("torch.softmax", False): lambda: torch.softmax(x, -1),
        ("online_softmax.softmax", False): lambda: osm.softmax(x, -1),
        ("torch.ops.online_softmax.forward", False): lambda: forward(x, -1, False, 1.0, None),
    }
    times = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, fn in calls.items():
            times[key].append(min(timeit.repeat(fn, number=2000, repeat=3)) / 2000 * 1e6)
    print(machine_line(machine_info(torch.device("cpu"))))
    print(f"| call ({args.shape}) | requires_grad | time | vs torch.softmax |")
    print("|---|---|---|---|")
    for (name, grad), t in times.items():
        median = statistics.median(t)
        base = statistics.median(times[("torch.softmax", grad)])
        print(f"| {name} | {grad} | {median:.2f} us | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
