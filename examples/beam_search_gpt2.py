"""Beam search with online_softmax's fused decode step, on a GPT-2 built from a config with random
weights (nothing is downloaded), checked against Hugging Face's generate() and timed against the
unfused torch step.

    python examples/beam_search_gpt2.py [--beams 4] [--new-tokens 16] [--vocab 50257] [--device cpu]
"""

import argparse
import statistics
import time

import torch
import transformers

import online_softmax as osm
from online_softmax.beam_search import unfused_beam_search_step


def cached_step(model):
    """The decoder's step protocol over a Hugging Face causal LM with its KV cache."""
    def step(ids, cache, beam_idx):
        if cache is None:
            out = model(ids, use_cache=True)
        else:
            cache.reorder_cache(beam_idx)  # each new row continues beam beam_idx[row]
            out = model(ids[:, -1:], past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :], out.past_key_values
    return step


def median_ms(fn, device, runs=30):
    times = []
    for _ in range(runs + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    eos = args.vocab - 1
    config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = transformers.GPT2LMHeadModel(config).eval().to(device)
    prompt = torch.randint(0, args.vocab - 1, (args.batch, 8), device=device)

    decoder = osm.BeamSearchDecoder(args.beams, args.new_tokens, eos_token_id=eos, pad_token_id=eos)
    ours = decoder.generate(cached_step(model), prompt)
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), num_beams=args.beams, do_sample=False,
                        max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=eos,
                        return_dict_in_generate=True, output_scores=True)
    print("online_softmax sequences:\n", ours.sequences.tolist())
    print("scores:", [round(s, 5) for s in ours.sequences_scores.tolist()])
    same = torch.equal(ours.sequences, hf.sequences)
    gap = (ours.sequences_scores - hf.sequences_scores).abs().max().item()
    print(f"same sequences as transformers.generate: {same}; largest score difference {gap:.2e}")

    logits = torch.randn(args.batch * args.beams, args.vocab, device=device) * 3
    scores = torch.randn(args.batch, args.beams, device=device)
    fused = median_ms(lambda: osm.beam_search_step(logits, scores, args.beams), device)
    unfused = median_ms(lambda: unfused_beam_search_step(logits, scores, args.beams), device)
    print(f"decode step, {args.batch} x {args.beams} beams x {args.vocab} vocab on {device}: "
          f"fused {fused:.3f} ms, unfused torch {unfused:.3f} ms ({unfused / fused:.2f}x)")


if __name__ == "__main__":
    main()
