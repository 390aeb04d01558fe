"""The fast HeteroCell with ``backend="triton"`` runs its whole step on Triton kernels (pert
masks, GATv2, the metabolism conv and its attention softmax, forward and backward) and equals the
reference model in float64. On CPU tensors this runs through the Triton interpreter
(``TRITON_INTERPRET=1``), so the graph is tiny; on a GPU the same test runs on CUDA tensors."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from stoichconv.data import random_perturbations
from stoichconv.models.hetero_cell import HeteroCell
from stoichconv.reference.hetero_cell import HeteroCell as ReferenceHeteroCell
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.testing import random_cell_graph, skip_reason

DEVICES = [pytest.param(d, marks=pytest.mark.skipif(skip_reason("triton", d) is not None,
                                                    reason=str(skip_reason("triton", d))))
           for d in ("cpu", "cuda")]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_model_equals_reference_and_runs_no_other_kernel(device):
    graph = random_cell_graph(seed=3, num_genes=12, num_reactions=8, num_metabolites=10)
    met = graph["metabolite", "reaction", "metabolite"]
    met.stoichiometry = met.stoichiometry.double()
    graph = graph.to(device)
    options = dict(hidden_channels=4, heads=2, num_layers=1, metabolism_to_gene=True, metabolism_gated=True)
    torch.manual_seed(0)
    reference = ReferenceHeteroCell.from_cell_graph(graph, **options).double().to(device)
    fast = HeteroCell.from_cell_graph(graph, backend="triton", **options).double().to(device)
    fast.load_state_dict(reference.state_dict())
    pert, pert_ptr = random_perturbations(12, 2, sizes=(1, 2), seed=4)
    pert, pert_ptr = pert.to(device), pert_ptr.to(device)
    with profile() as prof:
        got, _ = fast(graph, pert, pert_ptr)
        got.square().sum().backward()
    ops = {e.name for e in prof.events() if e.name.startswith("stoichconv::")}
    assert ops and all(name.startswith("stoichconv::triton_") for name in ops), sorted(ops)
    for op in ("filter_edges", "reaction_keep", "gatv2_forward", "gatv2_backward", "stoich_conv_forward",
               "stoich_conv_backward", "incidence_attention", "incidence_attention_backward"):
        assert f"stoichconv::triton_{op}" in ops, (op, sorted(ops))
    want, _ = reference(graph, perturb_batch_reference(graph, pert, pert_ptr))
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    params = dict(fast.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert params[name].grad is None, name
            continue
        scale = max(float(p.grad.abs().max()), 1e-12)
        assert float((params[name].grad - p.grad).abs().max()) <= 1e-6 * scale + 1e-10, name


@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("device", DEVICES)
def test_triton_layer_equals_reference_and_runs_no_other_kernel(device, mode):
    from stoichconv.nn import StoichHypergraphConv
    from stoichconv.reference import StoichHypergraphConv as ReferenceConv

    g = torch.Generator().manual_seed(1)
    N, M, nnz, F = 7, 5, 16, 4
    edge_index = torch.stack([torch.randint(0, N, (nnz,), generator=g), torch.randint(0, M, (nnz,), generator=g)])
    stoich = torch.randn(nnz, generator=g, dtype=torch.float64)
    x = torch.randn(N, F, generator=g, dtype=torch.float64)
    attr = torch.randn(M, F, generator=g, dtype=torch.float64)
    edge_index, stoich, x, attr = (t.to(device) for t in (edge_index, stoich, x, attr))
    options = dict(is_stoich_gated=True, use_attention=True, attention_mode=mode, heads=2)
    torch.manual_seed(0)
    reference = ReferenceConv(F, 3, **options).double().to(device)
    layer = StoichHypergraphConv(F, 3, backend="triton", **options).double().to(device)
    layer.load_state_dict(reference.state_dict())
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with profile() as prof:
        got = layer(xs[0], edge_index, stoich, hyperedge_attr=attr, num_edges=M)
        got.square().sum().backward()
    ops = {e.name for e in prof.events() if e.name.startswith("stoichconv::")}
    assert ops and all(name.startswith("stoichconv::triton_") for name in ops), sorted(ops)
    want = reference(xs[1], edge_index, stoich, hyperedge_attr=attr, num_edges=M)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-9, atol=1e-12)
    params = dict(layer.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
