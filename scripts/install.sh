#!/usr/bin/env bash
# Builds and installs online_softmax (editable) into the current Python, with what it needs.
# torch is installed (pinned) only when absent; the build never pulls torch into an isolated env.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==${ONLINE_SOFTMAX_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q "setuptools>=64" wheel build numpy pytest hypothesis expecttest
# The beam-search decoder is tested against Hugging Face's generate() (random weights, no download).
"$PY" -m pip install -q "transformers==${ONLINE_SOFTMAX_TRANSFORMERS_VERSION:-5.23.0}"
# online_softmax.hf.apply is tested under transformers' Trainer, which needs accelerate.
"$PY" -m pip install -q "accelerate==${ONLINE_SOFTMAX_ACCELERATE_VERSION:-1.15.0}"
command -v ninja >/dev/null 2>&1 || "$PY" -m pip install -q ninja
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import online_softmax; print('built:', online_softmax.build_info())"
