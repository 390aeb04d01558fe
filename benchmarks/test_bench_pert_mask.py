"""pytest-benchmark cases of the pert-mask ops (same cases as ``python -m
stoichconv.bench``); each checks its output against the per-sample reference."""

import argparse

import pytest

from stoichconv.bench.core import max_relative_error
from stoichconv.bench.pert_mask_cases import cases

ARGS = argparse.Namespace(device="cpu", batches=[1, 8, 32], backends=["reference", "padded-table", "cpu"])
PARAMS = [(op, batch, backend) for op in ("filter_edges", "perturb_batch") for batch in ARGS.batches
          for backend in ARGS.backends]
# perturb_batch through the PerturbBatcher (reused output buffers), against the same reference
PARAMS += [("perturb_batch", batch, "cpu batcher") for batch in ARGS.batches]


@pytest.fixture(scope="module")
def all_cases():
    return {(c.op, c.batch, c.backend): c for c in cases(ARGS)}


@pytest.mark.parametrize("op,batch,backend", PARAMS)
def test_pert_mask(benchmark, all_cases, op, batch, backend):
    case = all_cases[(op, batch, backend)]
    benchmark.group = f"{op} B={batch}"
    output = benchmark(case.run)
    if backend != "reference":
        assert max_relative_error(output, all_cases[(op, batch, "reference")].run()) == 0
