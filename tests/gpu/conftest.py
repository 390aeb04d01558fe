"""Fixtures of the real-size GPU checks (``tests/gpu``, run by ``make gpu-check``; helpers in
``gpu_helpers.py``). Where a GPU is visible, a ``stoichconv._C`` without CUDA kernels is a
failure, not a skip."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    if CUDA:
        import stoichconv

        assert stoichconv.has_cuda_kernels(), "stoichconv._C has no CUDA kernels; rebuild with FORCE_CUDA=1"
    yield


@pytest.fixture(scope="session")
def cell_graph():
    """The bundled real-size wildtype cell graph (yeast-GEM metabolism), on the CPU."""
    from stoichconv.data import load_cell_graph

    return load_cell_graph(seed=0)


@pytest.fixture(scope="session")
def cell_graph_cuda(cell_graph):
    return cell_graph.to("cuda")


@pytest.fixture(scope="session")
def yeast_plans(cell_graph):
    """``(plan_cpu, plan_cuda)`` of the yeast-GEM incidence (float32 stoichiometry)."""
    from stoichconv.data import METABOLISM
    from stoichconv.ops import build_stoich_plan

    inc = cell_graph[METABOLISM]
    plan = build_stoich_plan(inc.hyperedge_index, inc.stoichiometry.float(), int(cell_graph["metabolite"].num_nodes),
                             int(inc.num_edges))
    return plan, plan.to("cuda")
