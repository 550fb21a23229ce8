"""scripts/gpu_check.sh rehearsed without a GPU: its first call fits the time a GPU is lent for, its test
selection holds every test file with a CUDA case and leaves the rest out with reasons, every test file
has a CUDA case or a stated reason, every op that runs on CUDA is called on CUDA by a selected test
(scripts/gpu_op_coverage.py), a test written against a newer package than the machine has is left
out, and scripts/gpu_results.py turns a run's files into the README's GPU table. The run's files here
are fabricated test data, not results."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_CALL = ["env", "build", "select", "tests", "memcheck", "racecheck", "bench"]
LIMITS_SUM_S = 540   # the phases' limits together: a lent GPU's call is killed at 600 s
WALL_BUDGET_S = 480  # the first call's own deadline
MAX_FILES = 8        # what a lent machine brings back from its output folder
# A test file has a CUDA case if a test takes the device fixture, is GPU-only, passes "cuda" or asks
# whether a GPU is there.
CUDA_CASE = re.compile(r"def test_\w+\([^)]*\bdevice\b|@needs_cuda|mark\.cuda\b|torch\.cuda\.is_available\(\)"
                       r"|[\"']cuda(:\d+)?[\"']")


def plan_of(*args, env=None):
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--plan", *args], cwd=ROOT, text=True,
                          capture_output=True, env=dict(os.environ, **(env or {})), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, time.perf_counter() - t0


@pytest.fixture(scope="module")
def plan():
    return plan_of()[0]


def limits(out):
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^phase (\S+) +(\d+) s ", out, re.M)}


def node_ids(out):
    return out.split("\nnode ids:\n", 1)[1].splitlines()


def test_first_call_fits_the_lease(plan):
    phases = limits(plan)
    assert list(phases) == FIRST_CALL
    assert sum(phases.values()) <= LIMITS_SUM_S, phases
    assert f"sum of limits: {sum(phases.values())} s" in plan
    assert f"wall budget {WALL_BUDGET_S} s" in plan
    files = re.search(r"^files in OUT_DIR \((\d+)\): (.*)$", plan, re.M)
    assert int(files.group(1)) == len(files.group(2).split()) <= MAX_FILES
    assert "summary.txt" in files.group(2) and "cuda_float32_check.json" in files.group(2)


def test_second_call_and_every_phase_have_limits():
    out, seconds = plan_of("second", env={"GPU_CHECK_BUDGET_S": "240"})
    assert list(limits(out)) == ["env", "build", "ncu", "bench-full"]
    assert "wall budget 240 s" in out and seconds < 10  # no test selection: nothing collected
    assert int(re.search(r"^files in OUT_DIR \((\d+)\)", out, re.M).group(1)) <= MAX_FILES
    out, _ = plan_of("build,sanitize,bench-compile")
    assert list(limits(out)) == ["build", "memcheck", "racecheck", "bench-compile"]


def test_unknown_phase_is_refused():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--plan", "build,benchh"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown phase 'benchh'" in proc.stderr


def test_selection_holds_every_test_file_with_a_cuda_case(plan):
    ids = node_ids(plan)
    assert ids and len(ids) == len(set(ids))
    assert not [i for i in ids if i != i.strip() or " " in i], "node ids with spaces (one a line in the plan)"
    selected_files = {i.split("::", 1)[0] for i in ids}
    with_cuda = {p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "tests").rglob("test_*.py"))
                 if CUDA_CASE.search(p.read_text()) and "packaging" not in p.parts}
    assert with_cuda and with_cuda <= selected_files, with_cuda - selected_files
    assert f"selected: {len(ids)} tests marked cuda, in {len(selected_files)} files" in plan
    # Only the cuda cases: no cpu parameter, nothing from the packaging tests.
    assert not [i for i in ids if re.search(r"[\[-]cpu[\]-]", i) or i.startswith("tests/packaging/")]
    # The GPU-only tests, which have no device parameter, are in by their skipif.
    source = (ROOT / "tests" / "ops" / "test_cuda.py").read_text()
    gpu_only = re.findall(r"^@needs_cuda\n(?:@.*\n)*def (test_\w+)", source, re.M)
    assert gpu_only
    for name in gpu_only:
        assert any(i.split("[", 1)[0] == f"tests/ops/test_cuda.py::{name}" for i in ids), name


# Test files with no CUDA case, each with the reason. Every other test file must have a selected one.
NO_CUDA_CASE = {
    "tests/kernels/": "the CUDA kernel sources executed by the host runtime, and cuda_plan: CPU by design",
    "tests/distributed/": "several ranks over Gloo on the CPU; the lent machine has one GPU",
    "tests/ops/test_cpu_dispatch.py": "the CPU kernels' ISA dispatch (DEFAULT/AVX2/AVX512)",
    "tests/ops/test_thread_invariance.py": "the CPU kernels' bits across thread counts and batches",
    "tests/ops/test_reference.py": "the textbook references in plain PyTorch; calls no online_softmax op",
    "tests/ops/test_argument_errors.py": "argument checks on CPU tensors; not yet run on CUDA tensors",
}
# Files whose CUDA cases are being written: excused until they have one, then this entry must go.
PENDING = {}


def _reason(path, table):
    return next((reason for prefix, reason in table.items() if path == prefix or path.startswith(prefix)
                 and prefix.endswith("/")), None)


def test_every_test_file_has_a_cuda_case_or_a_reason(plan):
    selected_files = {i.split("::", 1)[0] for i in node_ids(plan)}
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py") if "packaging" not in p.parts}
    without = sorted(f for f in files - selected_files if not _reason(f, NO_CUDA_CASE) and not _reason(f, PENDING))
    assert not without, f"test files with no selected cuda case and no reason in NO_CUDA_CASE: {without}"
    done = sorted(f for f in files & selected_files if _reason(f, PENDING))
    assert not done, f"these have selected cuda cases now: take them out of PENDING: {done}"
    stale = [k for k in {**NO_CUDA_CASE, **PENDING} if not any(f == k or f.startswith(k) for f in files)]
    assert not stale, f"entries that name no test file: {stale}"


def coverage_of(ids, tmp_path, *args):
    (tmp_path / "ids.txt").write_text("".join(i + "\n" for i in ids))
    out = tmp_path / "coverage.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_op_coverage.py"), "--ids",
                           str(tmp_path / "ids.txt"), "--json", str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def registered_for_cuda():
    """The op names csrc/cuda/register.cpp registers for CUDA, read here on their own."""
    body = (ROOT / "csrc" / "cuda" / "register.cpp").read_text().split("TORCH_LIBRARY_IMPL(online_softmax, CUDA", 1)[1]
    return set(re.findall(r'm\.impl\("(\w+)"', body.split("\n}", 1)[0]))


def test_every_op_that_runs_on_cuda_is_called_on_cuda_by_a_selected_test(plan, tmp_path):
    """scripts/gpu_op_coverage.py: each selected cuda case's cpu twin runs under the profiler; every op
    with a CUDA kernel or a composite must be reached by one (tests/ops/test_registration.py's opcheck
    of every op not counted)."""
    proc, result = coverage_of(node_ids(plan), tmp_path)
    cuda = registered_for_cuda()
    assert len(cuda) >= 10 and {"masked_forward", "cross_entropy_backward", "cross_entropy_backward_"} <= cuda
    assert cuda <= set(result["ops"]) and {"beam_search_step", "beam_search_advance"} <= set(result["ops"])
    assert not result["registry_problems"], result["registry_problems"]
    assert proc.returncode == 0 and not result["missing"], proc.stdout[-3000:] + proc.stderr[-2000:]
    assert all(result["on_cuda"][op] for op in result["ops"])
    # The counted tests are twins of selected cuda cases, none from the catch-all file.
    selected = set(node_ids(plan))
    assert all(case in selected and not case.startswith("tests/ops/test_registration.py")
               for cases in result["on_cuda"].values() for case in cases)


def test_op_coverage_fails_where_an_op_has_no_cuda_case(plan, tmp_path):
    """The check cannot pass by itself: a selection without masked_forward's cuda cases (here, two
    files' and the opcheck of every op, which calls masked_forward on CUDA but is not counted) fails,
    naming it."""
    ids = [i for i in node_ids(plan) if i.startswith(("tests/ops/test_stats.py", "tests/ops/test_registration.py"))]
    assert any(i.startswith("tests/ops/test_registration.py::test_opcheck_every_op") for i in ids)
    proc, result = coverage_of(ids, tmp_path)
    assert proc.returncode == 1
    assert {"masked_forward", "cross_entropy_backward", "beam_search_advance"} <= set(result["missing"])
    assert "never called on CUDA by a selected test of its own: " in proc.stdout and "masked_forward" in proc.stdout
    assert result["on_cuda"].get("stats"), "the twins of test_stats.py's cuda cases ran and were recorded"


def test_every_test_left_out_has_a_reason(plan):
    section = plan.split("\nleft out: ", 1)[1].split("\nnode ids:\n", 1)[0]
    groups = re.findall(r"^  (\S+) \((\d+)\): (.+)$", section, re.M)
    assert groups and len(groups) == len(section.strip().splitlines()) - 1
    assert any(where == "tests/packaging" and "compile the CUDA kernels a second time" in reason
               for where, _, reason in groups)
    assert int(section.split(" ", 1)[0]) == sum(int(n) for _, n, _ in groups)


@pytest.fixture(scope="module")
def fake_suite(tmp_path_factory):
    """A copy of the suite's conftest with one module written against transformers (fabricated)."""
    tests = tmp_path_factory.mktemp("suite") / "tests"
    tests.mkdir()
    for name in ("conftest.py", "testlib.py"):
        shutil.copy(ROOT / "tests" / name, tests / name)
    (tests / "test_uses_transformers.py").write_text(
        "import pytest\ntransformers = pytest.importorskip('transformers')\n\n\n"
        "def test_step(device):\n    pass\n")
    (tests / "test_plain.py").write_text("def test_step(device):\n    pass\n")
    # The copied conftest reads the test extra's pins from the pyproject.toml above it.
    shutil.copy(ROOT / "pyproject.toml", tests.parent / "pyproject.toml")
    return tests


def select(paths, env=None):
    pytest.importorskip("transformers")
    out = Path(paths[0]).parent / "selection.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_tests.py"), "--json", str(out), *paths],
                          capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_an_older_package_leaves_its_cuda_cases_out_with_the_reason(fake_suite):
    have = select([str(fake_suite)])
    assert sorted(i.split("/")[-1] for i in have["selected"]) == ["test_plain.py::test_step[cuda]",
                                                                 "test_uses_transformers.py::test_step[cuda]"]
    older = select([str(fake_suite)], env={"ONLINE_SOFTMAX_PRETEND_VERSIONS": "transformers=5.17.0"})
    assert [i.split("/")[-1] for i in older["selected"]] == ["test_plain.py::test_step[cuda]"]
    uses = [i for i in have["selected"] if "uses_transformers" in i]
    reasons = [g for g in older["left_out"] if g["node_ids"] == uses]
    assert reasons and re.search(r"written against transformers \S+ .*this machine has 5\.17\.0", reasons[0]["reason"])


# ---- scripts/gpu_results.py, on fabricated files ----

FABRICATED_SUMMARY = """\
gpu_check 2000-01-02T03:04:05Z commit 0000000fake0 source {digest}
plan: gpu_check plan: phases env build select tests; wall budget 480 s
phase env: pass, exit 0, 4 s (limit 20 s)
machine: FABRICATED GPU, 1 SMs, cc 9.0, 1 GiB, L2 1 MiB; torch 0.0 (CUDA 0.0); Python 3.12.0; 16 cores
phase build: pass, exit 0, 11 s (limit 200 s)
phase select: pass, exit 0, 3 s (limit 25 s)
selected: 3 tests marked cuda, in 1 files
phase tests: FAIL, exit 1, 7 s (limit 140 s)
tests: ==== 1 failed, 2 passed in 6.00s ====
FAILED tests/ops/test_fake.py::test_fake[cuda] - AssertionError: fabricated
phase memcheck: pass, exit 0, 9 s (limit 50 s)
memcheck: ========= ERROR SUMMARY: 0 errors
phase racecheck: skipped, 10 s left of the 480 s budget
done: 475 s of the 480 s budget, exit 1
"""


def fabricated_bench():
    common = {"rows": 8, "cols": 1024, "dtype": "float32", "device": "cuda", "bytes": 65536, "copy_gbps": 100.0,
              "copy_into_gbps": 100.0}
    return {"machine": {"date": "2000-01-02 03:04 UTC", "gpu": "FABRICATED GPU", "device": "cuda"},
            "summary_median_speedup": {"softmax": 2.0},
            "results": [dict(common, op="softmax", impl="online_softmax", time_ms=0.5, gbps=50.0,
                             speedup_vs_torch=2.0, fraction_of_copy=0.5, time_over_model=1.5),
                        dict(common, op="softmax", impl="torch", time_ms=1.0, gbps=25.0,
                             speedup_vs_torch=1.0, fraction_of_copy=0.25)]}


def test_results_become_the_readme_table(tmp_path):
    root = tmp_path / "checkout"
    for d in ("csrc", "online_softmax", "scripts", "tests"):
        (root / d).mkdir(parents=True)
    (root / "setup.py").write_text("# fabricated\n")
    (root / "README.md").write_text("# x\n\n<!-- gpu-results:start -->\nno run yet\n<!-- gpu-results:end -->\n\nrest\n")
    script = [sys.executable, str(ROOT / "scripts" / "gpu_results.py")]
    digest = subprocess.run(script + ["--digest", "--root", str(root)], capture_output=True, text=True,
                            check=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.txt").write_text(FABRICATED_SUMMARY.format(digest=digest))
    (out / "cuda_float32_check.json").write_text(json.dumps(fabricated_bench()))
    proc = subprocess.run(script + [str(out), "--write", "--root", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    readme = (root / "README.md").read_text()
    assert readme.startswith("# x\n\n<!-- gpu-results:start -->\nGPU check of 2000-01-02, commit `0000000fake0` "
                             "(the sources of this checkout): FABRICATED GPU")
    assert readme.endswith("<!-- gpu-results:end -->\n\nrest\n") and "no run yet" not in readme
    assert "| tests | FAIL | 7 (140) |" in readme
    assert "| racecheck | skipped, 10 s left of the 480 s budget | — |" in readme
    assert "Tests: 1 failed, 2 passed in 6.00s." in readme and "memcheck: ERROR SUMMARY: 0 errors." in readme
    assert "| softmax | 8 × 1024 | 0.500 | 1.000 | 2.00× | 50 (50%) | 1.50 |" in readme
    results = root / "benchmarks" / "results"
    assert (results / "gpu_check_2000-01-02.txt").read_text() == FABRICATED_SUMMARY.format(digest=digest)
    machine = json.loads((results / "cuda_float32_check.json").read_text())["machine"]
    assert machine["commit"] == "0000000fake0" and machine["source_digest"] == digest
    # Sources that changed since the run are named as such.
    (root / "setup.py").write_text("# changed\n")
    proc = subprocess.run(script + [str(out), "--root", str(root)], capture_output=True, text=True)
    assert f"sources that differ from this checkout's ({digest})" in proc.stdout and "differ" in proc.stderr
