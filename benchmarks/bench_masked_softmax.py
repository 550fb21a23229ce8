"""Attention-score softmax with a scale and a mask: online_softmax against torch eager and
torch.compile of the unfused sequence, side by side in one process, with GB/s from explicit byte
counts and a same-size copy measured in the same run.

    python benchmarks/bench_masked_softmax.py [--seqs 512,2048] [--dtypes float32,bfloat16] [--no-compile]

Shapes (B=8, H=16, S, S), scale 1/sqrt(64). Two masks:
- padding: a bool (B, 1, 1, S) mask, True on the keys that take part (the last S/8 keys of every
  other batch entry are padding); eager is ``softmax(x * scale + additive_mask)`` with the
  additive (B, 1, 1, S) form, as attention code writes it;
- causal: eager is ``softmax((x * scale).masked_fill(upper_triangle, -inf))`` with an (S, S) mask.
Bytes moved: one read of x, one read of the mask as stored (the causal kernel reads none), one write
of y. Times are medians of interleaved rounds.
"""

import argparse
import math

import torch

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line, median_times


def case(seq, dtype, kind, with_compile):
    b, h = 8, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, h, seq, seq, generator=g).mul(4).to(dtype)
    scale = 1 / math.sqrt(64)
    out = torch.empty_like(x)
    if kind == "padding":
        keep = torch.ones(b, 1, 1, seq, dtype=torch.bool)
        keep[::2, ..., seq - seq // 8:] = False
        additive = torch.zeros(b, 1, 1, seq, dtype=dtype).masked_fill(~keep, float("-inf"))

        def eager(x=x, additive=additive):
            return torch.softmax(x * scale + additive, -1)

        def ours(x=x, keep=keep):
            return osm.softmax(x, -1, mask=keep, scale=scale)
        mask_bytes = keep.numel()
        peer_args = (x, additive)
    else:
        upper = torch.ones(seq, seq, dtype=torch.bool).triu(1)

        def eager(x=x, upper=upper):
            return torch.softmax((x * scale).masked_fill(upper, float("-inf")), -1)

        def ours(x=x):
            return osm.softmax(x, -1, causal=True, scale=scale)
        mask_bytes = 0
        peer_args = (x, upper)
    calls = {"online_softmax": ours, "torch eager": eager, "copy": lambda: out.copy_(x)}
    if with_compile:
        torch._dynamo.reset()
        compiled = torch.compile(eager, dynamic=False)
        calls["torch.compile"] = lambda: compiled(*peer_args)
    for name in ("torch eager", "torch.compile"):
        if name in calls:
            torch.testing.assert_close(calls[name]().float(), ours().float(), rtol=2e-2, atol=2e-3)
    times = median_times(calls, torch.device("cpu"), min_runs=5, max_runs=9, budget_s=0.5)
    moved = 2 * x.numel() * x.element_size() + mask_bytes
    return times, moved, 2 * x.numel() * x.element_size()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="512,2048")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--masks", default="padding,causal")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    print(machine_line(machine_info(torch.device("cpu"))))
    print("| shape (8, 16, S, S) | dtype | mask | online_softmax | torch eager | torch.compile | vs eager | "
          "vs compile | GB/s (copy GB/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq in (int(s) for s in args.seqs.split(",")):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for kind in args.masks.split(","):
                t, moved, copy_bytes = case(seq, dtype, kind, not args.no_compile)
                ours, eager = t["online_softmax"], t["torch eager"]
                comp = t.get("torch.compile")
                comp_s = f"{comp * 1e3:.1f} ms" if comp else "-"
                vs_comp = f"{comp / ours:.2f}x" if comp else "-"
                print(f"| S={seq} | {str(dtype).split('.')[-1]} | {kind} | {ours * 1e3:.1f} ms | {eager * 1e3:.1f} ms | "
                      f"{comp_s} | {eager / ours:.2f}x | {vs_comp} | {moved / ours / 1e9:.1f} "
                      f"({copy_bytes / t['copy'] / 1e9:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
