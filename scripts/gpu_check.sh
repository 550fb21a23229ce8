#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 10 minutes on an H200:
#   scripts/gpu_check.sh OUT_DIR [PHASES]
# PHASES is a comma-separated subset of build,tests,sanitize,bench,bench-compile (default
# build,tests,sanitize,bench). `bench` runs the full sweep without the torch.compile peer (each
# compile costs seconds per shape); `bench-compile` runs it with the peer, as a call of its own.
# Builds in place (no pip, no network), writes logs and results into OUT_DIR.
set -uo pipefail
OUT_DIR=${1:?usage: scripts/gpu_check.sh OUT_DIR [build,tests,sanitize,bench,bench-compile]}
PHASES=${2:-build,tests,sanitize,bench}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
has() { [[ ",$PHASES," == *",$1,"* ]]; }
run_phase() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local verdict=pass
  [[ $rc -eq 0 ]] || verdict=FAIL
  [[ $rc -eq 124 ]] && verdict="FAIL (timed out)"
  echo "== $name: $verdict, exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 15 "$OUT_DIR/$name.log"
  [[ $rc -eq 0 ]] || status=1
  return $rc
}

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  nvcc --version | tail -n 1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

if has build; then
  # sm_90 only: this is the machine the results are for. -Xptxas -v prints the resource report.
  run_phase build 420 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1 ONLINE_SOFTMAX_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace || exit 1
  grep -E "spill|stack frame" "$OUT_DIR/build.log" | sort | uniq -c > "$OUT_DIR/resources.txt" || true
  "$PY" -c "import online_softmax as o; print(o.build_info())" | tee -a "$OUT_DIR/summary.txt"
fi
if has tests; then
  # No -x: one call reports every failure. The host-executed kernels and the nvcc compile check
  # need no GPU and run in CI; they are left out here to save device time.
  run_phase tests 330 "$PY" -m pytest -q -rfE -p no:cacheprovider --ignore=tests/kernels/test_kernels_host.py \
    --ignore=tests/kernels/test_cuda_compile.py tests
  { echo "tests: $(tail -n 1 "$OUT_DIR/tests.log")"; grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | head -n 40; } \
    >> "$OUT_DIR/summary.txt"
fi
if has sanitize; then
  if command -v compute-sanitizer > /dev/null; then
    run_phase memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" scripts/sanitize_cases.py
    run_phase racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" scripts/sanitize_cases.py
  else
    echo "compute-sanitizer not found: sanitizer phase skipped" | tee -a "$OUT_DIR/summary.txt"
  fi
fi
if has bench; then
  run_phase bench 480 "$PY" -m online_softmax.bench --device cuda --no-compile --out "$OUT_DIR" --tag cuda_float32
fi
if has bench-compile; then
  run_phase bench-compile 560 "$PY" -m online_softmax.bench --device cuda --out "$OUT_DIR" --tag cuda_float32_compile
fi
exit $status
