"""A serving engine's sampler and its log-probabilities, side by side in one process.

    python benchmarks/bench_sampler.py [--part serve,prompt,memory] [--device cpu] [--threads N]

**serve**: one sampling step of a serving batch, B requests over vocabulary V (float32 and
bfloat16 logits), each with its own settings: a repetition (1.1), frequency (0.2) and presence
(0.1) penalty over its 512-token prompt and 128 output tokens, a logit bias on 8 tokens, top-k 50,
top-p 0.9, and the raw log-probabilities of the drawn token with the row's top 20.
``online_softmax.sample`` (the edits built from the requests' Python lists each step, as a server
hands them over) against the same steps in torch ops as vLLM runs them
(``reference.serving.unfused_serving_sample``: a full log_softmax and topk for the log-probs, a
float32 copy, token counts and masks scattered over the vocabulary, dense penalties, a sort for
top-k/top-p, softmax and an exponential race). "GB/s" counts one read of the logits; "copy" is a
same-size copy timed in the same rounds.

**prompt**: prompt log-probabilities, P positions x V (bfloat16 by default; ``--prompt-dtypes``):
``online_softmax.token_logprobs`` (the given
token's log-probability and rank, and the top 20) against ``log_softmax`` (float32) + ``gather``
+ ``topk`` + the rank by counting.

**memory**: the extra peak memory of each prompt log-probability call beyond its inputs and outputs,
8192 x 152064 bfloat16 logits, each measured in a fresh process (the peak resident set after the
call minus before it; the logits are made in place, so nothing else raised the peak before).
"""

import argparse
import resource
import subprocess
import sys

import torch

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line, median_times
from online_softmax.reference.serving import unfused_serving_sample

SERVE_BATCHES = [64, 256]
SERVE_VOCABS = [128256, 152064]
PROMPT, OUTPUT, BIASED, TOP_N = 512, 128, 8, 20


def requests(batch, vocab, seed=0):
    """Each request's tokens and settings, as Python lists (what a server holds)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (batch, PROMPT), generator=g).tolist()
    outputs = torch.randint(0, vocab, (batch, OUTPUT), generator=g).tolist()
    bias_ids = torch.randint(0, vocab, (batch, BIASED), generator=g).tolist()
    bias = [{t: (-1.0) ** i * 2.0 for i, t in enumerate(row)} for row in bias_ids]
    return prompts, outputs, bias


def dense_inputs(batch, vocab, prompts, outputs, bias, device):
    """The same requests as the peer's tensors: padded token tensors and sparse bias triples."""
    rows = torch.arange(batch).repeat_interleave(BIASED)
    toks = torch.tensor([t for row in bias for t in row])
    vals = torch.tensor([v for row in bias for v in row.values()])
    return (torch.tensor(prompts, device=device), torch.tensor(outputs, device=device),
            (rows.to(device), toks.to(device), vals.to(device)))


def peer_step(x, prompt_t, output_t, bias, settings, generator):
    """vLLM's per-step tensors, rebuilt each step as it does: counts and masks over the vocabulary."""
    batch, vocab = x.shape
    counts = torch.zeros(batch, vocab + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, output_t, torch.ones_like(output_t))
    counts = counts[:, :vocab]
    prompt_mask = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=x.device)
    prompt_mask.scatter_(1, prompt_t, True)
    bias_dense = torch.zeros(batch, vocab, device=x.device)
    bias_dense.index_put_(bias[:2], bias[2], accumulate=True)
    return unfused_serving_sample(x, output_counts=counts, prompt_mask=prompt_mask[:, :vocab],
                                  logit_bias=bias_dense, logprobs=TOP_N, generator=generator, **settings)


def bench_serve(device, dtypes, batches, vocabs):
    print(f"{'serve':<6} {'dtype':<9} {'B':>4} {'V':>7} {'impl':<16} {'median':>11} {'GB/s':>8} {'vs torch':>8}")
    for dtype in dtypes:
        for vocab in vocabs:
            for batch in batches:
                g = torch.Generator().manual_seed(1)
                x = (torch.randn(batch, vocab, generator=g) * 3).to(device=device, dtype=dtype)
                prompts, outputs, bias = requests(batch, vocab)
                prompt_t, output_t, bias_t = dense_inputs(batch, vocab, prompts, outputs, bias, device)
                full = lambda v: torch.full((batch,), v, device=device)  # noqa: E731
                peer_settings = dict(temperature=full(1.0), top_k=full(50).long(), top_p=full(0.9),
                                     repetition_penalty=full(1.1), frequency_penalty=full(0.2),
                                     presence_penalty=full(0.1))
                g1, g2 = torch.Generator(device).manual_seed(1), torch.Generator(device).manual_seed(1)
                src = torch.empty(x.numel() * x.element_size(), dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                calls = {
                    "online_softmax": lambda: osm.sample(
                        x, top_k=50, top_p=0.9, logprobs=TOP_N, generator=g1, repetition_penalty=1.1,
                        frequency_penalty=0.2, presence_penalty=0.1, logit_bias=bias, output_token_ids=outputs,
                        prompt_token_ids=prompts),
                    "torch (vLLM)": lambda: peer_step(x, prompt_t, output_t, bias_t, peer_settings, g2),
                    "copy": lambda: dst.copy_(src),
                }
                times = median_times(calls, device, min_runs=7, budget_s=2.0)
                least = x.numel() * x.element_size()
                for name, t in times.items():
                    speedup = times["torch (vLLM)"] / t if name != "copy" else float("nan")
                    print(f"{'serve':<6} {str(dtype)[6:]:<9} {batch:>4} {vocab:>7} {name:<16} {t * 1e3:8.2f} ms "
                          f"{least / t / 1e9:8.2f} {speedup:8.2f}", flush=True)


def torch_prompt_logprobs(x, ids, n):
    lp = torch.log_softmax(x, -1, dtype=torch.float32)
    mine = lp.gather(1, ids[:, None])
    top = lp.topk(n, -1)
    return mine[:, 0], (lp > mine).sum(-1) + 1, top.indices, top.values


def bench_prompt(device, dtypes, positions, vocab):
    print(f"{'prompt':<6} {'dtype':<9} {'P':>5} {'V':>7} {'impl':<16} {'median':>11} {'GB/s':>8} {'vs torch':>8}")
    for dtype in dtypes:
        x = make_logits(positions, vocab, dtype, device)
        ids = torch.randint(0, vocab, (positions,), device=device)
        dst = torch.empty_like(x)  # the copy reads x itself: one more logits-sized buffer, not two
        calls = {"online_softmax": lambda: osm.token_logprobs(x, ids, top_n=TOP_N),
                 "torch": lambda: torch_prompt_logprobs(x, ids, TOP_N),
                 "copy": lambda: dst.copy_(x)}
        times = median_times(calls, device, min_runs=5, max_runs=11, budget_s=3.0)
        least = x.numel() * x.element_size()
        for name, t in times.items():
            speedup = times["torch"] / t if name != "copy" else float("nan")
            print(f"{'prompt':<6} {str(dtype)[6:]:<9} {positions:>5} {vocab:>7} {name:<16} {t * 1e3:8.1f} ms "
                  f"{least / t / 1e9:8.2f} {speedup:8.2f}", flush=True)


def make_logits(positions, vocab, dtype, device, chunk=512):
    """Random logits written in place chunk by chunk, so making them raises no peak beyond them."""
    x = torch.empty(positions, vocab, dtype=dtype, device=device)
    g = torch.Generator(device).manual_seed(0)
    for i in range(0, positions, chunk):
        x[i:i + chunk].normal_(0.0, 3.0, generator=g)
    return x


def _peak_mib(reset=False):
    """The process's peak resident set (VmHWM), reset first when asked: a child started by fork
    inherits its parent's peak, so ru_maxrss alone would report the parent's."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_memory(impl, positions, vocab):
    """Run in a fresh process: the extra peak (MiB) of one call beyond its inputs and outputs."""
    x = make_logits(positions, vocab, torch.bfloat16, torch.device("cpu"))
    ids = torch.randint(0, vocab, (positions,))
    x.add_(0)  # touch every page before the baseline
    before = _peak_mib(reset=True)
    out = osm.token_logprobs(x, ids, top_n=TOP_N) if impl == "online_softmax" else torch_prompt_logprobs(x, ids, TOP_N)
    outputs = sum(t.numel() * t.element_size() for t in out) / 2 ** 20
    print(f"{max(0.0, _peak_mib() - before - outputs):.1f}")


def bench_memory(positions, vocab):
    print(f"{'memory':<6} {'dtype':<9} {'P':>5} {'V':>7} {'impl':<16} {'extra peak':>12} (logits {positions * vocab * 2 / 2**20:.0f} MiB)")
    for impl in ("online_softmax", "torch"):
        out = subprocess.run([sys.executable, __file__, "--measure-memory", impl, "--positions", str(positions),
                              "--vocab", str(vocab)], capture_output=True, text=True, check=True)
        print(f"{'memory':<6} {'bfloat16':<9} {positions:>5} {vocab:>7} {impl:<16} {float(out.stdout.split()[-1]):9.1f} MiB",
              flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="serve,prompt,memory", type=lambda s: s.split(","))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: [getattr(torch, d) for d in s.split(",")])
    p.add_argument("--batches", default=SERVE_BATCHES, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--vocabs", default=SERVE_VOCABS, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--positions", type=int, default=8192)
    p.add_argument("--prompt-dtypes", default="bfloat16", type=lambda s: [getattr(torch, d) for d in s.split(",")],
                   help="float32 at 8192 x 152064 needs more than 24 GiB beside torch's temporaries")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args.measure_memory, args.positions, args.vocab)
        return 0
    device = torch.device(args.device)
    print(machine_line(machine_info(device)), f"threads={torch.get_num_threads()}", machine_info(device)["date"])
    if "serve" in args.part:
        bench_serve(device, args.dtypes, args.batches, args.vocabs)
    if "prompt" in args.part:
        bench_prompt(device, args.prompt_dtypes, args.positions, args.vocab)
    if "memory" in args.part:
        bench_memory(args.positions, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
