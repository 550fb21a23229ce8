"""Decoding benchmarks: MoE routing and token sampling, online_softmax against the torch sequences
that Hugging Face transformers and Mixtral-style routers run, side by side in one process.

    python benchmarks/bench_decoding.py [--ops moe,sample] [--device cpu] [--threads N]

Times are medians of interleaved rounds (online_softmax.bench.median_times); the bandwidth column
counts one read of the logits, the least any implementation must move. Sampling has two peers:
"torch" is the sequence transformers runs (warpers, softmax, torch.multinomial), and
"torch+searchsorted" the same warpers with an inverse-CDF draw, since torch.multinomial alone is
most of the first one's time on a CPU. Logits are randn * 3 (nuclei of top_p=0.9 hold 1,500 to
7,000 tokens, flatter than a trained model's).
"""

import argparse
import sys

import torch

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line, median_times
from online_softmax.decoding.warpers import warped_probs
from online_softmax.reference import unfused_sample

MOE_SHAPES = [(4096, 8), (4096, 64), (4096, 256)]
MOE_KS = [2, 8]
SAMPLE_SHAPES = [(32, 128256), (256, 32000)]
# (label, keyword arguments): transformers' defaults for sampling are top_k=50, then top-p/min-p.
SAMPLE_SETTINGS = [
    ("T=0.7", dict(temperature=0.7)),
    ("T=0.7 top_k=50", dict(temperature=0.7, top_k=50)),
    ("top_k=50 top_p=0.9", dict(top_k=50, top_p=0.9)),
    ("top_p=0.9", dict(top_p=0.9)),
    ("min_p=0.05", dict(min_p=0.05)),
]


def torch_router(x, k, out_dtype):
    """Mixtral's routing weights: softmax in float32, top-k, divide by the sum."""
    w = torch.softmax(x, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(w, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w.to(out_dtype), idx


def searchsorted_sample(x, generator, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """A better-written unfused peer: the same warpers, then an inverse-CDF draw (cumsum +
    searchsorted) instead of torch.multinomial, which is slow on the CPU."""
    probs = warped_probs(x, temperature, top_k, top_p, min_p)
    u = torch.rand(x.shape[0], 1, dtype=probs.dtype, device=x.device, generator=generator)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(x.shape[1] - 1)


def report(title, shape_label, times, nbytes):
    base = times["torch"]
    for name, t in times.items():
        print(f"{title:<22} {shape_label:<14} {name:<16} {t * 1e3:9.3f} ms {nbytes / t / 1e9:8.2f} GB/s "
              f"{base / t:6.2f}x", flush=True)


def bench_moe(device, dtypes):
    for dtype in dtypes:
        for rows, experts in MOE_SHAPES:
            x = torch.randn(rows, experts, device=device).to(dtype)
            for k in MOE_KS:
                if k > experts:
                    continue
                calls = {
                    "online_softmax": lambda: osm.softmax_topk(x, k, renormalize=True, dtype=torch.float32),
                    "torch": lambda: torch_router(x, k, torch.float32),
                }
                times = median_times(calls, device, min_runs=21, budget_s=1.0)
                report(f"moe {str(dtype)[6:]} k={k}", f"{rows}x{experts}", times, x.numel() * x.element_size())


def bench_sample(device, labels=None):
    for rows, vocab in SAMPLE_SHAPES:
        x = torch.randn(rows, vocab, device=device) * 3
        for label, kw in SAMPLE_SETTINGS:
            if labels is not None and label not in labels:
                continue
            g1, g2, g3 = (torch.Generator(device).manual_seed(0) for _ in range(3))
            calls = {
                "online_softmax": lambda: osm.sample(x, generator=g1, **kw),
                "torch": lambda: unfused_sample(x, generator=g2, **kw),
                "torch+searchsorted": lambda: searchsorted_sample(x, g3, **kw),
            }
            times = median_times(calls, device, min_runs=11, budget_s=2.0)
            report(f"sample {label}", f"{rows}x{vocab}", times, x.numel() * x.element_size())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="moe,sample", type=lambda s: s.split(","))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="bfloat16,float32",
                   type=lambda s: [getattr(torch, d) for d in s.split(",")])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--settings", default=None, help="sampling settings to run, by label, separated by ';'")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line(machine_info(device)), f"threads={torch.get_num_threads()}")
    print(f"{'case':<22} {'shape':<14} {'impl':<16} {'median':>12} {'read x':>13} {'vs torch':>7}")
    if "moe" in args.ops:
        bench_moe(device, args.dtypes)
    if "sample" in args.ops:
        bench_sample(device, None if args.settings is None else args.settings.split(";"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
