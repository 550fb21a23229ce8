"""Training steps of transformers models with and without online_softmax, time and peak memory.

    python benchmarks/bench_training.py [--part train] [--rounds 5] [--dtype float32 --dtype bfloat16] [--no-memory]

Parts (one function each, ``PARTS``):

- **train**: forward + backward (no optimizer) of a random Llama with Llama 3's vocabulary (128256;
  hidden 256, 2 layers, intermediate 512, 4 heads, batch 4 x 512), unpatched against
  ``online_softmax.hf.apply(model)`` (the loss by linear_cross_entropy, no logits).
- **distill**: forward + backward of ``linear_distillation_loss`` (4096 positions, hidden 256,
  vocabulary 128256, kinds kl and jsd, hard labels mixed in) against the unfused torch sequence
  (both models' whole logits, log-softmaxes, ``F.kl_div``), with the step's own tensors (both models'
  hidden states and heads, the student's gradients) beside the extra peaks.

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
from online_softmax.reference.distillation import unfused_linear_distillation
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


def train_steps(which, dtype):
    """(warm-up, step) of the train part for a memory child: a short step makes the gradients and
    BLAS's workspace part of the baseline."""
    model = llama(dtype, which == "ours")
    ids, labels = batch()
    return (lambda: train_step(model, ids[:1, :64], labels[:1, :64])), (lambda: train_step(model, ids, labels))


MEMORY_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import bench_training as b
    part, which, dtype = sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
    def peak():
        # VmHWM, not ru_maxrss: the latter survives exec, so a child would start at its parent's peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    warm, step = b.PEAK_STEPS[part](which, dtype)
    warm()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    base = peak()
    step()
    print(peak() - base)
""")


def extra_peak_mib(part, which, dtype):
    """How far one step of ``part`` by ``which`` raises the peak RSS of a fresh child process above
    what it holds after a warm-up step, in MiB."""
    here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, here, part, which, str(dtype).split(".")[1]],
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
            row.update({f"{k}_mib": extra_peak_mib("train", k, dtype) for k in VARIANTS})
        logits = BATCH * SEQ * LLAMA["vocab_size"] * torch.empty((), dtype=dtype).element_size() / 2 ** 20
        mem = peak_cells(row, "ours", "transformers")
        out(f"| {row['dtype']} | {med['ours'] * 1e3:.0f} ms | {med['transformers'] * 1e3:.0f} ms | "
            f"{med['ours'] / med['transformers']:.2f}x | {logits:.0f} MiB | {mem} |")
        rows.append(row)
    return rows


DISTILL = (4096, 256, 128256)  # positions, hidden (student and teacher), vocabulary
KINDS = ("kl", "jsd")


def distill_inputs(dtype, seed=0):
    """A student's hidden states and head (requiring grad), a teacher's (constants), labels with
    every 7th position ignored."""
    positions, hidden, vocab = DISTILL
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    hs, ws = rand(positions, hidden, scale=0.5).requires_grad_(), rand(vocab, hidden, scale=0.05).requires_grad_()
    ht, wt = rand(positions, hidden, scale=0.5), rand(vocab, hidden, scale=0.05)
    target = torch.randint(0, vocab, (positions,), generator=g)
    target[::7] = -100
    return hs, ws, ht, wt, target


def distill_step(which, kind, hs, ws, ht, wt, target):
    hs.grad = ws.grad = None
    if which == "ours":
        loss = osm.linear_distillation_loss(hs, ws, ht, wt, target, kind=kind)
    else:
        loss = unfused_linear_distillation(hs, ws, ht, wt, target, kind=kind)
    loss.backward()


def distill_steps(which, dtype, kind="kl"):
    """(warm-up, step) of the distill part for a memory child: the warm-up's gradients are kept, so
    the baseline holds them as a training loop's would."""
    hs, ws, ht, wt, target = distill_inputs(dtype)

    def warm():
        distill_step(which, kind, hs[:64].detach().requires_grad_(), ws, ht[:64], wt, target[:64])
        hs.grad = torch.zeros_like(hs)  # the gradients' room, as a training loop holds it

    def step():
        distill_step(which, kind, hs, ws, ht, wt, target)
    return warm, step


def models_mib(dtype):
    """The step's own tensors: both models' hidden states and heads, and the student's gradients."""
    positions, hidden, vocab = DISTILL
    size = torch.empty((), dtype=dtype).element_size()
    return (2 * positions * hidden + 2 * vocab * hidden + positions * hidden + vocab * hidden) * size / 2 ** 20


def bench_distill(dtypes=DTYPES, rounds=5, memory=True, out=print, kinds=KINDS):
    """Median time and extra peak MiB of linear_distillation_loss against the unfused torch sequence
    (reference.distillation.unfused_linear_distillation: both whole logits, log-softmaxes, F.kl_div),
    forward + backward, per kind and dtype; returns the rows as dicts."""
    positions, hidden, vocab = DISTILL
    out(f"\ndistill: {positions} positions x hidden {hidden} x vocab {vocab}, student and teacher heads, labels "
        f"(every 7th ignored), hard_weight 0.5: forward + backward, gradients of the student's hidden and head")
    out("| kind | dtype | linear_distillation_loss | unfused | time ratio | models' own | extra peak ours | "
        "extra peak unfused | memory ratio |")
    out("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype in dtypes:
        tensors = distill_inputs(dtype)
        for kind in kinds:
            med = median_times({w: (lambda w=w: distill_step(w, kind, *tensors)) for w in VARIANTS_DISTILL},
                               torch.device("cpu"), min_runs=rounds, max_runs=rounds, budget_s=0.0)
            row = {"kind": kind, "dtype": str(dtype)[6:], "ours_s": med["ours"], "unfused_s": med["unfused"],
                   "models_mib": models_mib(dtype)}
            if memory:
                row.update({f"{w}_mib": extra_peak_mib(f"distill_{kind}", w, dtype) for w in VARIANTS_DISTILL})
            out(f"| {kind} | {row['dtype']} | {med['ours'] * 1e3:.0f} ms | {med['unfused'] * 1e3:.0f} ms | "
                f"{med['ours'] / med['unfused']:.2f}x | {row['models_mib']:.0f} MiB | "
                f"{peak_cells(row, 'ours', 'unfused')} |")
            rows.append(row)
        del tensors
    return rows


VARIANTS_DISTILL = ("ours", "unfused")
PARTS = {"train": bench_train, "distill": bench_distill}
PEAK_STEPS = {"train": train_steps, **{f"distill_{k}": (lambda w, d, k=k: distill_steps(w, d, k)) for k in KINDS}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="repeatable; default: all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", action="append", choices=[str(d)[6:] for d in DTYPES])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--kind", action="append", choices=KINDS, help="distill: repeatable; default: all")
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    print(machine_line(machine_info(torch.device("cpu"))), flush=True)
    for part in args.part or list(PARTS):
        extra = {"kinds": tuple(args.kind)} if part == "distill" and args.kind else {}
        PARTS[part](dtypes=dtypes, rounds=args.rounds, memory=not args.no_memory, out=lambda s: print(s, flush=True),
                    **extra)


if __name__ == "__main__":
    main()
