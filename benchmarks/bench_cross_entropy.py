"""Cross-entropy forward + backward: online_softmax against torch eager, torch.compile and a chunked
torch loop, side by side in one process; and the peak memory of linear + cross-entropy.

    python benchmarks/bench_cross_entropy.py [--rounds 5] [--no-compile] [--no-memory]

``cross_entropy``: logits (tokens, vocab) given, the loss reduced to its mean, its gradient taken.
``linear_cross_entropy``: hidden (tokens, 1024) and a (vocab, 1024) head, the gradients of both.
Times are medians of interleaved rounds. Peak memory is each implementation's peak RSS in a child
process of its own, above what its inputs and gradients take (the logits' size for comparison).
Shapes whose unfused peers need more memory than a 24 GiB machine has are left out, saying so.
"""

import argparse
import statistics
import subprocess
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line

CE_SHAPES = [(4096, 32000), (4096, 128256), (16384, 32000)]  # 16384 x 128256 float32 logits alone are 8 GiB
LINEAR_SHAPES = [(4096, 32000, 1024), (4096, 128256, 1024), (16384, 32000, 1024)]


def chunked_torch(x, t, chunk=1024):
    """A chunked torch loop, as people write to save memory: the loss chunk by chunk."""
    total = x.new_zeros((), dtype=torch.float32)
    for a in range(0, x.shape[0], chunk):
        total = total + F.cross_entropy(x[a:a + chunk].float(), t[a:a + chunk], reduction="sum")
    return total / x.shape[0]


def timed_rounds(calls, rounds):
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm up (and compile)
    for r in range(rounds):
        names = list(calls)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_cross_entropy(rounds, with_compile):
    print("\ncross_entropy, forward + backward (mean loss)")
    print("| tokens x vocab | dtype | online_softmax | torch eager | speed-up | torch.compile | chunked torch |")
    print("|---|---|---|---|---|---|---|")
    for tokens, vocab in CE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(tokens, vocab) * 2).to(dtype).requires_grad_()
            t = torch.randint(0, vocab, (tokens,))

            def step(fn):
                def call():
                    x.grad = None
                    fn(x, t).backward()
                return call
            calls = {"ours": step(osm.cross_entropy), "eager": step(F.cross_entropy),
                     "chunked": step(chunked_torch)}
            if with_compile:
                calls["compile"] = step(torch.compile(F.cross_entropy))
            med = timed_rounds(calls, rounds)
            comp = f"{med['compile'] * 1e3:.0f} ms" if "compile" in med else "-"
            print(f"| {tokens} x {vocab} | {str(dtype)[6:]} | {med['ours'] * 1e3:.0f} ms | {med['eager'] * 1e3:.0f} ms | "
                  f"{med['eager'] / med['ours']:.2f}x | {comp} | {med['chunked'] * 1e3:.0f} ms |", flush=True)
            del x


def unfused_linear(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def bench_linear(rounds):
    print("\nlinear_cross_entropy, forward + backward (hidden 1024, gradients of hidden and head)")
    print("| tokens x vocab | dtype | online_softmax | unfused eager | ratio |")
    print("|---|---|---|---|---|")
    for tokens, vocab, hidden in LINEAR_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            h = (torch.randn(tokens, hidden) * 0.1).to(dtype).requires_grad_()
            w = (torch.randn(vocab, hidden) * 0.02).to(dtype).requires_grad_()
            t = torch.randint(0, vocab, (tokens,))

            def step(fn):
                def call():
                    h.grad = w.grad = None
                    fn(h, w, t).backward()
                return call
            med = timed_rounds({"ours": step(osm.linear_cross_entropy), "eager": step(unfused_linear)}, rounds)
            print(f"| {tokens} x {vocab} | {str(dtype)[6:]} | {med['ours'] * 1e3:.0f} ms | {med['eager'] * 1e3:.0f} ms | "
                  f"{med['ours'] / med['eager']:.2f}x |", flush=True)


MEMORY_CHILD = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import online_softmax as osm
    which, tokens, vocab, hidden = sys.argv[1], *map(int, sys.argv[2:5])
    def peak():
        # VmHWM, not ru_maxrss: the latter survives exec, so a child would start at its parent's peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    h = (torch.randn(tokens, hidden) * 0.1).requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    def call(n):
        if which == "ours":
            osm.linear_cross_entropy(h[:n], w, t[:n]).backward()
        else:
            F.cross_entropy(F.linear(h[:n], w), t[:n]).backward()
    # One call on 256 tokens first: the BLAS library's own workspace (about 12 MiB for these
    # matmuls), which a training step's earlier matmuls would have made, is then in the baseline.
    call(256)
    h.grad = w.grad = None
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    g = [torch.ones_like(h), torch.ones_like(w)]  # the gradients' room: the baseline holds it
    del g
    base = peak()
    call(tokens)
    print(peak() - base)
""")


def bench_memory():
    print("\nlinear_cross_entropy peak memory above inputs, weights, gradients and BLAS's workspace (float32, "
          "hidden 1024)")
    print("| tokens x vocab | logits would take | online_softmax | unfused eager |")
    print("|---|---|---|---|")
    for tokens, vocab, hidden in LINEAR_SHAPES + [(8192, 32000, 1024)]:
        extra = {}
        for which in ("ours", "eager"):
            out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, which, str(tokens), str(vocab), str(hidden)],
                                 capture_output=True, text=True, check=True)
            extra[which] = float(out.stdout.split()[-1])
        logits = tokens * vocab * 4 / 2 ** 20
        print(f"| {tokens} x {vocab} | {logits:.0f} MiB | {extra['ours']:.0f} MiB ({extra['ours'] / logits:.1%}) | "
              f"{extra['eager']:.0f} MiB |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    print(machine_line(machine_info(torch.device("cpu"))))
    bench_cross_entropy(args.rounds, not args.no_compile)
    bench_linear(max(3, args.rounds // 2))
    if not args.no_memory:
        bench_memory()


if __name__ == "__main__":
    main()
