"""pytest-benchmark cases of the stoich conv (same cases as ``python -m
stoichconv.bench``; the reference is the one the tests use). CI runs them once
with ``--benchmark-disable`` so they keep working; each also checks its output
against the reference row."""

import argparse

import pytest
import torch

from stoichconv.bench.core import max_relative_error
from stoichconv.bench.stoich_conv_cases import CONFIGS, cases

ARGS = argparse.Namespace(device="cpu", channels=64, batches=[1, 8, 32], backends=["reference", "torch.sparse", "cpu"])
PARAMS = [
    (config, batch, backend)
    for config in CONFIGS
    for batch in ARGS.batches
    for backend in ARGS.backends
    if not (backend == "torch.sparse" and config != "plain")
]


@pytest.fixture(scope="module")
def all_cases():
    return {(c.config, c.batch, c.backend): c for c in cases(ARGS)}


@pytest.mark.parametrize("config,batch,backend", PARAMS)
def test_stoich_conv_forward_backward(benchmark, all_cases, config, batch, backend):
    case = all_cases[(config, batch, backend)]
    benchmark.group = f"stoich_conv {config} B={batch}"
    output = benchmark(case.run)
    if backend != "reference":
        reference = all_cases[(config, batch, "reference")].run()
        assert max_relative_error(output, reference) < 1e-4
