"""pytest hooks and fixtures; the shared helpers themselves live in testlib.py."""

import importlib.metadata
import os
import re
import tomllib
import types
from pathlib import Path

import pytest
import torch

import online_softmax
from testlib import DEVICES

# Test modules that compare against transformers are written against the version the test extra pins
# (pyproject.toml); with an older one they skip, saying so. ONLINE_SOFTMAX_PRETEND_VERSIONS
# ("transformers=5.17.0,...") stands in for the installed versions, so a CPU machine can rehearse
# which tests another machine leaves out (scripts/gpu_tests.py).
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_GPU_REASON = re.compile(r"\bGPU\b")


def _pinned_versions():
    extra = tomllib.loads(_PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    return dict(spec.split("==", 1) for spec in extra if "==" in spec)


def _installed_version(package):
    pretend = os.environ.get("ONLINE_SOFTMAX_PRETEND_VERSIONS", "")
    pretend = dict(kv.split("=", 1) for kv in pretend.split(",") if "=" in kv)
    if package in pretend:
        return pretend[package]
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None  # the test's own importorskip says so


def _older(version, than):
    try:
        from packaging.version import Version
    except ImportError:  # release numbers only
        return [int(n) for n in re.findall(r"\d+", version)[:3]] < [int(n) for n in re.findall(r"\d+", than)[:3]]
    return Version(version) < Version(than)


def _is_cuda(value):
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def _touches_cuda(item):
    """A `cuda` parameter (the device fixture's cuda case among them), a skipif that names a GPU
    (GPU-only tests), or a body that asks torch.cuda.is_available() (another path with a GPU)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda(v) for v in callspec.params.values()):
        return True
    if any(_GPU_REASON.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
        return True
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and {"cuda", "is_available"} <= set(code.co_names)


def _uses(item, package):
    """The test's module imports the package, or its body does (importorskip or import)."""
    module = getattr(item, "module", None)
    if isinstance(getattr(module, package, None), types.ModuleType):
        return True
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and (package in code.co_names or package in code.co_consts)


def _sampled_out(item):
    """A cuda case that @pytest.mark.cuda_params(name=[values], ...) does not keep: the GPU check runs a
    sample of a long parameter product on CUDA (the tests phase's time), the CPU runs all of it."""
    marker = item.get_closest_marker("cuda_params")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None or not any(_is_cuda(v) for v in callspec.params.values()):
        return False
    unknown = set(marker.kwargs) - set(callspec.params)
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: cuda_params names no parameter of the test: {sorted(unknown)}")
    return any(not any(callspec.params[name] == v for v in values) for name, values in marker.kwargs.items())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not online_softmax.build_info()["cuda"]:
        # A GPU is visible but this build has no CUDA kernels: say so rather than silently skip.
        print("online_softmax: CUDA is available but the extension was built without CUDA kernels")
    sampled_out = [item for item in items if _sampled_out(item)]
    if sampled_out:
        config.hook.pytest_deselected(items=sampled_out)
        dropped = {id(item) for item in sampled_out}
        items[:] = [item for item in items if id(item) not in dropped]
    pinned = _pinned_versions()
    installed = {package: _installed_version(package) for package in pinned}
    for item in items:
        if _touches_cuda(item) and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)
        for package, version in pinned.items():
            if not _uses(item, package):
                continue
            item.add_marker(pytest.mark.needs_version(package, version))
            have = installed[package]
            if have is not None and _older(have, version):
                item.add_marker(pytest.mark.skip(
                    reason=f"written against {package} {version} (the test extra's pin); this machine has {have}"))


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every device-parameterized test has a cuda case, which skips (saying why) where there is no
    GPU or no CUDA build, so its node id names it on any machine."""
    if request.param not in DEVICES:
        pytest.skip("needs a CUDA GPU and a CUDA build of online_softmax")
    return request.param
