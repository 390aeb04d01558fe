"""Both HeteroCells in reduced precision: under ``torch.autocast("cpu", bfloat16 | float16)``
(float32 parameters) and as ``.to(torch.bfloat16)`` / ``.half()`` modules, forward and backward,
predictions within :func:`stoichconv.testing.model_tolerance` of the reference model in float64
from the same parameters, every reachable parameter with a finite gradient; the fast model's
caches follow the dtype and the autocast state."""

from __future__ import annotations

import copy

import pytest
import torch

from stoichconv.data import random_perturbations
from stoichconv.models.hetero_cell import HeteroCell
from stoichconv.reference.hetero_cell import HeteroCell as ReferenceHeteroCell
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.testing import assert_close_scaled, model_tolerance, random_cell_graph

LAYERS = 2
CONFIGS = {"default": dict(), "batch_norm_metabolism_to_gene": dict(norm="batch", metabolism_to_gene=True)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _graph(dtype=None):
    graph = random_cell_graph(seed=3)
    if dtype is not None:
        met = graph["metabolite", "reaction", "metabolite"]
        met.stoichiometry = met.stoichiometry.to(dtype)
    return graph


def _forward(model, kind, graph, pert, pert_ptr):
    if kind == "reference":
        return model(graph, perturb_batch_reference(graph, pert, pert_ptr))[0]
    return model(graph, pert, pert_ptr)[0]


@pytest.mark.parametrize("mode", ["autocast-bf16", "autocast-fp16", "module-bf16", "module-fp16"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_reduced_precision_matches_float64(kind, config, mode):
    how, name = mode.split("-")
    dtype = DTYPES[name]
    graph = _graph()
    torch.manual_seed(0)
    cls = HeteroCell if kind == "fast" else ReferenceHeteroCell
    model = cls.from_cell_graph(graph, hidden_channels=16, heads=2, num_layers=LAYERS, **CONFIGS[config])
    pert, pert_ptr = random_perturbations(int(graph["gene"].num_nodes), 4, sizes=(1, 2), seed=4)
    if how == "module":
        model = model.to(dtype)
        run_graph = _graph(dtype)
        pred = _forward(model, kind, run_graph, pert, pert_ptr)
        assert pred.dtype == dtype
    else:
        with torch.autocast("cpu", dtype=dtype):
            pred = _forward(model, kind, graph, pert, pert_ptr)
    pred.float().square().sum().backward()
    reference64 = ReferenceHeteroCell.from_cell_graph(graph, hidden_channels=16, heads=2, num_layers=LAYERS,
                                                      **CONFIGS[config]).double()
    reference64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    graph64 = _graph(torch.float64)
    with torch.no_grad():
        want = _forward(reference64, "reference", graph64, pert, pert_ptr)
    assert_close_scaled(pred, want, model_tolerance(dtype, LAYERS), "predictions")
    with_grad = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(bool(torch.isfinite(g).all()) for _, g in with_grad)
    if how == "autocast":
        assert all(g.dtype == torch.float32 for _, g in with_grad)  # master weights stay float32


def test_fast_caches_follow_dtype_and_autocast():
    graph = _graph()
    torch.manual_seed(0)
    model = HeteroCell.from_cell_graph(graph, hidden_channels=16, heads=2, num_layers=1).eval()
    pert, pert_ptr = random_perturbations(int(graph["gene"].num_nodes), 3, sizes=(1,), seed=5)
    with torch.no_grad():
        fp32 = model(graph, pert, pert_ptr)[1]["z_w"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(graph, pert, pert_ptr)[1]["z_w"]
        assert bf16.dtype == torch.bfloat16  # not the float32 wildtype cached a moment ago
        again = model(graph, pert, pert_ptr)[1]["z_w"]
        assert again.dtype == torch.float32 and torch.equal(again, fp32)
        half = copy.deepcopy(model).half()
        assert half(_graph(torch.float16), pert, pert_ptr)[1]["z_w"].dtype == torch.float16
