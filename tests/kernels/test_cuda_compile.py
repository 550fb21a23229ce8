"""Compiles every CUDA kernel in csrc/kernels with nvcc for sm_80 and sm_90, on any machine.

csrc/kernels is framework-free (no torch header; checked here with or without nvcc), so this needs
only nvcc, not a GPU or a CUDA build of torch. It fails on a compile error, and on a register spill or a local-memory stack frame in a
hot kernel: every float32 / float16 / bfloat16 instantiation. float64 kernels are reported, not
gated: some carry a few bytes of stack around the double-precision division and exp subroutines,
and float64 softmax is a correctness path, not a speed path.
"""

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/kernels/ -> the repository
KERNEL_DIR = ROOT / "csrc" / "kernels"
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHS = ["80", "90"]


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = find_nvcc()
# Only the compiling tests need nvcc; the source checks run everywhere.
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): "
                                "the CUDA kernels cannot be compile-checked on this machine")

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
PROPS = re.compile(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                   r"(\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def compile_one(source, arch):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, "-std=c++17", "-O3", "-lineinfo", f"-I{ROOT / 'csrc'}",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", str(source),
               "-o", os.path.join(tmp, "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reports():
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda job: compile_one(*job), jobs))
    return {(src.name, arch): result for (src, arch), result in zip(jobs, results)}


def kernel_resources(log):
    """{mangled kernel name: (stack bytes, spill store bytes, spill load bytes)} from ptxas -v."""
    return {m.group(1): tuple(int(v) for v in m.groups()[1:]) for m in PROPS.finditer(log)}


def is_float64_kernel(mangled):
    # Every kernel's name ends in "kernel"; its first template argument is the element type
    # (Itanium mangling: 'I' opens the template arguments, 'd' is double).
    return re.search(r"kernelId", mangled) is not None


def test_kernel_sources_exist():
    names = {s.name for s in SOURCES}
    assert {"softmax_forward.cu", "softmax_backward.cu", "softmax_topk.cu"} <= names


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_kernels_are_framework_free(source):
    """No torch/ATen/c10 header anywhere under csrc/kernels: nvcc alone must compile them."""
    for path in [KERNEL_DIR / source] + sorted(KERNEL_DIR.glob("*.cuh")) + sorted(KERNEL_DIR.glob("*.h")):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        bad = [inc for inc in includes if inc.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not bad, f"{path.name} includes {bad}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_compiles_without_spills(reports, source, arch):
    rc, log = reports[(source, arch)]
    assert rc == 0, f"nvcc failed for {source} on sm_{arch}:\n{log[-4000:]}"
    entries = [m.group(1) for m in ENTRY.finditer(log) if m.group(2) == arch]
    assert entries, f"no kernels compiled from {source} for sm_{arch}"
    resources = kernel_resources(log)
    assert set(entries) <= set(resources), "ptxas -v reported no resource line for some kernels"
    hot_bad = {name: res for name, res in resources.items() if any(res) and not is_float64_kernel(name)}
    assert not hot_bad, (
        f"{source} sm_{arch}: hot kernels with a stack frame or register spills "
        f"(stack, spill stores, spill loads): {hot_bad}")
    assert all(int(r) <= 255 for r in USED.findall(log))


@needs_nvcc
def test_float64_kernels_are_compiled_too(reports):
    """The float64 instantiations exist (they are reported, not gated, for spills)."""
    names = [name for (_, _), (_, log) in reports.items() for name in kernel_resources(log)]
    assert any(is_float64_kernel(n) for n in names)
    assert any(not is_float64_kernel(n) for n in names)
