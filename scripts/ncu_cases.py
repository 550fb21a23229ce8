"""One call of each of the three kernels that matter most, for Nsight Compute (scripts/gpu_check.sh ncu):

    ncu --kernel-name-base demangled -k regex:online_softmax python3 scripts/ncu_cases.py

softmax forward, softmax backward and the fused top-k (k=8) over 2048 rows of 16384 float32 (128 MiB,
more than the L2 of an H100 or H200, so the counters show DRAM traffic). Each op runs once, without
a warm-up, so ncu profiles each launch once; the inputs come from torch kernels, which the -k filter
leaves out. The byte counts each kernel should move are printed beside, from cuda_plan."""

import torch

import online_softmax as osm

ROWS, COLS, K = 2048, 16384, 8
x = torch.randn(ROWS, COLS, device="cuda") * 3
y = torch.softmax(x, -1)
dy = torch.randn_like(y)
torch.cuda.synchronize()
for op, kw in (("forward", {}), ("backward", {}), ("softmax_topk", {"k": K})):
    plan = osm.cuda_plan(op, (ROWS, COLS), torch.float32, device="cuda", **kw)
    print(f"ncu_cases: {op} {ROWS}x{COLS}: {plan.summary()}", flush=True)
osm.softmax(x, -1)
torch.ops.online_softmax.backward(dy, y, -1, False, 1.0, None)
osm.softmax_topk(x, K)
torch.cuda.synchronize()
print("ncu_cases: done", flush=True)
