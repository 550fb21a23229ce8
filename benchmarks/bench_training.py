"""Training steps of transformers models with and without online_softmax, time and peak memory.

    python benchmarks/bench_training.py [--part train] [--rounds 5] [--dtype float32 --dtype bfloat16] [--no-memory]

Parts (one function each, ``PARTS``):

- **train**: forward + backward (no optimizer) of a random Llama with Llama 3's vocabulary (128256;
  hidden 256, 2 layers, intermediate 512, 4 heads, batch 4 x 512), unpatched against
  ``online_softmax.hf.apply(model)`` (the loss by linear_cross_entropy, no logits).

Times are medians of interleaved rounds (online_softmax.bench.median_times) in one process. Peak
memory is each variant's peak RSS (VmHWM) in a fresh child process of its own, above what the model,
its gradients and BLAS's workspace take (a warm-up step on a short batch first, then VmHWM reset
through /proc/self/clear_refs): torch's CPU allocator returns large blocks to the OS, so the RSS
high-water mark sees every logits-sized buffer. `bench_train(...)` returns the rows for a caller.
"""

import argparse
import copy
import subprocess
import sys
import textwrap

import torch

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line, median_times, peak_cells

LLAMA = dict(vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=1024)
BATCH, SEQ = 4, 512
DTYPES = (torch.float32, torch.bfloat16)
VARIANTS = ("ours", "transformers")


def llama(dtype, patched, seed=0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(dtype).train()
    return osm.hf.apply(model) if patched else model


def batch(batch=BATCH, seq=SEQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA["vocab_size"], (batch, seq), generator=g)
    return ids, ids.clone()


def train_step(model, ids, labels):
    model.zero_grad(set_to_none=False)  # the gradients stay allocated, as between optimizer steps
    model(ids, labels=labels).loss.backward()


MEMORY_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import bench_training as b
    which, dtype = sys.argv[2], getattr(torch, sys.argv[3])
    def peak():
        # VmHWM, not ru_maxrss: the latter survives exec, so a child would start at its parent's peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    model = b.llama(dtype, which == "ours")
    ids, labels = b.batch()
    # A short step first: the gradients and BLAS's workspace are then in the baseline.
    b.train_step(model, ids[:1, :64], labels[:1, :64])
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    base = peak()
    b.train_step(model, ids, labels)
    print(peak() - base)
""")


def extra_peak_mib(which, dtype):
    here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, here, which, str(dtype).split(".")[1]],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def bench_train(dtypes=DTYPES, rounds=5, memory=True, out=print):
    """Median step time and extra peak MiB of the unpatched and the patched Llama per dtype, printed
    as a table through `out`; returns the rows as dicts."""
    ids, labels = batch()
    out(f"\ntrain: Llama vocab {LLAMA['vocab_size']}, hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} "
        f"layers, batch {BATCH} x {SEQ}: forward + backward of model(ids, labels=ids).loss")
    out("| dtype | online_softmax.hf.apply | transformers | time ratio | logits | extra peak ours | "
        "extra peak transformers | memory ratio |")
    out("|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype in dtypes:
        plain = llama(dtype, False)
        ours = osm.hf.apply(copy.deepcopy(plain))
        med = median_times({"ours": lambda: train_step(ours, ids, labels),
                            "transformers": lambda: train_step(plain, ids, labels)}, torch.device("cpu"),
                           min_runs=rounds, max_runs=rounds, budget_s=0.0)
        del plain, ours
        row = {"dtype": str(dtype)[6:], "ours_s": med["ours"], "transformers_s": med["transformers"]}
        if memory:
            row.update({f"{k}_mib": extra_peak_mib(k, dtype) for k in VARIANTS})
        logits = BATCH * SEQ * LLAMA["vocab_size"] * torch.empty((), dtype=dtype).element_size() / 2 ** 20
        mem = peak_cells(row, "ours", "transformers")
        out(f"| {row['dtype']} | {med['ours'] * 1e3:.0f} ms | {med['transformers'] * 1e3:.0f} ms | "
            f"{med['ours'] / med['transformers']:.2f}x | {logits:.0f} MiB | {mem} |")
        rows.append(row)
    return rows


PARTS = {"train": bench_train}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="repeatable; default: all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", action="append", choices=[str(d)[6:] for d in DTYPES])
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    print(machine_line(machine_info(torch.device("cpu"))), flush=True)
    for part in args.part or list(PARTS):
        PARTS[part](dtypes=dtypes, rounds=args.rounds, memory=not args.no_memory, out=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
