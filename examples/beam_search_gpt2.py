"""Beam search with online_softmax's fused decode step, on a GPT-2 built from a config with random
weights (nothing is downloaded), checked against Hugging Face's generate() and timed against the
unfused torch step, with and without transformers' logits processors, on left-padded prompts
with a KV cache.

    python examples/beam_search_gpt2.py [--beams 4] [--new-tokens 16] [--vocab 50257] [--device cpu]
"""

import argparse
import statistics
import time

import torch
import transformers

import online_softmax as osm
from online_softmax.reference import unfused_beam_search_step


def cached_step(model):
    """The decoder's step protocol over a Hugging Face causal LM with its KV cache and left-padded
    prompts: reorder the cache, feed the new token with its position, return the last logits."""
    def step(ids, cache, beam_idx, mask):
        if cache is not None:
            cache.reorder_cache(beam_idx)  # each new row continues beam beam_idx[row]
        new = ids if cache is None else ids[:, -1:]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1]:]
        out = model(new, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :], out.past_key_values
    return step


def left_padded(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def transformers_step(logits, beam_scores, seqs, processors, num_beams):
    """The step transformers' beam search runs: log-softmax, processors, beam scores, flat top-k."""
    batch, vocab = beam_scores.shape[0], logits.shape[-1]
    lp = processors(seqs, torch.log_softmax(logits.float(), -1))
    scores = (lp.view(batch, num_beams, vocab) + beam_scores[..., None]).view(batch, -1)
    return scores.topk(2 * num_beams, dim=-1)


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

    lengths = [8 - 3 * (i % 2) for i in range(args.batch)]  # prompts of different lengths
    ids, mask = left_padded([torch.randint(0, args.vocab - 1, (n,)).tolist() for n in lengths], eos)
    ids, mask = ids.to(device), mask.to(device)
    rules = dict(no_repeat_ngram_size=3, repetition_penalty=1.2, min_new_tokens=4)
    decoder = osm.BeamSearchDecoder(args.beams, args.new_tokens, eos_token_id=eos, pad_token_id=eos, **rules)
    ours = decoder.generate(cached_step(model), ids, attention_mask=mask)
    hf = model.generate(ids, attention_mask=mask, num_beams=args.beams, do_sample=False,
                        max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=eos,
                        return_dict_in_generate=True, output_scores=True, **rules)
    print("prompt lengths:", lengths, "options:", rules)
    print("online_softmax sequences:\n", ours.sequences.tolist())
    print("scores:", [round(s, 5) for s in ours.sequences_scores.tolist()])
    same = ours.sequences.shape == hf.sequences.shape and torch.equal(ours.sequences, hf.sequences)
    gap = (ours.sequences_scores - hf.sequences_scores).abs().max().item() if same else float("nan")
    print(f"same sequences as transformers.generate: {same}; largest score difference {gap:.2e}")

    # One decode step with the same processors, on a 64-token history.
    rows = args.batch * args.beams
    logits = torch.randn(rows, args.vocab, device=device) * 3
    scores = torch.randn(args.batch, args.beams, device=device)
    seqs = torch.randint(0, args.vocab, (rows, 64), device=device)
    processors = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(1.2),
                                                   transformers.NoRepeatNGramLogitsProcessor(3)])
    fused = median_ms(lambda: decoder._step(seqs, logits, scores, 2 * args.beams, 8, 8 + args.new_tokens, None),
                      device)
    theirs = median_ms(lambda: transformers_step(logits, scores, seqs, processors, args.beams), device)
    plain = median_ms(lambda: osm.beam_search_step(logits, scores, args.beams), device)
    unfused = median_ms(lambda: unfused_beam_search_step(logits, scores, args.beams), device)
    print(f"decode step, {args.batch} x {args.beams} beams x {args.vocab} vocab on {device}:")
    print(f"  no processors:  fused {plain:.3f} ms, unfused torch {unfused:.3f} ms ({unfused / plain:.2f}x)")
    print(f"  repetition penalty + 3-gram blocking over 64 tokens: fused {fused:.3f} ms, "
          f"transformers' processors {theirs:.3f} ms ({theirs / fused:.2f}x)")


if __name__ == "__main__":
    main()
