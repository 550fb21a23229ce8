"""Which online_softmax ops the GPU check's selected tests call on CUDA, rehearsed without a GPU.

    python scripts/gpu_op_coverage.py --ids FILE [--json OUT] [--all]

FILE holds the selected node ids (`scripts/gpu_tests.py --ids`, or the node ids `gpu_check.sh --plan`
prints). The ops that run on CUDA are read from the sources: the ones csrc/cuda/register.cpp registers
for CUDA and the composites registered for CompositeExplicitAutograd (beam_search_step and the like run
them on CUDA); where the build has CUDA kernels the registry must agree.

A cuda case cannot run here, but a device-parameterized one has a cpu twin (the same test, the same
parameters, "cpu" for "cuda"), which runs the same body with the device replaced. So the twin of each
test function's first selected cuda case runs here under the profiler, which notes every
online_softmax op it reaches through the dispatcher (autograd's backward ops, composites and
torch.compile's graphs included): the ops that cuda case calls on the GPU. The rule, a failure when
broken (exit 1): every op that runs on CUDA is called on CUDA by a selected test of its own.
tests/ops/test_registration.py's opcheck of every op (CATCH_ALL) does not count: it calls every op
once, so with it nothing could be missing.

For speed (CI, 2 cores): the twins run one file after another in turns (each file's first function,
then each file's second, ...), each call is cut after CAP_S seconds (the ops it reached until then
count), the 2**31-element row is skipped (ONLINE_SOFTMAX_SKIP_HUGE=1), and the run stops once every
op is called (--all runs every twin). What it cannot see: the GPU-only tests (no cpu twin; they only
add coverage), a body's branches on `device == "cuda"`, an op the cuda body calls only on a CPU
tensor, and ops only other parameters of a function reach.
"""

import argparse
import collections
import contextlib
import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "online_softmax"
COMPOSITE_KEYS = ("CompositeExplicitAutograd", "CompositeImplicitAutograd")
CATCH_ALL = ("tests/ops/test_registration.py",)
CAP_S = 1.5


def cuda_ops(root=ROOT):
    """{op: [dispatch keys]}: the ops that run on CUDA, from their registrations in csrc (CUDA, or a
    composite key)."""
    block = re.compile(r"TORCH_LIBRARY_IMPL\(\s*" + NAMESPACE + r"\s*,\s*(\w+)\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", re.S)
    ops = collections.defaultdict(set)
    for path in sorted((root / "csrc").rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".cc"):
            continue
        for key, body in block.findall(path.read_text()):
            if key == "CUDA" or key in COMPOSITE_KEYS:
                for name in re.findall(r'm\.impl\(\s*"(\w+)"', body):
                    ops[name].add(key)
    return {name: sorted(keys) for name, keys in sorted(ops.items())}


def registry_check(ops):
    """Where the registry can say, it must agree with the sources: the composites everywhere, the CUDA
    kernels on a build that has them. Returns the disagreements."""
    import torch

    import online_softmax

    names = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
                    if s.name.startswith(NAMESPACE + "::")})
    keys = list(COMPOSITE_KEYS) + (["CUDA"] if online_softmax.build_info()["cuda"] else [])
    problems = []
    for name in names:
        for key in keys:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)
            said = key in ops.get(name, ())
            if has != said:
                problems.append(f"{name}: the registry {'has' if has else 'has no'} {key} kernel, "
                                f"the sources {'do not register' if has else 'register'} one")
    return problems


def _is_cuda(value):
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def _base(nodeid):
    return nodeid.split("[", 1)[0]


def twin_of(item):
    """The node id of a cuda case's cpu twin (its parameter ids with "cpu" for "cuda"), or None."""
    spec = getattr(item, "callspec", None)
    if spec is None or not any(_is_cuda(v) for v in spec.params.values()):
        return None
    function, ids = item.nodeid[:-1].split("[", 1)
    return function + "[" + "-".join("cpu" if part == "cuda" else part for part in ids.split("-")) + "]"


class _Recorder:
    """Runs the cpu twin of each function's first selected cuda case under the profiler."""

    def __init__(self, selected, ops, run_all):
        self.selected, self.wanted, self.run_all = set(selected), set(ops), run_all
        self.plan = {}      # twin nodeid -> {"function", "file", "stands_for": the cuda nodeid}
        self.ops = {}       # twin nodeid -> sorted op names
        self.outcome = {}   # twin nodeid -> passed / failed / skipped
        self.seconds = {}   # twin nodeid -> seconds (setup, call, teardown)
        self.no_twin = []   # selected cuda node ids with no cpu twin (GPU-only tests)
        self.stopped_early = False

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        by_id = {item.nodeid: item for item in items}
        turns = collections.defaultdict(list)  # file -> its functions' twins, in order
        for item in items:
            function, path = _base(item.nodeid), item.nodeid.split("::", 1)[0]
            if item.nodeid not in self.selected or path in CATCH_ALL or any(
                    p["function"] == function for p in self.plan.values()):
                continue
            twin = by_id.get(twin_of(item))
            if twin is None:
                self.no_twin.append(item.nodeid)
                continue
            self.plan[twin.nodeid] = {"function": function, "file": path, "stands_for": item.nodeid}
            turns[path].append(twin)
        chosen, depth = [], max((len(v) for v in turns.values()), default=0)
        for i in range(depth):
            chosen += [twins[i] for twins in turns.values() if i < len(twins)]
        keep = {id(item) for item in chosen}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in keep])
        items[:] = chosen

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        import torch

        t0 = time.perf_counter()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with contextlib.redirect_stdout(io.StringIO()):
            prof.start()
        try:
            yield
        finally:
            with contextlib.redirect_stdout(io.StringIO()):
                prof.stop()
            self.seconds[item.nodeid] = round(time.perf_counter() - t0, 2)
            self.ops[item.nodeid] = sorted({e.name.split("::", 1)[1].split(".", 1)[0] for e in prof.events()
                                            if e.name.startswith(NAMESPACE + "::")})
            covered = set().union(*self.ops.values())
            if not self.run_all and self.wanted <= covered:
                self.stopped_early = True
                item.session.shouldstop = "every op that runs on CUDA is called"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        """Cut the call after CAP_S seconds of the process's CPU time (not wall time: other work on the
        machine does not cut it sooner), at the next Python line; what it called so far counts."""
        def cut(signum, frame):
            raise _Cut(f"cut after {CAP_S} s")

        old = signal.signal(signal.SIGVTALRM, cut)
        signal.setitimer(signal.ITIMER_VIRTUAL, CAP_S)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGVTALRM, old)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            cut = report.longrepr is not None and "_Cut" in str(report.longrepr)
            self.outcome.setdefault(report.nodeid, "cut" if cut else report.outcome)


class _Cut(BaseException):
    """Raised into a test that ran CAP_S seconds (BaseException: no `except Exception` swallows it)."""


def measure(ids, run_all=False):
    """Run the recording pass; returns the report as a dict (see main)."""
    ops = cuda_ops()
    recorder = _Recorder(ids, ops, run_all)
    files = sorted({i.split("::", 1)[0] for i in ids})
    os.environ["ONLINE_SOFTMAX_SKIP_HUGE"] = "1"
    t0 = time.perf_counter()
    args = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", *files]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = pytest.main(args, plugins=[recorder])
    if not recorder.plan:
        raise SystemExit(f"gpu_op_coverage: nothing ran (pytest exit {code}):\n{out.getvalue()[-3000:]}")
    on_cuda = collections.defaultdict(list)       # op -> cuda node ids that call it
    for run, info in recorder.plan.items():
        for o in recorder.ops.get(run, []):
            if o in ops:
                on_cuda[o].append(info["stands_for"])
    return {
        "ops": ops,
        "registry_problems": registry_check(ops),
        "on_cuda": {o: sorted(v) for o, v in sorted(on_cuda.items())},
        "missing": sorted(o for o in ops if o not in on_cuda),
        "runs": [dict(info, run=run, ops=recorder.ops[run], seconds=recorder.seconds.get(run),
                      outcome=recorder.outcome.get(run)) for run, info in recorder.plan.items() if run in recorder.ops],
        "not_run": sorted(run for run in recorder.plan if run not in recorder.ops),
        "no_twin": recorder.no_twin,
        "stopped_early": recorder.stopped_early,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def report(result):
    ops, on_cuda, runs = result["ops"], result["on_cuda"], result["runs"]
    lines = [f"ops that run on CUDA: {len(ops)} ({', '.join(sorted(ops))})",
             f"ran the cpu twins of {len(runs)} selected cuda cases (one a test function) in {result['seconds']} s"
             + (f", then stopped: every op called ({len(result['not_run'])} not run)" if result["stopped_early"] else "")
             + f"; {len(result['no_twin'])} selected GPU-only tests not recorded; {', '.join(CATCH_ALL)} not counted"]
    for o in sorted(ops):
        cases = on_cuda.get(o, [])
        files = sorted({c.split("::", 1)[0] for c in cases})
        lines.append(f"  {o} ({'/'.join(ops[o])}): {len(cases)} test functions"
                     + (f" in {', '.join(files)}" if files else ": NONE"))
    for what in ("failed", "cut"):
        names = [r["run"] for r in runs if r["outcome"] == what]
        if names:
            lines.append(f"{what} while recorded ({len(names)}): " + ", ".join(names[:10]))
    for p in result["registry_problems"]:
        lines.append(f"registry: {p}")
    if result["missing"]:
        lines.append("never called on CUDA by a selected test of its own: " + ", ".join(result["missing"]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", required=True, help="the selected node ids, one a line")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--all", action="store_true", help="run every function's twin (no early stop)")
    args = p.parse_args(argv)
    ids = [line.strip() for line in Path(args.ids).read_text().splitlines() if line.strip()]
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    result = measure(ids, args.all)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(report(result))
    bad = result["missing"] or result["registry_problems"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
