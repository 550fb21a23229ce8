"""python -m online_softmax: a short demo of every API, then the benchmark on the present device.

    python -m online_softmax            demo + quick benchmark
    python -m online_softmax --full     demo + the full benchmark sweep
    python -m online_softmax --demo     demo only
"""

import argparse

import torch

import online_softmax as osm
from online_softmax import bench


def demo(device):
    torch.manual_seed(0)
    print(f"online_softmax {osm.__version__}: {osm.build_info()}")
    logits = torch.randn(4, 50257, device=device) * 3

    p = osm.softmax(logits, dim=-1)
    err = (p.double() - torch.softmax(logits.double(), -1)).abs().max().item()
    print(f"softmax of 4 x 50257 logits: rows sum to {p.sum(-1).tolist()}, max |error| vs float64 {err:.2e}")

    values, indices = osm.softmax_topk(logits, 5, temperature=0.7)
    print(f"top-5 probabilities at temperature 0.7 (one read of the logits): {values[0].tolist()}")
    print(f"  token ids: {indices[0].tolist()}")

    # The same softmax from chunks that never meet: merge their (max, sumexp) states.
    chunks = torch.chunk(logits, 3, dim=-1)
    state = osm.merge_states(osm.softmax_stats(c) for c in chunks)
    stitched = torch.cat([state.normalize(c) for c in chunks], dim=-1)
    print(f"3 chunks merged: max |difference| from the one-shot softmax {(stitched - p).abs().max().item():.2e}, "
          f"logsumexp {state.logsumexp()[0].item():.4f} vs torch {torch.logsumexp(logits, -1)[0].item():.4f}")

    g = torch.Generator(device).manual_seed(0)
    drawn = osm.sample(logits, temperature=0.7, top_k=50, top_p=0.9, generator=g)
    print(f"sampled tokens (temperature 0.7, top-k 50, top-p 0.9, seeded): {drawn.token_ids[:, 0].tolist()}, "
          f"log-probs {[round(v, 3) for v in drawn.log_probs[:, 0].tolist()]}")

    router = torch.randn(3, 8, device=device, dtype=torch.bfloat16)
    weights, experts = osm.softmax_topk(router, 2, renormalize=True, dtype=torch.float32)
    print(f"MoE routing, 2 of 8 experts: experts {experts.tolist()}, weights {weights.tolist()}")

    x = logits[:2, :10].clone().requires_grad_()
    osm.log_softmax(x, dim=-1).sum().backward()
    print(f"gradient of sum(log_softmax) (should be ~0 per row): {x.grad.sum(-1).tolist()}")
    inf = float("inf")
    print(f"softmax([-inf, -inf]) = {osm.softmax(torch.tensor([-inf, -inf])).tolist()} "
          f"(torch: {torch.softmax(torch.tensor([-inf, -inf]), 0).tolist()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the full benchmark sweep")
    parser.add_argument("--demo", action="store_true", help="run the demo only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    demo(torch.device(args.device))
    if not args.demo:
        print()
        bench.main(["--device", args.device] + ([] if args.full else ["--quick"]))


if __name__ == "__main__":
    main()
