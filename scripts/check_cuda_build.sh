#!/usr/bin/env bash
# Builds this checkout against the CUDA build of torch, with no GPU needed, and checks that every
# op has a CUDA kernel registered. Run it after any change to csrc/cuda, csrc/kernels or setup.py.
#
#   scripts/check_cuda_build.sh [--sdist]
#
# A throwaway virtual environment (kept between runs, $ONLINE_SOFTMAX_CUDA_VENV, default
# ~/.cache/online_softmax/cuda-torch-venv) gets the registry's default torch==2.13.0 wheel, which is
# a CUDA 13.0 build (about 5 GB with its nvidia-* dependencies), matching nvcc 13.0. The package is
# built from a copy of the checkout's files (never in place: the CPU build's objects stay untouched)
# with FORCE_CUDA=1 for sm_90, or, with --sdist, as a wheel that `python -m build --wheel
# --no-isolation` builds from the unpacked sdist of that copy. Not part of CI (download size).
set -euo pipefail
# A PYTHONPATH pointing at a checkout would make the check import that checkout's (CPU) build
# instead of the one installed into the venv, and fail with "built without its CUDA kernels".
unset PYTHONPATH
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUTE=tree
[[ "${1:-}" == "--sdist" ]] && ROUTE=sdist
VENV=${ONLINE_SOFTMAX_CUDA_VENV:-$HOME/.cache/online_softmax/cuda-torch-venv}
TORCH_VERSION=${ONLINE_SOFTMAX_TORCH_VERSION:-2.13.0}
PY=$VENV/bin/python

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "== creating $VENV with the CUDA build of torch==$TORCH_VERSION"
  python3 -m venv "$VENV"
  # This machine's pip configuration points at a local CPU-only torch wheel; ignore it so the
  # registry's default (CUDA) build is the one installed.
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip install -q "torch==$TORCH_VERSION" "setuptools>=64" wheel ninja numpy build
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The checkout's own files as the working tree has them (tracked and untracked-but-not-ignored; a
# tracked file deleted but not yet committed is left out), nothing it built.
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | (mkdir -p "$WORK/src" && tar -xf - -C "$WORK/src")

export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
t0=$SECONDS
if [[ $ROUTE == sdist ]]; then
  (cd "$WORK/src" && "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" > "$WORK/sdist.log" 2>&1) \
    || { tail -n 40 "$WORK/sdist.log"; exit 1; }
  SDIST=$(ls "$WORK"/dist/*.tar.gz)
  echo "== sdist: $(basename "$SDIST")"
  # A wheel from the unpacked sdist, as a packager builds it: every CUDA source must be in the sdist.
  mkdir -p "$WORK/unpacked" && tar -xzf "$SDIST" -C "$WORK/unpacked"
  echo "== building a wheel from the sdist with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "$PY" -m build --wheel --no-isolation --outdir "$WORK/wheels" "$WORK"/unpacked/* > "$WORK/wheel.log" 2>&1 \
    || { grep -E -m 40 "error|FAILED" "$WORK/wheel.log"; tail -n 20 "$WORK/wheel.log"; exit 1; }
  TARGET=$(ls "$WORK"/wheels/*.whl)
  echo "== wheel: $(basename "$TARGET")"
else
  TARGET=$WORK/src
fi
echo "== installing ($ROUTE) with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
"$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$TARGET" > "$WORK/build.log" 2>&1 \
  || { grep -E -m 40 "error|FAILED" "$WORK/build.log"; tail -n 20 "$WORK/build.log"; exit 1; }
echo "== built in $((SECONDS - t0)) s"

cd "$WORK"  # import the installed package, not the checkout
"$PY" - <<'EOF'
import torch
import online_softmax

info = online_softmax.build_info()
print("build_info:", info)
assert info["cuda"], "the extension was built without its CUDA kernels"
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("online_softmax::")]
assert ops, "no online_softmax op is registered"
missing = [op for op in ops if not (torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
                                    or torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd"))]
for op in sorted(ops):
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    print(f"  {op}: {'CUDA kernel' if cuda else 'composite'}")
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"OK: {len(ops)} ops, every one runs on CUDA")
EOF
