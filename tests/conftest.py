"""pytest hooks and fixtures; the shared helpers themselves live in testlib.py."""

import pytest
import torch

import online_softmax
from testlib import DEVICES


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not online_softmax.build_info()["cuda"]:
        # A GPU is visible but this build has no CUDA kernels: say so rather than silently skip.
        print("online_softmax: CUDA is available but the extension was built without CUDA kernels")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every device-parameterized test has a cuda case, which skips (saying why) where there is no
    GPU or no CUDA build, so its node id names it on any machine."""
    if request.param not in DEVICES:
        pytest.skip("needs a CUDA GPU and a CUDA build of online_softmax")
    return request.param
