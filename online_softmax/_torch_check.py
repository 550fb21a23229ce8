"""Loads the compiled extension after checking it was built for the torch that is running.

The extension links against libtorch's C++ ABI, which changes between torch minor versions: a
build for torch 2.13 loaded into torch 2.11 fails with an undefined-symbol error that names no
version. So the build records its torch (setup.py writes _torch_build.py) and this module compares
it with the running one first.
"""

import importlib
import warnings

import torch


def _minor(version: str):
    parts = version.split("+")[0].split(".")
    return tuple(int(p) for p in parts[:2] if p.isdigit())


def built_with():
    """(torch version, CUDA version or None) this build compiled against, or None if unrecorded."""
    try:
        build = importlib.import_module("online_softmax._torch_build")
    except ImportError:
        return None
    return build.TORCH_VERSION, build.TORCH_CUDA


def mismatch_message(built: str, running: str) -> str:
    return (f"online_softmax was built against torch {built}, but torch {running} is running. Its C++ "
            "extension must be rebuilt for each torch minor version: reinstall it with "
            "`pip install --no-build-isolation --no-deps --force-reinstall online_softmax` "
            "(or rebuild the checkout with `pip install --no-build-isolation -e .`).")


def load_extension():
    built = built_with()
    running = torch.__version__
    differs = built is not None and _minor(built[0]) != _minor(running)
    if differs:
        warnings.warn(mismatch_message(built[0], running), RuntimeWarning, stacklevel=3)
    try:
        return importlib.import_module("online_softmax._C")
    except ImportError as e:
        if differs:
            raise ImportError(mismatch_message(built[0], running) + f" (loading it failed: {e})") from e
        raise
