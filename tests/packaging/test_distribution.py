"""What a user installs: the sdist carries every file a build needs, a wheel built from it installs
into a fresh virtual environment (reusing the installed torch) and runs, the version is one, and a
build loaded into another torch minor version says so by name."""

import importlib
import importlib.metadata
import os
import site
import subprocess
import sys
import tarfile
import tomllib
import venv
from pathlib import Path

import pytest
import torch

import online_softmax
from online_softmax import _torch_check

ROOT = Path(__file__).resolve().parents[2]  # tests/packaging/ -> the repository


def test_version_is_in_one_place():
    assert online_softmax.__version__ == importlib.metadata.version("online_softmax")
    assert online_softmax.build_info()["version"] == online_softmax.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]  # read from _version.py


def test_build_info_names_the_torch_it_was_built_against():
    info = online_softmax.build_info()
    assert info["built_with_torch"] == torch.__version__ and info["torch"] == torch.__version__


def test_a_build_for_another_torch_minor_says_so(monkeypatch):
    monkeypatch.setattr(_torch_check, "built_with", lambda: ("2.9.1+cpu", None))
    with pytest.warns(RuntimeWarning, match=r"built against torch 2\.9\.1\+cpu, but torch .* is running"):
        _torch_check.load_extension()

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10...")

    monkeypatch.setattr(_torch_check.importlib, "import_module", broken)
    with pytest.warns(RuntimeWarning), pytest.raises(ImportError, match=r"rebuilt for each torch minor version.*"
                                                                          r"undefined symbol"):
        _torch_check.load_extension()
    monkeypatch.setattr(_torch_check, "built_with", lambda: (torch.__version__, None))
    with pytest.raises(ImportError, match="^undefined symbol"):  # same torch: the original error
        _torch_check.load_extension()


def _needed_files():
    csrc = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")]
    return {str(p.relative_to(ROOT)) for p in csrc} | {"LICENSE", "README.md", "pyproject.toml", "setup.py"} | {
        str(p.relative_to(ROOT)) for p in (ROOT / "online_softmax").rglob("*.py") if p.name != "_torch_build.py"} | {
        str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    (tarball,) = out.glob("online_softmax-*.tar.gz")
    return tarball


def test_sdist_carries_every_file_a_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = _needed_files() - names
    assert not missing, f"the sdist lacks {sorted(missing)}"
    assert any(n.endswith(".cu") for n in names) and any(n.endswith(".cuh") for n in names)
    leaked = [n for n in names if n.endswith((".so", ".o")) or n.endswith("_torch_build.py")]
    assert not leaked, f"build outputs of this machine in the sdist: {leaked}"


def test_wheel_from_the_sdist_installs_and_runs(sdist, tmp_path):
    """`python -m build --wheel --no-isolation` on the unpacked sdist, as a packager would, then the
    wheel installed into a fresh venv that reuses this Python's torch; the installed package (not
    the checkout) runs an op against torch there."""
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(tmp_path / "unpacked", filter="data")
        except TypeError:  # Python without extraction filters (< 3.11.4)
            tar.extractall(tmp_path / "unpacked")
    (src,) = (tmp_path / "unpacked").iterdir()
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"), USE_CUDA="0", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    wheel = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                            str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, env=env, timeout=900)
    assert wheel.returncode == 0, wheel.stdout[-3000:] + wheel.stderr[-3000:]
    (whl,) = (tmp_path / "wheels").glob("online_softmax-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # Reuse this environment's packages (torch, pip) behind the venv's own: what
    # --system-site-packages does when this Python is the system one, and also when it is a venv.
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "reuse_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(whl)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = (
        "import torch, online_softmax as o, importlib.metadata as md\n"
        "assert o.__file__.startswith(%r), o.__file__\n"
        "x = torch.randn(37, 1000) * 5\n"
        "torch.testing.assert_close(o.softmax(x), torch.softmax(x, -1))\n"
        "assert o.__version__ == md.version('online_softmax')\n"
        "print(o.build_info())\n" % str(env_dir))
    run = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "'built_with_torch': '%s'" % torch.__version__ in run.stdout
