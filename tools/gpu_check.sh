#!/usr/bin/env bash
# `make gpu-check` (tier 1) and `make gpu-sanitize` (tier 2): the GPU check on one lent GPU
# machine, and their dry run on a machine without a GPU (DRY_RUN=1, run by CI and `make test`).
# The steps, budgets, estimates and the results folder are described in tools/gpu_check.py.
#
#   bash tools/gpu_check.sh [--tier 1|2|all] [--dry-run] [--out DIR]
#   env: DRY_RUN=1, GPU_CHECK_OUT (results, default bench-results/gpu-check),
#        GPU_CHECK_PYTHON (the Python to use), GPU_SANITIZE_ARGS (extra compute-sanitizer options),
#        MAX_JOBS, TORCH_CUDA_ARCH_LIST, CUDA_HOME (defaults: cores, the device's arch, found)
#
# Expects, on the lent machine: Python 3.12 at /opt/torch/.venv with torch 2.11.0+cu130,
# triton 3.6, torch-geometric 2.8, pytest (+ pytest-xdist), nvcc 13.0 and compute-sanitizer; no
# package registry (nothing is downloaded). The extension is built there (FORCE_CUDA=1, the
# device's arch only, MAX_JOBS = cores): a stoichconv._C built on the development machines
# (Python 3.11, torch 2.13) would not load on that Python and torch, so none is carried.
#
# The Python: $GPU_CHECK_PYTHON, else /opt/torch/.venv/bin/python, else .venv/bin/python when it
# imports torch, else python3.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${GPU_CHECK_PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x /opt/torch/.venv/bin/python ]]; then PY=/opt/torch/.venv/bin/python
  elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
  else PY=$(command -v python3 || command -v python); fi
fi
export GPU_CHECK_PYTHON=$PY
exec "$PY" tools/gpu_check.py "$@"
