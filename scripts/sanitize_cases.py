"""Small calls that reach every CUDA kernel once, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python3 scripts/sanitize_cases.py

Shapes are chosen by the plans of csrc/kernels/launch_plan.h (online_softmax.cuda_plan): rows in
registers (each sub-warp/warp/block size), rows cached in shared memory (enough rows to fill the
SMs), rows split over blocks (few rows), strided dims (vector and scalar columns, cached, split),
misaligned row starts, the fused top-k (warp, block, split) with its backward, token_logprobs, the
cross-entropy backward (rows and chunks) and the distillation loss (forward and backward). Each result is checked against float64, so a kernel that runs clean but wrong fails too.

--short runs float32 and bfloat16 only (4- and 8-wide vectors: every kernel path, half the
instantiations), the list scripts/gpu_check.sh runs in its first call; the default runs all four dtypes."""

import sys

import torch

import online_softmax as osm
from online_softmax.reference.distillation import distillation_rows_reference, reduce_rows

torch.manual_seed(0)
sms = torch.cuda.get_device_properties(0).multi_processor_count
cases = [(3, 1), (5, 3), (7, 33), (9, 257), (4, 1000), (3, 4000), (2, 16000), (sms + 1, 20000),
         (sms + 1, 40000), (2, 100000), (1, 300001)]
checked = 0
dtypes = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
if "--short" in sys.argv[1:]:
    dtypes = dtypes[:2]
for dtype in dtypes:
    print(f"sanitize_cases: {dtype} ({checked} cases so far)", flush=True)
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    for rows, n in cases:
        flat = torch.randn(rows * n + 1, device="cuda", dtype=dtype) * 3
        for x in (flat[:-1].view(rows, n), flat[1:].view(rows, n)):  # aligned, then misaligned
            xr = x.double()
            y = osm.softmax(x, dim=-1)
            torch.testing.assert_close(y.double(), torch.softmax(xr, -1), rtol=tol, atol=tol)
            g = torch.randn_like(x)
            xg = x.clone().requires_grad_()
            osm.log_softmax(xg, dim=-1).backward(g)
            xd = xr.clone().requires_grad_()
            torch.log_softmax(xd, -1).backward(g.double())
            torch.testing.assert_close(xg.grad.double(), xd.grad, rtol=10 * tol, atol=10 * tol)
            k = min(n, 9)
            xt = x.clone().requires_grad_()
            v, i = osm.softmax_topk(xt, k)
            v.sum().backward()
            torch.testing.assert_close(v.double(), torch.softmax(xr, -1).topk(k).values, rtol=tol, atol=tol)
            ids = torch.randint(0, n, x.shape[:-1], device="cuda")
            scored = osm.token_logprobs(x, ids, top_n=k)
            ref = torch.log_softmax(xr, -1)
            torch.testing.assert_close(scored.log_probs.double(), ref.gather(-1, ids[:, None])[:, 0], rtol=tol, atol=tol)
            torch.testing.assert_close(scored.top_log_probs.double(), ref.topk(k).values, rtol=tol, atol=tol)
            checked += 1
    x3 = torch.randn(3, 50, 40, device="cuda", dtype=dtype)
    torch.testing.assert_close(osm.softmax(x3, dim=1).double(), torch.softmax(x3.double(), 1), rtol=tol, atol=tol)
    m, d = osm.softmax_stats(x3, dim=1)
    checked += 1
    for shape, dim in (((20000, 8), 0), ((3000, 7), 0), ((4, 600, 16), 1)):  # strided: split, scalar, cached
        xs = torch.randn(shape, device="cuda", dtype=dtype) * 3
        torch.testing.assert_close(osm.softmax(xs, dim=dim).double(), torch.softmax(xs.double(), dim),
                                   rtol=tol, atol=tol)
        xg = xs.clone().requires_grad_()
        osm.log_softmax(xg, dim=dim).backward(torch.ones_like(xs))
        checked += 1
    for rows, n, k in ((5000, 64, 8), (7, 1000, 32), (3, 33, 2)):  # the warp top-k
        xw = torch.randn(rows, n, device="cuda", dtype=dtype) * 3
        v, i = osm.softmax_topk(xw, k)
        torch.testing.assert_close(v.double(), torch.softmax(xw.double(), -1).topk(k).values, rtol=tol, atol=tol)
        checked += 1
    for rows, n in ((5, 33), (4, 1000), (2, 100000), (sms + 1, 20000)):  # cross_entropy's backward: rows, chunks
        xc = (torch.randn(rows, n, device="cuda", dtype=dtype) * 3).requires_grad_()
        tc = torch.randint(0, n, (rows,), device="cuda")
        osm.cross_entropy(xc, tc, label_smoothing=0.1).backward()
        xd = xc.detach().double().requires_grad_()
        torch.nn.functional.cross_entropy(xd, tc, label_smoothing=0.1).backward()
        torch.testing.assert_close(xc.grad.double(), xd.grad, rtol=10 * tol, atol=10 * tol)
        checked += 1
    for rows, n in ((5, 33), (4, 1000), (2, 100000), (sms + 1, 20000)):  # distillation: a block per row; rows, chunks
        flat_s = torch.randn(rows * n + 1, device="cuda", dtype=dtype) * 3
        flat_t = torch.randn(rows * n + 1, device="cuda", dtype=dtype) * 3
        xs, xt = flat_s[1:].view(rows, n).requires_grad_(), flat_t[:-1].view(rows, n)  # misaligned student
        td = torch.randint(0, n, (rows,), device="cuda")
        osm.distillation_loss(xs, xt, td, kind="jsd", temperature=2.0).backward()
        xd = xs.detach().double().requires_grad_()
        want = reduce_rows(distillation_rows_reference(xd, xt.double(), td, kind="jsd", temperature=2.0), td, -100,
                           "mean")
        want.backward()
        torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=10 * tol, atol=10 * tol)
        checked += 1
torch.cuda.synchronize()
print(f"sanitize_cases: {checked} cases ran and matched float64")
