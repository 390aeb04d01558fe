#!/usr/bin/env bash
# `make gpu-check`: the GPU suite, on a machine with a GPU and no network.
#
# Uses the python/torch already installed there (override with PYTHON=...):
#   1. builds and installs the package in place with the CUDA kernels
#      (FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e .; nothing downloaded),
#   2. runs every CUDA and Triton test against the reference (real GPU, TRITON_INTERPRET unset),
#   3. runs compute-sanitizer memcheck and racecheck over a short subset of the CUDA tests
#      and memcheck over a quick benchmark pass,
#   4. runs benchmarks/gpu_bench.py and prints its table last.
# Exits non-zero if any step failed (every step still runs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
  else PY=$(command -v python3 || command -v python); fi
fi
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET STOICHCONV_NO_CUDA STOICHCONV_BACKEND
export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
OUT=${GPU_CHECK_OUT:-bench-results/gpu-check}
mkdir -p "$OUT"

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record the status
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-22s %-6s %4ss' "$name" "$([[ $rc == 0 ]] && echo ok || echo FAIL:$rc)" $((SECONDS - start)))")
  [[ $rc == 0 ]] || FAILED=1
  return $rc
}

# ---- environment
"$PY" - <<'PYEOF' || { echo "gpu-check: torch cannot see a CUDA GPU here" >&2; exit 2; }
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
assert torch.version.cuda is not None, "torch is a CPU-only build"
assert torch.cuda.is_available(), "no GPU visible"
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (Triton tests will skip or fail)")
PYEOF
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME=$("$PY" -c "
import importlib.util, os
spec = importlib.util.spec_from_file_location('bc', 'stoichconv/_build_config.py')
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(m.find_cuda_home(os.environ) or '')")
  export CUDA_HOME
fi
echo "CUDA_HOME=${CUDA_HOME:-<not found>}"
SANITIZER=""
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" "$(command -v compute-sanitizer || true)"; do
  [[ -n "$c" && -x "$c" ]] && { SANITIZER=$c; break; }
done
# The GPU's own architecture is built too (the defaults are 8.0 and 9.0).
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST="8.0;9.0"
  [[ "$CAP" == 8.0 || "$CAP" == 9.0 ]] || TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST;$CAP"
fi

# ---- 1. build + install (no network, no isolation, torch already there)
build() {
  rm -rf build
  "$PY" -m pip install --no-build-isolation --no-deps -e . || {
    echo "pip install -e failed; falling back to setup.py build_ext --inplace"
    "$PY" setup.py -q build_ext --inplace
  } || return 1
  "$PY" -c "
import torch, stoichconv
from stoichconv._extension import _C
assert _C is not None and _C.with_cuda == 1, 'stoichconv._C lacks the CUDA kernels'
assert torch._C._dispatch_has_kernel_for_dispatch_key('stoichconv::stoich_conv_forward', 'CUDA')
print('stoichconv._C built with CUDA kernels')"
}
step build build || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }

# ---- 2. CUDA + Triton tests on the GPU against the reference
pytest_selected() {  # pytest, with "no test selected" (rc 5) counted as success
  "$PY" -m pytest "$@"; local rc=$?; [[ $rc == 5 ]] && return 0; return $rc
}
step cuda_tests pytest_selected tests/cuda -q -rs
step triton_tests pytest_selected tests/triton -q -rs
step other_gpu_tests pytest_selected tests -m cuda -q -rs --ignore=tests/cuda --ignore=tests/triton

# ---- 3. compute-sanitizer (a short subset; the caching allocator is off so
#         out-of-bounds accesses are not hidden inside torch's memory pool)
SUBSET="spec_test_vector or long_rows or test_matches_cpu_kernel or yeast_gem or (filter_edges_matches and 50) or (bipartite_matches and both) or reaction_keep_matches"
if [[ -n "$SANITIZER" ]]; then
  step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    --print-limit 20 "$PY" -m pytest tests/cuda -q -x -k "$SUBSET"
  step racecheck "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest tests/cuda -q -x -k "spec_test_vector or long_rows or (filter_edges_matches and 50)"
  step memcheck_bench env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    --print-limit 20 "$PY" benchmarks/gpu_bench.py --quick --backends cuda
else
  echo "compute-sanitizer not found (looked in \$CUDA_HOME/bin and PATH)"
  SUMMARY+=("$(printf '%-22s %-6s' sanitizers MISSING)"); FAILED=1
fi

# ---- 4. benchmark, table last
echo
echo "=== gpu-check summary (logs in $OUT/)"
printf '%s\n' "${SUMMARY[@]}"
[[ $FAILED == 0 ]] && echo "gpu-check: all steps so far passed; benchmark follows" \
                   || echo "gpu-check: some steps FAILED (see above); benchmark follows"
step gpu_bench "$PY" benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json"
exit $FAILED
