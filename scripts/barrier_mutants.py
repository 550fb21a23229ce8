"""Removes each __syncthreads() of csrc/kernels, one at a time, in a scratch copy of the checkout,
and runs the host-executed kernel tests (tests/kernels/test_kernels_host.py) on each mutant.

A removal the tests catch shows the host runtime's schedules expose that missing barrier; one they
do not catch is either redundant or a gap to close (a GPU may still fail on it: the host runtime
does not model the GPU memory model). Usage:

    python scripts/barrier_mutants.py [--schedules in_order,reversed,random:1] [--only FILE] [--out FILE]

Takes a few minutes per barrier on a 2-core machine (one kernel file rebuilds per mutant).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BARRIER = re.compile(r"__syncthreads\(\);")


def scratch_copy(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def barriers(root, only):
    """(path, line index) of every barrier; `only` keeps one file ("softmax_topk.cu") or one line
    ("softmax_topk.cu:54"), comma-separated."""
    wanted = [w.partition(":") for w in only.split(",") if w]
    found = []
    for path in sorted((root / "csrc" / "kernels").glob("*.cu*")):
        for i, line in enumerate(path.read_text().splitlines()):
            if not BARRIER.search(line) or line.strip().startswith("//"):
                continue
            if wanted and not any(name == path.name and (not ln or int(ln) == i + 1) for name, _, ln in wanted):
                continue
            found.append((path, i))
    return found


def enclosing_function(lines, i):
    """The kernel or device function a line sits in (the nearest definition above it)."""
    for j in range(i, -1, -1):
        kernel = re.match(r"\s*(\w+_kernel)\(", lines[j])  # the name line under __launch_bounds__
        if kernel:
            return kernel.group(1)
        if "__device__" in lines[j]:
            names = re.findall(r"(\w+)\s*\(", lines[j])
            if names:
                return names[-1]
    return "?"


def run_tests(root, schedule):
    env = dict(os.environ, ONLINE_SOFTMAX_HOST_SCHEDULE=schedule, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "tests/kernels/test_kernels_host.py", "-k", "not sanitizers and not runtime"],
                          cwd=root, env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    failed = re.search(r"^FAILED (\S+)", proc.stdout, re.M)
    return proc.returncode, tail, failed.group(1) if failed else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="in_order,reversed,random:1")
    ap.add_argument("--only", default="", help="files or file:line, e.g. online_state.cuh,softmax_topk.cu:54")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args()
    schedules = args.schedules.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scratch_copy(root)
        rc, tail, _ = run_tests(root, schedules[0])
        if rc != 0:
            sys.exit(f"the unmutated tests fail: {tail}")
        for path, i in barriers(root, args.only):
            original = path.read_text()
            lines = original.splitlines(keepends=True)
            where = f"{path.name}:{i + 1}"
            func = enclosing_function([ln.rstrip("\n") for ln in lines], i)
            lines[i] = BARRIER.sub("/* barrier removed */;", lines[i], count=1)
            path.write_text("".join(lines))
            verdict, detail = "NOT CAUGHT", ""
            t0 = time.time()
            try:
                for schedule in schedules:
                    rc, tail, failed = run_tests(root, schedule)
                    if rc == 1:  # a test failed
                        verdict, detail = f"caught ({schedule})", failed
                        break
                    if rc != 0:
                        verdict, detail = f"error rc={rc}", tail
                        break
            finally:
                path.write_text(original)
            row = f"| {where} | {func} | {verdict} | {detail} | {time.time() - t0:.0f} s |"
            print(row, flush=True)
            rows.append(row)
    table = "| barrier | in | verdict | first failing test | time |\n|---|---|---|---|---|\n" + "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
