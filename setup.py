"""Build script for the online_softmax extension.

Install with `pip install --no-build-isolation -e .` (torch must already be installed; it is never
pulled into an isolated build environment).

Environment variables:
  USE_CUDA=0                      build the CPU extension only, even where CUDA is available.
  FORCE_CUDA=1                    build the CUDA sources even without a visible GPU (needs nvcc and a
                                  CUDA build of torch).
  TORCH_CUDA_ARCH_LIST            CUDA architectures; defaults to "8.0;9.0" when no GPU is visible.
  ONLINE_SOFTMAX_CPU_CAPABILITY   avx512 | avx2 | default: the vector ISA the CPU kernels are compiled
                                  for. Defaults to avx2 when this machine has AVX2+FMA, else default.
  ONLINE_SOFTMAX_DEBUG=1          -O0 -g build.
  ONLINE_SOFTMAX_PTXAS_VERBOSE=1  print ptxas's per-kernel resource report while building CUDA.
  CUDA_HOME                       the CUDA toolkit; found from nvcc when unset (also when nvcc on PATH is
                                  a wrapper script outside the toolkit).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup


def _has_cuda_headers(home):
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _toolkit_of_nvcc(nvcc):
    """The toolkit folder of an nvcc, asked of nvcc itself: nvcc on PATH may be a wrapper script
    outside the toolkit (/usr/local/bin/nvcc here), from which torch would guess CUDA_HOME=/usr/local."""
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_cuda_headers(real):
        return real
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            open(src, "w").close()
            out = subprocess.run([nvcc, "-dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    home = os.path.dirname(match.group(1).strip()) if match else None
    return home if _has_cuda_headers(home) else None


def _resolve_cuda_home():
    """Sets CUDA_HOME (before torch.utils.cpp_extension reads it) when the user has not, and the
    toolkit can be found: next to the real nvcc, or where a wrapper nvcc runs it from."""
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if not _has_cuda_headers(home) and os.environ.get("FORCE_CUDA", "").strip().lower() in ("1", "true", "yes", "on"):
                sys.exit(f"online_softmax: {var}={home} has no include/cuda_runtime.h; set it to the CUDA toolkit's "
                         "folder (the one holding bin/nvcc and include/)")
            return
    nvcc = shutil.which("nvcc")
    home = _toolkit_of_nvcc(nvcc) if nvcc else None
    if home is None and _has_cuda_headers("/usr/local/cuda"):
        home = "/usr/local/cuda"
    if home is not None:
        os.environ["CUDA_HOME"] = home


_resolve_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised by hand on a machine without torch
    sys.exit(
        "online_softmax: PyTorch is not installed in this Python environment.\n"
        "Install it first (for example `pip install torch==2.13.0`), then build this package with\n"
        "`pip install --no-build-isolation -e .` so it compiles against that torch."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_capability() -> str:
    """The vector ISA to compile the CPU kernels for (ATen's CPU_CAPABILITY naming)."""
    requested = os.environ.get("ONLINE_SOFTMAX_CPU_CAPABILITY", "").strip().lower()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    flags = _cpu_flags()
    if requested:
        if requested not in ("avx512", "avx2", "default"):
            sys.exit(f"online_softmax: ONLINE_SOFTMAX_CPU_CAPABILITY={requested!r}; use avx512, avx2 or default")
        return requested.upper()
    # AVX2 is the ISA torch's own CPU kernels use on most machines; AVX-512 only on request.
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


def cpu_compile_args(capability: str) -> list:
    args = ["-O0", "-g"] if _env_flag("ONLINE_SOFTMAX_DEBUG") else ["-O3"]
    # at::parallel_for's OpenMP backend is a header template: this object must be built with OpenMP
    # (it then shares the libgomp.so.1 that torch has already loaded).
    args += [f"-DCPU_CAPABILITY={capability}", "-fopenmp"]
    if capability == "AVX2":
        args += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    elif capability == "AVX512":
        args += ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    return args


def want_cuda() -> bool:
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False
    if _env_flag("FORCE_CUDA"):
        if not _has_cuda_headers(CUDA_HOME):
            sys.exit(f"online_softmax: FORCE_CUDA=1 but no CUDA toolkit was found (CUDA_HOME={CUDA_HOME!r} has no "
                     "include/cuda_runtime.h). Set CUDA_HOME to the toolkit's folder, e.g. /usr/local/cuda.")
        return True
    # A CUDA toolkit and a CUDA build of torch, never merely a visible GPU.
    return CUDA_HOME is not None and torch.version.cuda is not None


def build_extension():
    capability = cpu_capability()
    cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")
                          + glob.glob("csrc/kernels/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cpu_compile_args(capability)}
    if want_cuda() and cuda_sources:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # No --use_fast_math: the kernels pick their fast intrinsics (exp2f) explicitly and keep
        # IEEE division, log and denormals everywhere else.
        extra["nvcc"] = ["-O3", "-lineinfo", "-DONLINE_SOFTMAX_WITH_CUDA"]
        if _env_flag("ONLINE_SOFTMAX_PTXAS_VERBOSE"):
            extra["nvcc"].append("-Xptxas=-v")  # registers, shared memory, stack and spills per kernel
        extra["cxx"].append("-DONLINE_SOFTMAX_WITH_CUDA")
        return CUDAExtension("online_softmax._C", cpp_sources + cuda_sources,
                             include_dirs=include_dirs, extra_compile_args=extra,
                             extra_link_args=["-fopenmp"])
    return CppExtension("online_softmax._C", cpp_sources, include_dirs=include_dirs,
                        extra_compile_args=extra, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
