"""pytest hooks and fixtures; the shared helpers themselves live in testlib.py."""

import pytest
import torch

import online_softmax
from testlib import DEVICES


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not online_softmax.build_info()["cuda"]:
        # A GPU is visible but this build has no CUDA kernels: say so rather than silently skip.
        print("online_softmax: CUDA is available but the extension was built without CUDA kernels")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
