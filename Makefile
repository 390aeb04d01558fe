# One-command set-up: `make test` and `make bench` create .venv, install torch
# and the dependencies, build the extension, then run. A second run only
# rebuilds what changed. `make TORCH=cpu ...` uses the light CPU build of torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= cu130
TORCH_VERSION ?= 2.13.0
ifeq ($(TORCH),cpu)
TORCH_REQ := torch==$(TORCH_VERSION)+cpu
else
# three '=': exact match without a local label, i.e. the registry's default
# Linux build (CUDA 13.0), so that the CUDA kernels get compiled
TORCH_REQ := torch===$(TORCH_VERSION)
endif
# setuptools>=77: pyproject's SPDX `license = "..."` (torch 2.11 only asks for setuptools<82, so
# the venv kept Python 3.11's bundled 65.5). numpy<2.4 with torch 2.11: its pinned triton 3.6.0
# interpreter (TRITON_INTERPRET=1) calls int() on 1-element arrays, a TypeError since NumPy 2.4.
NUMPY_REQ := $(if $(filter 2.11.%,$(TORCH_VERSION)),numpy<2.4,numpy)
DEPS := "setuptools>=77.0.3" triton torch-geometric ninja pybind11 pytest pytest-benchmark hypothesis "$(NUMPY_REQ)" tqdm matplotlib
export MAX_JOBS ?= 2
BENCH_ARGS ?=
# `make bench MALLOC=jemalloc` / `MALLOC=tcmalloc`: the same benchmark with that allocator preloaded
# (Debian packages libjemalloc2 / libtcmalloc-minimal4; a clear error with the apt command when
# missing), written to bench-results/bench-$(MALLOC).{json,png}. Unset: glibc's malloc.
MALLOC ?=
BENCH_OUT := bench-results/bench$(if $(MALLOC),-$(MALLOC))

DEPS_STAMP := $(VENV)/.deps-$(TORCH)
BUILD_STAMP := $(VENV)/.built-$(TORCH)
SOURCES := setup.py $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))

.PHONY: all deps build test bench gpu-check gpu-sanitize clean

all: test

deps: $(DEPS_STAMP)
$(DEPS_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.deps-* $(VENV)/.built-* $(VENV)/.editable
	$(PIP) install -q --disable-pip-version-check "$(TORCH_REQ)" $(DEPS)
	touch $@

build: $(BUILD_STAMP)
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	if [ -f $(VENV)/.editable ]; then \
	  $(PY) setup.py -q build_ext --inplace; \
	else \
	  rm -rf build && $(PIP) install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.editable; \
	fi
	$(PY) -c "import stoichconv; assert stoichconv.has_compiled_kernels(), 'stoichconv._C failed to build'"
	touch $@

test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

bench: $(BUILD_STAMP)
	mkdir -p bench-results
	$(PY) -m stoichconv.bench --threads 2 $(if $(MALLOC),--malloc $(MALLOC)) --json $(BENCH_OUT).json --plot $(BENCH_OUT).png $(BENCH_ARGS)

# On a lent GPU machine with no network (tools/gpu_check.py): tier 1 `make gpu-check` builds
# the extension against the torch installed there, runs the real-size GPU tests, the CUDA/Triton
# suite and benchmarks/gpu_bench.py --quick (<= 6 min); tier 2 `make gpu-sanitize` runs
# compute-sanitizer over a small subset (<= 4 min). DRY_RUN=1: the CPU dry run of either
# (collects every test and benchmark named, prints the plan and its time estimate).
# Results: $(GPU_CHECK_OUT), default bench-results/gpu-check.
export DRY_RUN GPU_CHECK_OUT
gpu-check:
	bash tools/gpu_check.sh --tier 1

gpu-sanitize:
	bash tools/gpu_check.sh --tier 2

clean:
	rm -rf build stoichconv/_C*.so $(VENV)/.built-* bench-results
