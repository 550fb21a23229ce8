"""Vocabulary-parallel softmax on 2 Gloo processes of this machine (no GPU needed):

    python examples/distributed_softmax.py [--world 2] [--rows 64] [--vocab 32000]

Each rank holds a slice of the vocabulary; only per-row states and top-k candidates travel.
"""

import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import online_softmax as osm
import online_softmax.distributed as osd


def run(rank, world, port, rows, vocab):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3   # the same full logits everywhere
    shard = x.tensor_split(world, dim=-1)[rank]                                      # ...of which this rank keeps a slice
    y = osd.softmax(shard)
    lse = osd.logsumexp(shard)
    top = osd.softmax_topk(shard, k=5)
    full_y = osm.softmax(x, dim=-1).tensor_split(world, dim=-1)[rank]
    comm = osd.communication_bytes(shard, k=5)
    if rank == 0:
        print(f"rank 0 of {world}: shard {list(shard.shape)}; softmax slice matches the single-process op: "
              f"{torch.allclose(y, full_y, atol=1e-7)}; logsumexp matches: "
              f"{torch.allclose(lse, torch.logsumexp(x, -1), atol=1e-5)}")
        print(f"global top-5 indices of row 0: {top.indices[0].tolist()} (single process: "
              f"{osm.softmax_topk(x, 5).indices[0].tolist()})")
        print(f"bytes sent by this rank for softmax_topk: {comm.state_bytes:,}; all-gathering the logits instead: "
              f"{comm.gather_logits_bytes:,}")
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world, port, args.rows, args.vocab), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
