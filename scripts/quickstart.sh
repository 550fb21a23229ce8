#!/usr/bin/env bash
# Builds, then runs the demo and the benchmark on whatever device is present (GPU if visible).
# Extra arguments go to `python -m online_softmax` (e.g. --full for the whole sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The benchmark's plot needs matplotlib (the package's "bench" extra).
"${PYTHON:-python3}" -m pip install -q matplotlib
"${PYTHON:-python3}" -m online_softmax "$@"
