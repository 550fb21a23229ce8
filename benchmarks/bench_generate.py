"""model.generate() with and without custom_generate=online_softmax.hf.generate, side by side.

    python benchmarks/bench_generate.py [--vocabs 50257,128256] [--batches 1,8] [--rounds 5]

A GPT-2-shaped model with random weights (built from a config, nothing downloaded), 4 beams, 64 new
tokens, repetition_penalty=1.2 and no_repeat_ngram_size=3, EOS never generated (so every call runs
all 64 steps and both loops do the same model work). The model is small (n_embd 256, 2 layers)
so that a 2-core machine runs the sweep in minutes; its lm_head still produces full-vocabulary
logits. Each call's time is split into the model's forward time (the forward calls timed in the
same run) and the rest: the decoding share, which is what the keyword changes. Medians of
interleaved rounds; the two outputs are checked to be identical first.
"""

import argparse
import statistics
import time

import torch
import transformers

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line


def gpt2_shaped(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=256, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[vocab - 1] = -1.0  # EOS is never the best continuation
    return model


class ForwardTimer:
    """Adds up the wall time of the model's forward calls (the model work both loops share)."""

    def __init__(self, model):
        self.seconds = 0.0
        self.inner = model.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        model.forward = timed


def run(vocab, batch, rounds, new_tokens=64, beams=4):
    model = gpt2_shaped(vocab)
    timer = ForwardTimer(model)
    ids = torch.randint(1, vocab - 1, (batch, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.2,
              no_repeat_ngram_size=3, attention_mask=torch.ones_like(ids))
    calls = {"transformers": lambda: model.generate(ids, **kw),
             "online_softmax": lambda: model.generate(ids, custom_generate=osm.hf.generate, **kw)}
    outs = {name: fn() for name, fn in calls.items()}
    assert torch.equal(outs["transformers"], outs["online_softmax"]), "the two loops disagree"
    total = {name: [] for name in calls}
    forward = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            timer.seconds = 0.0
            start = time.perf_counter()
            calls[name]()
            total[name].append(time.perf_counter() - start)
            forward[name].append(timer.seconds)
    rows = {}
    for name in calls:
        t = statistics.median(total[name])
        f = statistics.median(forward[name])
        rows[name] = (t, f, statistics.median([a - b for a, b in zip(total[name], forward[name])]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="50257,128256")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(machine_line(machine_info(torch.device("cpu"))))
    print("| vocab | batch x beams | generate() | with the keyword | speed-up | decoding share: generate() | "
          "with the keyword | decoding speed-up | model forward |")
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            rows = run(vocab, batch, args.rounds)
            (t0, f0, d0), (t1, f1, d1) = rows["transformers"], rows["online_softmax"]
            print(f"| {vocab} | {batch} x 4 | {t0 * 1e3:.0f} ms | {t1 * 1e3:.0f} ms | {t0 / t1:.2f}x | "
                  f"{d0 * 1e3:.0f} ms | {d1 * 1e3:.0f} ms | {d0 / d1:.2f}x | {f0 * 1e3:.0f} / {f1 * 1e3:.0f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
