"""What this build of the extension contains."""

import torch

from . import _C
from ._torch_check import built_with
from ._version import __version__


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"online_softmax::{op}", key)


def build_info() -> dict:
    """Backends compiled into this build, the CPU vector ISAs its kernels were compiled for
    (``cpu_capabilities``) and the one running now (``cpu_capability``), beside torch's own;
    ``torch`` is the running torch, ``built_with_torch`` the one this build compiled against."""
    built = built_with()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "built_with_torch": built[0] if built else None,
        "cpu": _has_kernel("forward", "CPU"),
        "cuda": bool(_C.with_cuda) and _has_kernel("forward", "CUDA"),
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": _C.cpu_capability(),
        "cpu_capabilities": _C.cpu_capabilities(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
