"""Policy-gradient log-probabilities and entropy of a vocabulary head, forward + backward:
online_softmax.linear_token_logprobs against the unfused composition (F.linear + log_softmax +
gather + entropy, torch autograd), time and peak memory.

    python benchmarks/bench_linear_token_logprobs.py [--rounds 5] [--shape 4096,1024,32000 ...] [--no-memory]

The step is loss = (log_probs * advantages).sum() + 0.01 * entropy.sum(), its gradients of hidden
and head taken. Times are medians of interleaved rounds (online_softmax.bench.median_times). Peak
memory is each implementation's peak RSS (VmHWM) in a fresh child process of its own, above what
its inputs, gradients and BLAS's workspace take: torch's CPU allocator returns large blocks to the
OS, so the RSS high-water mark sees every logits-sized buffer (tracemalloc would see none).
`bench(...)` returns the rows for a caller.
"""

import argparse
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line, median_times, peak_cells

SHAPES = [(4096, 1024, 32000)]  # tokens, hidden, vocab
DTYPES = (torch.float32, torch.bfloat16)


def unfused(h, w, t):
    """(log_probs, entropy) as people write them: the whole logits, float32 log_softmax."""
    log_p = torch.log_softmax(F.linear(h, w).float(), -1)
    return log_p.gather(-1, t[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def ours(h, w, t):
    return osm.linear_token_logprobs(h, w, t, return_entropy=True)


IMPLEMENTATIONS = {"ours": ours, "unfused": unfused}


def step(fn, h, w, t, adv):
    lp, ent = fn(h, w, t)
    ((lp * adv).sum() + 0.01 * ent.sum()).backward()


def inputs(tokens, hidden, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 0.1).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype).requires_grad_()
    return h, w, torch.randint(0, vocab, (tokens,), generator=g), torch.randn(tokens, generator=g)


def time_shape(tokens, hidden, vocab, dtype, rounds):
    h, w, t, adv = inputs(tokens, hidden, vocab, dtype)

    def call(fn):
        def run():
            h.grad = w.grad = None
            step(fn, h, w, t, adv)
        return run

    return median_times({name: call(fn) for name, fn in IMPLEMENTATIONS.items()}, torch.device("cpu"),
                        min_runs=rounds, max_runs=rounds, budget_s=0.0)


MEMORY_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import bench_linear_token_logprobs as b
    which, tokens, hidden, vocab, dtype = sys.argv[2], *map(int, sys.argv[3:6]), getattr(torch, sys.argv[6])
    def peak():
        # VmHWM, not ru_maxrss: the latter survives exec, so a child would start at its parent's peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    h, w, t, adv = b.inputs(tokens, hidden, vocab, dtype)
    fn = b.IMPLEMENTATIONS[which]
    # A small call first: BLAS's workspace, which a training step's earlier matmuls would have made,
    # is then in the baseline.
    b.step(fn, h[:256].detach().requires_grad_(), w, t[:256], adv[:256])
    w.grad = None
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    g = [torch.ones_like(h), torch.ones_like(w)]  # the gradients' room: the baseline holds it
    del g
    base = peak()
    b.step(fn, h, w, t, adv)
    print(peak() - base)
""")


def extra_peak_mib(which, tokens, hidden, vocab, dtype):
    here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, here, which, str(tokens), str(hidden), str(vocab),
                          str(dtype).split(".")[1]], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def bench(shapes=SHAPES, dtypes=DTYPES, rounds=5, memory=True, out=print):
    """Times (median seconds) and extra peak MiB of both implementations per (shape, dtype), printed
    as a table through `out`; returns the rows as dicts."""
    out(machine_line(machine_info(torch.device("cpu"))))
    out("\nlinear_token_logprobs, forward + backward of (lp * adv).sum() + 0.01 * entropy.sum()")
    out("| tokens x hidden x vocab | dtype | online_softmax | unfused | time ratio | logits | extra peak ours | "
        "extra peak unfused | memory ratio |")
    out("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for tokens, hidden, vocab in shapes:
        for dtype in dtypes:
            med = time_shape(tokens, hidden, vocab, dtype, rounds)
            row = {"shape": (tokens, hidden, vocab), "dtype": str(dtype)[6:], "ours_s": med["ours"],
                   "unfused_s": med["unfused"]}
            if memory:
                row.update({f"{k}_mib": extra_peak_mib(k, tokens, hidden, vocab, dtype) for k in IMPLEMENTATIONS})
            logits = tokens * vocab * torch.empty((), dtype=dtype).element_size() / 2 ** 20
            mem = peak_cells(row, "ours", "unfused")
            out(f"| {tokens} x {hidden} x {vocab} | {row['dtype']} | {med['ours'] * 1e3:.0f} ms | "
                f"{med['unfused'] * 1e3:.0f} ms | {med['ours'] / med['unfused']:.2f}x | {logits:.0f} MiB | {mem} |")
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shape", action="append", help="tokens,hidden,vocab (repeatable)")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    bench(shapes, rounds=args.rounds, memory=not args.no_memory, out=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
