#!/usr/bin/env bash
# Everything that needs a GPU, sized to the time a GPU is lent for (one call of at most 10 minutes,
# about 15 minutes of device time in all, the machine's start included):
#
#   bash scripts/gpu_check.sh OUT_DIR [PHASES]   run the phases, write the results into OUT_DIR
#   bash scripts/gpu_check.sh --plan [PHASES]    print the phases, their limits, the files they write
#                                                and the exact test selection; runs nothing (CI runs it)
#
# PHASES is a comma-separated list, or `first` (the default) or `second`. The first call,
# env,build,select,tests,memcheck,racecheck,bench, has limits that add up to 540 s under a wall budget
# of 480 s for the whole run (GPU_CHECK_BUDGET_S): a phase runs under the smaller of its limit and what
# is left of the budget, and one that would start with under 15 s left is skipped, saying so. The
# optional second call, env,build,ncu,bench-full (on the same machine the build of the same sources is
# reused), and bench-compile (the sweep with the torch.compile peers, a call of its own) have limits of
# their own: give them GPU_CHECK_BUDGET_S from the device time left. `sanitize` = memcheck,racecheck.
#
# summary.txt is written first and appended after every phase, so a call stopped from outside still
# brings back what finished. OUT_DIR receives at most 8 files (what a lent machine returns): summary.txt,
# env.txt, one log per phase group and the benchmark JSON; CSV, plots and the node-id list stay in a
# scratch folder. Builds in place (no pip, no network). Records the git commit (or ONLINE_SOFTMAX_COMMIT
# where the tree travelled without .git) and a digest of the sources, which scripts/gpu_results.py
# checks before it turns summary.txt and the JSON into the README's GPU table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DEFAULT_PHASES=env,build,select,tests,memcheck,racecheck,bench
SECOND_CALL_PHASES=env,build,ncu,bench-full
ORDER=(env build select tests memcheck racecheck bench ncu bench-full bench-compile)
declare -A LIMIT=([env]=20 [build]=200 [select]=25 [tests]=140 [memcheck]=50 [racecheck]=55 [bench]=50
                  [ncu]=70 [bench-full]=130 [bench-compile]=420)
declare -A LOG=([env]=env.txt [build]=build.log [select]=tests.log [tests]=tests.log [memcheck]=memcheck.log
                [racecheck]=racecheck.log [bench]=bench.log [ncu]=ncu.log [bench-full]=bench-full.log
                [bench-compile]=bench-compile.log)
declare -A RESULT=([bench]=cuda_float32_check.json [bench-full]=cuda_float32.json
                   [bench-compile]=cuda_float32_compile.json)
declare -A WHAT=(
  [env]="GPU, driver, clocks, nvcc, torch, Python, packages, commit"
  [build]="setup.py build_ext --inplace, sm_90, MAX_JOBS=cores, ptxas -v; build_info and one op on the GPU"
  [select]="scripts/gpu_tests.py: the tests marked cuda, the rest left out with reasons"
  [tests]="pytest over the selected node ids, xdist workers (3/4 of the cores), 90 s per test"
  [memcheck]="compute-sanitizer memcheck, online_softmax kernels, scripts/sanitize_cases.py --short"
  [racecheck]="compute-sanitizer racecheck, online_softmax kernels, scripts/sanitize_cases.py --short"
  [bench]="python -m online_softmax.bench --device cuda --quick --no-compile (4 shapes)"
  [ncu]="Nsight Compute: forward, backward, fused top-k (scripts/ncu_cases.py)"
  [bench-full]="python -m online_softmax.bench --device cuda --no-compile (the whole GPU sweep)"
  [bench-compile]="python -m online_softmax.bench --device cuda (with the torch.compile peers)"
)

PLAN_ONLY=0
if [[ "${1:-}" == "--plan" ]]; then
  PLAN_ONLY=1
  PHASES=${2:-$DEFAULT_PHASES}
else
  OUT_DIR=${1:?usage: scripts/gpu_check.sh OUT_DIR [PHASES] | --plan [PHASES]}
  PHASES=${2:-$DEFAULT_PHASES}
fi
[[ $PHASES == first ]] && PHASES=$DEFAULT_PHASES
[[ $PHASES == second ]] && PHASES=$SECOND_CALL_PHASES
PHASES=${PHASES//sanitize/memcheck,racecheck}
[[ ",$PHASES," == *",tests,"* && ",$PHASES," != *",select,"* ]] && PHASES=select,$PHASES
has() { [[ ",$PHASES," == *",$1,"* ]]; }
for p in ${PHASES//,/ }; do
  [[ -n "${LIMIT[$p]:-}" ]] || { echo "gpu_check: unknown phase '$p' (${ORDER[*]}, sanitize)" >&2; exit 2; }
done
SELECTED=()
for p in "${ORDER[@]}"; do has "$p" && SELECTED+=("$p"); done

plan_table() {
  local sum=0 p files=() f
  echo "gpu_check plan: phases ${SELECTED[*]}; wall budget $BUDGET_S s"
  for p in "${SELECTED[@]}"; do
    printf 'phase %-13s %4d s  %s\n' "$p" "${LIMIT[$p]}" "${WHAT[$p]}"
    sum=$((sum + LIMIT[$p]))
  done
  echo "sum of limits: $sum s"
  files=(summary.txt)
  for p in "${SELECTED[@]}"; do
    for f in "${LOG[$p]}" "${RESULT[$p]:-}"; do
      [[ -n "$f" && " ${files[*]} " != *" $f "* ]] && files+=("$f")
    done
  done
  echo "files in OUT_DIR (${#files[@]}): ${files[*]}"
}

if [[ $PLAN_ONLY == 1 ]]; then
  plan_table
  echo "build estimate: about 50 s on 16 cores, 100 s at half the per-core speed (the longest object,"
  echo "  csrc/kernels/softmax_forward.cu, plus the link; docs/cuda.md, 'The GPU check'); limit ${LIMIT[build]} s"
  if has select; then
    ids=$(mktemp)
    "$PY" scripts/gpu_tests.py --ids "$ids" tests || { rm -f "$ids"; exit 1; }
    echo "node ids:"
    cat "$ids"
    rm -f "$ids"
  fi
  exit 0
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
SUM=$OUT_DIR/summary.txt
START=$SECONDS
status=0
note() { echo "$*" | tee -a "$SUM"; }
trap 'note "gpu_check: stopped by a signal after $((SECONDS - START)) s"; exit 143' TERM INT

if COMMIT=$(git rev-parse --short=12 HEAD 2> /dev/null); then
  [[ -z "$(git status --porcelain --untracked-files=no 2> /dev/null)" ]] || COMMIT="$COMMIT+uncommitted changes"
else
  COMMIT=${ONLINE_SOFTMAX_COMMIT:-unknown (no .git here: pass ONLINE_SOFTMAX_COMMIT)}
fi
DIGEST=$("$PY" scripts/gpu_results.py --digest 2> /dev/null || echo unknown)
: > "$SUM"
for p in "${SELECTED[@]}"; do rm -f "$OUT_DIR/${LOG[$p]}"; done  # an OUT_DIR used before keeps no old log
note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $COMMIT source $DIGEST"
plan_table | sed 's/^/plan: /' >> "$SUM"

run_phase() {  # name, command...: runs under min(limit, budget left), appends its verdict to summary.txt
  local name=$1; shift
  local left=$((BUDGET_S - (SECONDS - START))) limit=${LIMIT[$name]}
  if ((left < 15)); then
    note "phase $name: skipped, $left s left of the $BUDGET_S s budget"
    status=1
    return 125
  fi
  ((limit > left - 5)) && limit=$((left - 5))  # timeout's --kill-after may add 5 s
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$OUT_DIR/${LOG[$name]}" 2>&1
  local rc=$? verdict=pass
  [[ $rc -eq 0 ]] || verdict=FAIL
  [[ $rc -eq 124 || $rc -eq 137 ]] && verdict="FAIL (timed out)"
  note "phase $name: $verdict, exit $rc, $((SECONDS - t0)) s (limit $limit s)"
  [[ $rc -eq 0 ]] || status=1
  return $rc
}

env_report() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit $COMMIT source $DIGEST"
  uname -srm
  echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
  free -g | head -n 2
  nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,\
clocks.mem,power.limit,temperature.gpu,persistence_mode
  nvcc --version | tail -n 2
  compute-sanitizer --version 2>&1 | tail -n 1
  ncu --version 2>&1 | tail -n 1
  "$PY" - << 'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"machine: {p.name}, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}, "
      f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}); Python {platform.python_version()}")
EOF
  "$PY" -m pip list 2> /dev/null \
    | grep -iE '^(torch|transformers|accelerate|pytest|pytest-xdist|pytest-timeout|hypothesis|numpy|ninja|setuptools|triton) '
}

if has env; then
  run_phase env bash -c "$(declare -f env_report); PY='$PY' COMMIT='$COMMIT' DIGEST='$DIGEST' env_report"
  grep -m1 '^machine: ' "$OUT_DIR/env.txt" | sed 's/$/; '"$(nproc)"' cores/' >> "$SUM"
  grep -m1 -A1 '^name, driver' "$OUT_DIR/env.txt" | tail -n 1 | sed 's/^/gpu: /' >> "$SUM"
fi

if has build; then
  build_and_smoke() {
    # A later call on the same machine reuses the build of the same sources: the tree is copied
    # afresh for each call, and new timestamps would make ninja compile everything again.
    if [[ "$(cat build/gpu_check.digest 2> /dev/null)" == "$DIGEST" && "$DIGEST" != unknown ]] \
        && ls online_softmax/_C*.so > /dev/null 2>&1; then
      echo "reused: the build of the same sources (source $DIGEST)"
    else
      env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" FORCE_CUDA=1 ONLINE_SOFTMAX_PTXAS_VERBOSE=1 \
        "$PY" setup.py build_ext --inplace || return 1
      mkdir -p build && echo "$DIGEST" > build/gpu_check.digest
    fi
    "$PY" - << 'EOF'
import torch, online_softmax as o
info = o.build_info()
print("build_info:", info)
assert info["cuda"], "built without the CUDA kernels"
x = torch.randn(64, 5000, device="cuda") * 3
err = (o.softmax(x, -1) - torch.softmax(x, -1)).abs().max().item()
v, i = o.softmax_topk(x, 4)
same = torch.equal(i, torch.softmax(x, -1).topk(4).indices)
print(f"smoke: softmax max abs error {err:.2e} vs torch, top-4 indices equal torch's: {same}")
assert err < 1e-6 and same
EOF
  }
  run_phase build bash -c "$(declare -f build_and_smoke); PY='$PY' DIGEST='$DIGEST' build_and_smoke" || {
    note "build failed: nothing else can run (see build.log)"; tail -n 30 "$OUT_DIR/build.log"
    note "done: $((SECONDS - START)) s of the $BUDGET_S s budget, exit 1"; exit 1; }
  grep -E '^(reused|build_info|smoke):' "$OUT_DIR/build.log" >> "$SUM"
  entries=$(grep -c "Compiling entry function" "$OUT_DIR/build.log")
  stacks=$(grep -cE "[1-9][0-9]* bytes stack frame" "$OUT_DIR/build.log")
  spills=$(grep -cE "[1-9][0-9]* bytes spill (stores|loads)" "$OUT_DIR/build.log")
  note "resources: $entries kernel entries; $stacks with a stack frame, $spills spill lines (ptxas -v in build.log)"
fi

IDS=$SCRATCH/ids.txt
if has select; then
  echo "== select: scripts/gpu_tests.py" >> "$OUT_DIR/tests.log"
  run_phase select "$PY" scripts/gpu_tests.py --ids "$IDS" tests
  sed -n '/^selected: /,$p' "$OUT_DIR/tests.log" >> "$SUM"
fi

if has tests; then
  if [[ ! -s "$IDS" ]]; then
    note "phase tests: skipped, no selection (see tests.log)"
    status=1
  else
    mapfile -t ids < "$IDS"
    workers=()
    if "$PY" -c "import xdist" 2> /dev/null; then
      workers=(-n $(($(nproc) * 3 / 4)))
    else
      note "note: pytest-xdist is not installed, the tests run in one process"
    fi
    per_test=()
    "$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout=90)
    { echo "== tests: ${#ids[@]} node ids"; cat "$IDS"; } >> "$OUT_DIR/tests.log"
    # No -x: one call reports every failure.
    run_phase tests "$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=15 \
      "${workers[@]}" "${per_test[@]}" "${ids[@]}"
    { echo "tests: $(tail -n 1 "$OUT_DIR/tests.log")"
      grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | head -n 40
      grep -E "^SKIPPED " "$OUT_DIR/tests.log" | head -n 10; } >> "$SUM"
  fi
fi

sanitizer() {  # tool: compute-sanitizer over the short case list, only the project's kernels instrumented
  local args=(--tool "$1" --error-exitcode 3 --print-limit 20)
  local help; help=$(compute-sanitizer --help 2>&1)
  [[ $help == *--kernel-name* && $help == *kns* ]] && args+=(--kernel-name kns=online_softmax)
  # Without torch's caching allocator every tensor is its own allocation, so memcheck sees an access
  # past a tensor's end instead of one into a neighbour in the same cached block.
  run_phase "$1" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer "${args[@]}" "$PY" scripts/sanitize_cases.py --short
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^sanitize_cases" "$OUT_DIR/$1.log" | sed "s/^/$1: /" >> "$SUM"
}
for tool in memcheck racecheck; do
  has $tool || continue
  if command -v compute-sanitizer > /dev/null; then
    sanitizer $tool
  else
    note "phase $tool: skipped, compute-sanitizer not found"
  fi
done

bench() {  # phase, bench arguments...: the JSON goes to OUT_DIR, CSV and plot stay in the scratch folder
  local phase=$1; shift
  run_phase "$phase" "$PY" -m online_softmax.bench --device cuda --out "$SCRATCH/bench" "$@" \
    --tag "${RESULT[$phase]%.json}"
  cp "$SCRATCH/bench/${RESULT[$phase]}" "$OUT_DIR/" 2> /dev/null
  grep -E "^median speedup" "$OUT_DIR/${LOG[$phase]}" | sed "s/^/$phase: /" >> "$SUM"
}
has bench && bench bench --quick --no-compile
if has ncu; then
  if command -v ncu > /dev/null; then
    # --clock-control none: the card's clocks are left as they are.
    run_phase ncu ncu --clock-control none --kernel-name-base demangled -k regex:online_softmax --launch-count 12 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      "$PY" scripts/ncu_cases.py
  else
    note "phase ncu: skipped, ncu not found"
  fi
fi
has bench-full && bench bench-full --no-compile
has bench-compile && bench bench-compile

note "done: $((SECONDS - START)) s of the $BUDGET_S s budget, exit $status"
echo "==== summary.txt"
cat "$SUM"
exit $status
