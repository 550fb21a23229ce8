"""Speculative decoding benchmarks, side by side in one process.

    python benchmarks/bench_speculative.py [--part verify,generate] [--device cpu] [--threads N]

**verify**: the verification step alone, ``online_softmax.rejection_sample`` against the same
algorithm in torch ops as serving engines write it (``reference.unfused_rejection_sample``: a
softmax of the target rows, gathers, the residual, ``torch.multinomial``), for batch B, n drafts
and vocabulary V, float32 and bfloat16 target logits with float32 draft probabilities. Times are
medians of interleaved rounds. "GB/s" counts one read of the target logits and of the draft
probabilities (the least any implementation moves); "copy" is a same-size device copy timed in the
same rounds, the machine's practical bound; "moved/min" is the bytes our call reads (the op's
argument check reads the draft probabilities once, each reached target position is read once, and
each row's final draw reads one target row and, at a rejection, its draft row again) over that
least.

**generate**: end to end, ``model.generate(assistant_model=..., custom_generate=online_softmax.hf.generate)``
against transformers' own assisted generate() (batch 1) and against it row by row (batch 8: its
only way, since it refuses batches), greedy, on a small random target and a 1-layer assistant;
identical sequences are checked before anything is timed.
"""

import argparse
import sys

import torch

import online_softmax as osm
from online_softmax.bench import machine_info, machine_line, median_times
from online_softmax.reference import unfused_rejection_sample

VERIFY_BATCHES = [1, 8, 64]
VERIFY_DRAFTS = [4, 8]
VERIFY_VOCABS = [32000, 128256]


def verify_inputs(batch, n, vocab, dtype, device, seed=0):
    """Target logits whose drafts are accepted about as often as in practice (the draft is a
    noisy copy of the target, so rows stop at different positions)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    target = (torch.randn(batch, n + 1, vocab, generator=g) * 2).to(device)
    draft_logits = target[:, :n] + torch.randn(batch, n, vocab, generator=g).to(device) * 0.5
    q = torch.softmax(draft_logits, -1)
    ids = torch.multinomial(q.reshape(-1, vocab).cpu(), 1, generator=g).reshape(batch, n).to(device)
    return target.to(dtype), ids, q


def bytes_moved(target, q, out):
    """What our call reads: q once (argument check), every target position up to each row's
    num_draft_tokens (here all of them) once, and per row one more target row (the final draw) plus
    its draft row at a rejection."""
    batch, n1, vocab = target.shape
    t_row, q_row = vocab * target.element_size(), vocab * q.element_size()
    reached = batch * n1
    rejected = int((out.num_accepted < n1 - 1).sum())
    return q.numel() * q.element_size() + reached * t_row + batch * t_row + rejected * q_row


def bench_verify(device, dtypes, batches, drafts, vocabs):
    print(f"{'verify':<8} {'dtype':<9} {'B':>3} {'n':>2} {'V':>7} {'impl':<16} {'median':>11} {'GB/s':>8} "
          f"{'vs torch':>8} {'moved/min':>9}")
    for dtype in dtypes:
        for vocab in vocabs:
            for batch in batches:
                for n in drafts:
                    target, ids, q = verify_inputs(batch, n, vocab, dtype, device)
                    least = target.numel() * target.element_size() + q.numel() * q.element_size()
                    src = torch.empty(least, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    g1, g2 = torch.Generator(device).manual_seed(1), torch.Generator(device).manual_seed(1)
                    calls = {
                        "online_softmax": lambda: osm.rejection_sample(target, ids, q, generator=g1),
                        "torch": lambda: unfused_rejection_sample(target, ids, q, generator=g2),
                        "copy": lambda: dst.copy_(src),
                    }
                    times = median_times(calls, device, min_runs=11, budget_s=1.0)
                    out = osm.rejection_sample(target, ids, q, generator=g1)
                    moved = bytes_moved(target, q, out) / least
                    for name, t in times.items():
                        speedup = times["torch"] / t if name != "copy" else float("nan")
                        extra = f"{moved:9.2f}" if name == "online_softmax" else ""
                        print(f"{'verify':<8} {str(dtype)[6:]:<9} {batch:>3} {n:>2} {vocab:>7} {name:<16} "
                              f"{t * 1e3:8.3f} ms {least / t / 1e9:8.2f} {speedup:8.2f} {extra}", flush=True)


def tiny_pair(vocab=8192, seed=0):
    """A small random GPT-2 target (4 layers, n_embd 512) and a 1-layer assistant that shares its
    embeddings, so that the assistant agrees with the target often, as a trained draft does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, n_positions=1024, n_embd=512, n_head=8, bos_token_id=0, eos_token_id=1,
                  pad_token_id=1)
    target = GPT2LMHeadModel(GPT2Config(n_layer=4, **common)).eval()
    assistant = GPT2LMHeadModel(GPT2Config(n_layer=1, **common)).eval()
    assistant.transformer.wte.weight.data.copy_(target.transformer.wte.weight.data)
    assistant.transformer.wpe.weight.data.copy_(target.transformer.wpe.weight.data)
    assistant.transformer.h[0].load_state_dict(target.transformer.h[0].state_dict())
    return target, assistant


def bench_generate(device, batch_sizes=(1, 8), prompt_len=24, new_tokens=48):
    target, assistant = (m.to(device) for m in tiny_pair())
    g = torch.Generator().manual_seed(3)
    print(f"{'generate':<9} {'B':>2} {'impl':<34} {'median':>10} {'vs transformers':>15}")
    for batch in batch_sizes:
        lengths = [prompt_len - (3 * r) % 7 for r in range(batch)]           # left-padded prompts of different lengths
        ids = torch.full((batch, prompt_len), 1, dtype=torch.long)
        mask = torch.zeros(batch, prompt_len, dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, prompt_len - n:] = torch.randint(2, target.config.vocab_size, (n,), generator=g)
            mask[r, prompt_len - n:] = 1
        ids, mask = ids.to(device), mask.to(device)
        common = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=1)

        def ours():
            with torch.no_grad():
                return target.generate(ids, attention_mask=mask, assistant_model=assistant,
                                       custom_generate=osm.hf.generate, **common)

        def theirs():  # transformers' assisted generate() refuses batches: one row at a time
            with torch.no_grad():
                return [target.generate(ids[r:r + 1, prompt_len - n:], attention_mask=mask[r:r + 1, prompt_len - n:],
                                        assistant_model=assistant, **common) for r, n in enumerate(lengths)]

        def plain():
            with torch.no_grad():
                return target.generate(ids, attention_mask=mask, **common)

        got, want, stock = ours(), theirs(), plain()
        for r, n in enumerate(lengths):  # identical greedy outputs first
            row = got[r, prompt_len - n:]
            row = row[: want[r].shape[1]]
            assert torch.equal(row, want[r][0]), f"row {r} differs from transformers' assisted generate()"
        assert torch.equal(got[:, : stock.shape[1]], stock), "differs from transformers' generate() without assistant"
        label = "transformers assisted" + (" (row by row)" if batch > 1 else "")
        times = median_times({"online_softmax.hf.generate": ours, label: theirs, "transformers (no assistant)": plain},
                             device, min_runs=5, max_runs=15, budget_s=3.0)
        for name, t in times.items():
            print(f"{'generate':<9} {batch:>2} {name:<34} {t * 1e3:7.1f} ms {times[label] / t:15.2f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="verify,generate", type=lambda s: s.split(","))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: [getattr(torch, d) for d in s.split(",")])
    p.add_argument("--batches", default=VERIFY_BATCHES, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--drafts", default=VERIFY_DRAFTS, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--vocabs", default=VERIFY_VOCABS, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line(machine_info(device)), f"threads={torch.get_num_threads()}", machine_info(device)["date"])
    if "verify" in args.part:
        bench_verify(device, args.dtypes, args.batches, args.drafts, args.vocabs)
    if "generate" in args.part:
        bench_generate(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
