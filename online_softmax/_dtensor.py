"""DTensor support: the ops' rules (``distributed/dtensor.py``) are installed at import where
torch.distributed exists, and the Python API recognizes a DTensor by its module."""

import sys
import warnings

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"


def is_dtensor(t) -> bool:
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(t, module.DTensor)


def check_input(t, op: str, name: str = "input") -> None:
    """A DTensor argument of the Python API with a placement the rules refuse (Partial, strided):
    the error names the API's argument, not the op's."""
    if is_dtensor(t):
        from .distributed.dtensor import check_placements

        check_placements(t, name, op)


def install_rules() -> None:
    if not torch.distributed.is_available():
        return
    try:
        from .distributed import dtensor  # noqa: F401  (registers the rules at import)
    except Exception as e:  # a torch whose DTensor differs: everything else still works
        warnings.warn(f"online_softmax: the DTensor rules could not be installed: {e!r}", stacklevel=2)
