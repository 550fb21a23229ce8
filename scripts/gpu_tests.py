"""The tests a GPU run selects, and every test it leaves out with the reason, from one pytest collection.

    python scripts/gpu_tests.py [--ids FILE] [--json FILE] [PATH ...]      (default PATH: tests)

Selected: the tests marked `cuda` (tests/conftest.py marks the cuda cases of the device-parameterized
tests, GPU-only tests and tests that take another path with a GPU). Left out, each with its reason:
tests/packaging (no GPU needed; building the sdist into a wheel would compile the CUDA kernels a second
time), tests skipped unconditionally (among them those whose installed package is older than the
version they are written against: `needs_version`), modules that cannot be collected on this
machine, and the CPU-only tests (CI runs them). It computes the same on a CPU machine and on the
GPU machine, so `scripts/gpu_check.sh --plan` rehearses the GPU run's selection in CI
(ONLINE_SOFTMAX_PRETEND_VERSIONS=transformers=5.17.0 stands in for another machine's packages).

Prints the selection by file and the left-out groups; --ids writes the selected node ids, one a line;
--json writes both as JSON.
"""

import argparse
import collections
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = "tests/packaging/"
PACKAGING_REASON = ("packaging tests need no GPU, and the sdist -> wheel test would compile the CUDA kernels "
                    "a second time (CI runs them)")


class _Recorder:
    def __init__(self):
        self.items, self.errors = [], {}

    def pytest_collectreport(self, report):
        if report.failed:
            lines = str(report.longrepr).strip().splitlines()
            error = next((l.strip() for l in reversed(lines) if l.startswith("E ")), lines[-1])
            self.errors[report.nodeid] = error[:200]

    def pytest_collection_finish(self, session):
        self.items = list(session.items)


def classify(paths):
    """{'selected': [node ids], 'left_out': [{'where', 'count', 'reason', 'node_ids'}], 'errors': {...}}."""
    recorder = _Recorder()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", *paths]
    with contextlib.redirect_stdout(io.StringIO()):
        code = pytest.main(args, plugins=[recorder])
    if code not in (0, 1, 5) and not recorder.items:
        raise SystemExit(f"gpu_tests: pytest could not collect {paths} (exit {code})")
    selected, groups, cpu_only = [], collections.OrderedDict(), {}

    def leave_out(where, reason, nodeid):
        groups.setdefault((where, reason), []).append(nodeid)

    for item in recorder.items:
        path = item.nodeid.split("::", 1)[0]
        # An unconditional skip: the needs_version skip of tests/conftest.py, or one a test carries.
        skip = next(item.iter_markers("skip"), None)
        if path.startswith(PACKAGING):
            leave_out(PACKAGING.rstrip("/"), PACKAGING_REASON, item.nodeid)
        elif item.get_closest_marker("cuda") is None:
            cpu_only.setdefault(path, []).append(item.nodeid)
        elif skip is not None:
            leave_out(path, skip.kwargs.get("reason", skip.args[0] if skip.args else "skipped"), item.nodeid)
        else:
            selected.append(item.nodeid)
    files_selected = {n.split("::", 1)[0] for n in selected}
    for path, ids in cpu_only.items():
        reason = "its CPU cases (CI runs them)" if path in files_selected else "no CUDA case (CI runs them)"
        for nodeid in ids:
            leave_out(path, reason, nodeid)
    for nodeid, error in recorder.errors.items():
        leave_out(nodeid, f"cannot be collected here: {error}", nodeid)
    left_out = [{"where": where, "count": len(ids), "reason": reason, "node_ids": ids}
                for (where, reason), ids in groups.items()]
    return {"selected": selected, "left_out": left_out, "errors": recorder.errors}


def report(result):
    by_file = collections.Counter(n.split("::", 1)[0] for n in result["selected"])
    lines = [f"selected: {len(result['selected'])} tests marked cuda, in {len(by_file)} files"]
    lines += [f"  {path}: {count}" for path, count in sorted(by_file.items())]
    lines.append(f"left out: {sum(g['count'] for g in result['left_out'])} tests")
    lines += [f"  {g['where']} ({g['count']}): {g['reason']}" for g in result["left_out"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=["tests"])
    p.add_argument("--ids", help="write the selected node ids here, one a line")
    p.add_argument("--json", help="write the selection and the left-out groups here")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))  # the checkout's package, built in place, where none is installed
    result = classify(args.paths)
    if args.ids:
        Path(args.ids).write_text("".join(n + "\n" for n in result["selected"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(report(result))
    return 0 if result["selected"] else 1


if __name__ == "__main__":
    sys.exit(main())
