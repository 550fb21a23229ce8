"""Side-by-side benchmark: online_softmax against torch eager and torch.compile in one process.

    python -m online_softmax.bench [--ops forward,backward,topk] [--shapes 4096x1024,...] [--quick]

For every shape it times two same-size copies: into an existing buffer (the bandwidth limit every
row's "% of copy" refers to) and x.clone(), which allocates its result like the ops do (on a CPU,
first-touch page faults of a fresh large tensor can cost more than the copy itself). It reports
each implementation's time (median of many calls, interleaved so that every implementation follows
every other one equally often), effective bandwidth from an explicit byte count (forward: read x +
write y; backward: read dy, y + write dx; top-k: read x), and the speedup over torch eager. Results
go to a CSV, a JSON and (when matplotlib is installed) a PNG under --out.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

DEFAULT_SHAPES = [(4096, 1024), (1024, 32768), (64, 131072), (8, 262144), (1, 4 * 1024 * 1024)]
QUICK_SHAPES = [(1024, 1024), (64, 32768), (4, 262144)]
DEFAULT_KS = [1, 8, 64]
BEAMS = 4  # beams per batch entry for --ops beam (rows = batch * beams)
# On a GPU: rows x cols moving at least 1 GiB (float32 forward) for cols 256..262144, then 1-64 rows
# with 128k-4M columns (a batch of decoder steps over a large vocabulary).
GPU_SHAPES = [(524288, 256), (131072, 1024), (32768, 4096), (4096, 32768), (512, 262144),
              (1, 131072), (1, 4194304), (8, 262144), (8, 1048576), (64, 131072), (64, 4194304)]
GPU_QUICK_SHAPES = [(131072, 1024), (4096, 32768), (8, 262144), (1, 4194304)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device):
    if device.type == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, device, min_runs=7, max_runs=101, budget_s=1.0):
    """Median wall time of fn() in seconds (CUDA events on GPUs), after one warm-up call."""
    return median_times({"fn": fn}, device, min_runs, max_runs, budget_s)["fn"]


def balanced_order(n):
    """A cyclic order of 0..n-1 in which every implementation directly follows every other one
    equally often (once each) and never itself: an Eulerian circuit of the complete directed graph
    on n nodes, so each index appears n - 1 times (n = 1: [0]).

    What ran just before a call changes its time: a call that follows one which read the same
    tensors finds them in cache, one that follows torch.compile's temporaries does not. A rotating
    start is not balanced: with three calls (ours, torch, torch.compile), ours followed
    torch.compile in 2/3 of the rounds and torch eager in 1/3."""
    if n == 1:
        return [0]
    unused = {a: [b for b in range(n) if b != a] for a in range(n)}
    stack, circuit = [0], []
    while stack:  # Hierholzer's algorithm
        node = stack[-1]
        if unused[node]:
            stack.append(unused[node].pop(0))
        else:
            circuit.append(stack.pop())
    circuit.reverse()
    return circuit[:-1]  # the last step returns to the first: the order is cyclic


def median_times(calls, device, min_runs=7, max_runs=101, budget_s=1.0):
    """Median wall time in seconds of each of several calls, timed interleaved.

    The calls run in the cyclic order of balanced_order, in which every call follows every other
    one equally often. Timing each call in its own block was biased: on the 2-core VM one function
    timed in two consecutive blocks gave medians 30% apart, the first block slower, so whichever
    implementation came first was handicapped."""
    names = list(calls)
    for name in names:
        calls[name]()
    _sync(device)
    times = {name: [] for name in names}
    order = balanced_order(len(names))
    per_cycle = max(1, len(names) - 1)  # calls of each implementation per pass over the order
    start = time.perf_counter()
    runs = 0
    while runs < max_runs and (runs < min_runs or time.perf_counter() - start < budget_s * len(names)):
        for i in order:
            times[names[i]].append(_time_once(calls[names[i]], device))
        runs += per_cycle
    return {name: statistics.median(t) for name, t in times.items()}


def _compiled(fn, *tensors):
    """A no-argument call of torch.compile(fn) on tensors, or None where compile is unavailable."""
    try:
        torch._dynamo.reset()  # each case compiles afresh instead of piling up recompiles
        cf = torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover - environment dependent
        print(f"  torch.compile unavailable: {e}", file=sys.stderr)
        return None
    return lambda: cf(*tensors)


def cases(op, x, ks, with_compile=True):
    """(label, bytes moved, {impl: no-argument callable}) for one op on input x."""
    import online_softmax as osm

    ops = torch.ops.online_softmax
    n = x.numel() * x.element_size()
    comp = _compiled if with_compile else (lambda *a: None)
    if op == "forward":
        yield "softmax", 2 * n, {
            "online_softmax": lambda: osm.softmax(x, -1),
            "torch": lambda: torch.softmax(x, -1),
            "torch.compile": comp(lambda t: torch.softmax(t, -1), x),
        }
        yield "log_softmax", 2 * n, {
            "online_softmax": lambda: osm.log_softmax(x, -1),
            "torch": lambda: torch.log_softmax(x, -1),
            "torch.compile": comp(lambda t: torch.log_softmax(t, -1), x),
        }
    elif op == "backward":
        y = torch.softmax(x, -1)
        dy = torch.randn_like(y)
        yield "softmax_backward", 3 * n, {
            "online_softmax": lambda: ops.backward(dy, y, -1, False, 1.0, None),
            "torch": lambda: torch._softmax_backward_data(dy, y, -1, x.dtype),
            "torch.compile": comp(lambda g, out: out * (g - (g * out).sum(-1, keepdim=True)), dy, y),
        }
    elif op == "beam":
        from .reference import unfused_beam_search_step

        beams = BEAMS if x.shape[0] % BEAMS == 0 else 1
        scores = torch.randn(x.shape[0] // beams, beams, device=x.device, dtype=torch.float32)
        yield f"beam_search_step beams={beams}", n, {
            "online_softmax": lambda: osm.beam_search_step(x, scores, beams),
            "torch": lambda: unfused_beam_search_step(x, scores, beams),
            "torch.compile": comp(lambda t, sc: unfused_beam_search_step(t, sc, beams), x, scores),
        }
    elif op == "topk":
        for k in ks:
            if k > x.shape[-1]:
                continue
            yield f"softmax_topk k={k}", n, {
                "online_softmax": lambda k=k: osm.softmax_topk(x, k),
                "torch": lambda k=k: torch.softmax(x, -1).topk(k),
                "torch.compile": comp(lambda t, k=k: torch.softmax(t, -1).topk(k), x),
            }


# Shapes whose CUDA plans the benchmark prints: MoE routers, a long dim 0, few long rows, rows that fill
# the GPU exactly or not, and decoder-sized vocabularies: (op, shape, dim, k).
PLAN_SHAPES = [
    ("softmax_topk", (1 << 20, 64), -1, 2), ("softmax_topk", (1 << 20, 64), -1, 8),
    ("forward", (1 << 20, 8), 0, None), ("backward", (1 << 20, 8), 0, None),
    ("softmax_topk", (1, 262144), -1, 64), ("softmax_topk_backward", (4, 262144), -1, 8),
    ("forward", (132, 16384), -1, None), ("forward", (264, 56000), -1, None),
    ("forward", (4096, 1024), -1, None), ("forward", (4, 262144), -1, None), ("softmax_topk", (4096, 1024), -1, 8),
]


def _plan_of_case(label, shape, dtype, device):
    """cuda_plan for a benchmark case on the current GPU, or None (beam search: not one launcher)."""
    from .cuda_plan import cuda_plan

    name = label.split(" ")[0]
    if name in ("softmax", "log_softmax"):
        return cuda_plan("forward", shape, dtype)
    if name == "softmax_backward":
        return cuda_plan("backward", shape, dtype)
    if name == "softmax_topk":
        return cuda_plan("softmax_topk", shape, dtype, k=int(label.split("k=")[1]))
    return None


def print_plans(device="h100", dtype=torch.float32):
    """The launch plans and their modelled roofline times for PLAN_SHAPES (no GPU needed)."""
    from .cuda_plan import cuda_plan

    for op, shape, dim, k in PLAN_SHAPES:
        print(cuda_plan(op, shape, dtype, dim, k=k, device=device).summary())


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        defaults = GPU_QUICK_SHAPES if args.quick else GPU_SHAPES
    else:
        defaults = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    shapes = args.shapes or defaults
    print(machine_line(machine_info(device)), flush=True)
    records = []
    total = len(shapes) * len(args.ops)
    step = 0
    for shape in shapes:
        x = torch.randn(shape, dtype=dtype, device=device) * 3
        out_buf = torch.empty_like(x)
        copy_t = median_time(lambda: x.clone(), device)
        copy_into_t = median_time(lambda: out_buf.copy_(x), device)
        nbytes = x.numel() * x.element_size()
        del out_buf
        for op in args.ops:
            step += 1
            print(f"[{step}/{total}] {op} {shape[0]}x{shape[1]} {args.dtype}", flush=True)
            for label, moved, impls in cases(op, x, args.ks, not args.no_compile):
                timed = median_times({impl: call for impl, call in impls.items() if call is not None}, device)
                base = timed.get("torch")
                for impl, t in timed.items():
                    record = {
                        "op": label, "rows": shape[0], "cols": shape[1], "dtype": args.dtype,
                        "device": str(device), "impl": impl, "time_ms": t * 1e3,
                        "bytes": moved, "gbps": moved / t / 1e9,
                        "copy_gbps": 2 * nbytes / copy_t / 1e9,
                        "copy_into_gbps": 2 * nbytes / copy_into_t / 1e9,
                    }
                    plan = _plan_of_case(label, shape, dtype, device) if (
                        device.type == "cuda" and impl == "online_softmax") else None
                    if plan is not None:
                        # The plan beside the time: where the bytes go, and how far from the model.
                        record["plan"] = plan.path + ": " + ", ".join(
                            f"{l.kernel} {l.grid}x{l.block[0] * l.block[1]}" for l in plan.launches)
                        record["model_bytes"] = plan.dram_bytes
                        if plan.roofline_seconds:
                            record["time_over_model"] = t / plan.roofline_seconds
                    records.append(record)
                for r in records:
                    if r["op"] == label and (r["rows"], r["cols"]) == shape and base:
                        r["speedup_vs_torch"] = base * 1e3 / r["time_ms"]
                        r["fraction_of_copy"] = r["gbps"] / r["copy_into_gbps"]
                _print_rows([r for r in records if r["op"] == label and (r["rows"], r["cols"]) == shape])
    return records


def _print_rows(rows):
    for r in rows:
        print(f"  {r['op']:<22} {r['impl']:<15} {r['time_ms']:10.3f} ms {r['gbps']:8.2f} GB/s "
              f"{r.get('speedup_vs_torch', float('nan')):6.2f}x vs torch "
              f"{100 * r.get('fraction_of_copy', float('nan')):6.1f}% of copy ({r['copy_into_gbps']:.1f} GB/s; "
              f"clone {r['copy_gbps']:.1f} GB/s)"
              + (f"\n    plan {r['plan']}; {r['model_bytes'] / 1e6:.2f} MB modelled"
                 + (f", {r['time_over_model']:.2f}x the roofline time" if "time_over_model" in r else "")
                 if "plan" in r else ""),
              flush=True)


def summarize(records):
    """Median speedup of online_softmax over torch eager, per op family."""
    families = {}
    for r in records:
        if r["impl"] != "online_softmax" or "speedup_vs_torch" not in r:
            continue
        fam = r["op"].split(" ")[0]
        families.setdefault(fam, []).append(r["speedup_vs_torch"])
    return {fam: statistics.median(v) for fam, v in families.items()}


def machine_info(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    import online_softmax

    info["build"] = online_softmax.build_info()
    return info


def peak_cells(row, ours, theirs):
    """The markdown cells "ours MiB | theirs MiB | ratio" of a row's ``<name>_mib`` peaks ("- | - | -"
    when the row has none)."""
    if f"{ours}_mib" not in row:
        return "- | - | -"
    a, b = row[f"{ours}_mib"], row[f"{theirs}_mib"]
    return f"{a:.0f} MiB | {b:.0f} MiB | {a / b:.1%}"


def machine_line(info):
    """One line naming what the numbers depend on: CPU model, cores, both ISAs, threads, torch."""
    build = info.get("build", {})
    cpu = info.get("cpu", "unknown CPU")
    if info.get("gpu"):
        return f"device: {info['gpu']} (CUDA {info.get('cuda')}), torch {info['torch']}"
    return (f"machine: {cpu}, {os.cpu_count()} cores, {info['threads']} threads; online_softmax CPU kernels "
            f"{build.get('cpu_capability')} (compiled: {','.join(build.get('cpu_capabilities', []))}), torch's "
            f"{build.get('torch_cpu_capability')}; torch {info['torch']}")


def write_results(records, info, out_dir, tag):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, tag)
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "summary_median_speedup": summarize(records), "results": records}, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in records for k in r}))
        w.writeheader()
        w.writerows(records)
    paths = [base + ".json", base + ".csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return paths
    labels = sorted({(r["op"], r["rows"], r["cols"]) for r in records}, key=lambda t: (t[0], t[1] * t[2]))
    impls = ["online_softmax", "torch", "torch.compile"]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(labels)), 5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ys = []
        for op, rows, cols in labels:
            match = [r for r in records if (r["op"], r["rows"], r["cols"], r["impl"]) == (op, rows, cols, impl)]
            ys.append(match[0].get("speedup_vs_torch", 0) if match else 0)
        ax.bar([i + j * width for i in range(len(labels))], ys, width, label=impl)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([i + width for i in range(len(labels))])
    ax.set_xticklabels([f"{op}\n{r}x{c}" for op, r, c in labels], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over torch eager (higher is better)")
    ax.set_title(f"online_softmax on {info.get('gpu', info.get('cpu', info['device']))}, {info['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=120)
    paths.append(base + ".png")
    return paths


def markdown_table(path, compare_path=None):
    """README table from a results JSON; compare_path adds the speedup column of a second run."""
    with open(path) as f:
        data = json.load(f)
    other = {}
    if compare_path:
        with open(compare_path) as f:
            for r in json.load(f)["results"]:
                other[(r["op"], r["rows"], r["cols"], r["impl"])] = r.get("speedup_vs_torch")
    by_key = {}
    for r in data["results"]:
        by_key.setdefault((r["op"], r["rows"], r["cols"]), {})[r["impl"]] = r
    head = ("| op | rows × cols | online_softmax ms | torch ms | torch.compile ms | speedup vs torch "
            "| GB/s (% of copy) |" + (" speedup, torch with THP |" if compare_path else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (op, rows, cols), impls in by_key.items():
        ours, eager, comp = impls.get("online_softmax"), impls.get("torch"), impls.get("torch.compile")
        cells = [op, f"{rows} × {cols}", f"{ours['time_ms']:.2f}", f"{eager['time_ms']:.2f}",
                 f"{comp['time_ms']:.2f}" if comp else "—", f"{ours['speedup_vs_torch']:.2f}×",
                 f"{ours['gbps']:.1f} ({100 * ours['fraction_of_copy']:.0f}%)"]
        if compare_path:
            sp = other.get((op, rows, cols, "online_softmax"))
            cells.append(f"{sp:.2f}×" if sp else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--ops", default="forward,backward,topk", type=lambda s: s.split(","))
    p.add_argument("--shapes", default=None,
                   type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                   help="comma-separated ROWSxCOLS list")
    p.add_argument("--ks", default=DEFAULT_KS, type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--quick", action="store_true", help="a small sweep (seconds, not minutes)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file name stem for the results")
    args = p.parse_args(argv)
    for op in args.ops:
        if op not in ("forward", "backward", "topk", "beam"):
            p.error(f"--ops: unknown op {op!r} (forward, backward, topk, beam)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "table":  # python -m online_softmax.bench table RESULTS.json [OTHER.json]
        print(markdown_table(*argv[1:3]))
        return None
    if argv and argv[0] == "plans":  # python -m online_softmax.bench plans [h100|h200|a100]
        print_plans(argv[1] if len(argv) > 1 else "h100")
        return None
    if argv and argv[0] == "replot":  # python -m online_softmax.bench replot RESULTS.json
        with open(argv[1]) as f:
            data = json.load(f)
        out_dir, name = os.path.split(argv[1])
        return write_results(data["results"], data["machine"], out_dir, name.rsplit(".", 1)[0])
    args = parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"online_softmax benchmark on {info.get('gpu', info.get('cpu', device))} "
          f"({info['threads']} threads), torch {info['torch']}, {info['date']}", flush=True)
    records = run(args)
    summary = summarize(records)
    print("median speedup of online_softmax over torch eager:",
          ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    tag = args.tag or f"{device.type}_{args.dtype}" + ("_quick" if args.quick else "")
    for path in write_results(records, info, args.out, tag):
        print("wrote", path)
    return records


if __name__ == "__main__":
    main()
