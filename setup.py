"""Build script for the online_softmax extension.

Install with `pip install --no-build-isolation -e .` (torch must already be installed; it is never
pulled into an isolated build environment).

Environment variables:
  USE_CUDA=0                      build the CPU extension only, even where CUDA is available.
  FORCE_CUDA=1                    build the CUDA sources even without a visible GPU (needs nvcc and a
                                  CUDA build of torch).
  TORCH_CUDA_ARCH_LIST            CUDA architectures; defaults to "8.0;9.0" when no GPU is visible.
  ONLINE_SOFTMAX_CPU_CAPABILITY   avx512 | avx2 | default: the highest vector ISA to compile the CPU
                                  kernels for (every lower one is compiled too). Default: all three on
                                  x86-64, DEFAULT elsewhere. The one torch runs is chosen at load time.
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


CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]  # each nests the one before it


def cpu_capabilities() -> list:
    """The vector ISAs to compile the CPU kernels for (ATen's CPU_CAPABILITY names). Each is compiled
    from the same sources (csrc/cpu/isa/<name>.cpp); the one torch runs is chosen at load time."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["DEFAULT"]
    requested = os.environ.get("ONLINE_SOFTMAX_CPU_CAPABILITY", "").strip().upper()
    if not requested:
        return list(CAPABILITIES)
    if requested not in CAPABILITIES:
        sys.exit(f"online_softmax: ONLINE_SOFTMAX_CPU_CAPABILITY={requested.lower()!r}; use default, avx2 or avx512 "
                 "(the highest capability to compile; every lower one is compiled too)")
    return CAPABILITIES[: CAPABILITIES.index(requested) + 1]


def cpu_compile_args(capabilities: list) -> list:
    args = ["-O0", "-g"] if _env_flag("ONLINE_SOFTMAX_DEBUG") else ["-O3"]
    # at::parallel_for's OpenMP backend is a header template: this object must be built with OpenMP
    # (it then shares the libgomp.so.1 that torch has already loaded).
    args.append("-fopenmp")
    # No -m flag here: csrc/cpu/isa/<name>.cpp raise the ISA for their own kernels only.
    args += [f"-DONLINE_SOFTMAX_CPU_{c}" for c in capabilities if c != "DEFAULT"]
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
    capabilities = cpu_capabilities()
    # The per-ISA kernels link last and lowest ISA first: an inline function that several objects
    # define is taken from the first, which then is one built for the baseline ISA.
    cpp_sources = (["csrc/ops.cpp", "csrc/python_module.cpp"]
                   + sorted(glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
                   + [f"csrc/cpu/isa/{c.lower()}.cpp" for c in capabilities])
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")
                          + glob.glob("csrc/kernels/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cpu_compile_args(capabilities)}
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


def record_torch_build():
    """online_softmax/_torch_build.py: the torch this build compiles against, which the package
    compares with the running torch at import (a different minor version breaks the C++ ABI). Written
    here, before setup(), so in-place, editable and wheel builds all carry it; sdists leave it out
    (MANIFEST.in)."""
    path = os.path.join(ROOT, "online_softmax", "_torch_build.py")
    text = ('"""Written by setup.py at build time: the torch this build of the extension compiled against."""\n\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"TORCH_CUDA = {torch.version.cuda!r}\n")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)


record_torch_build()

setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
