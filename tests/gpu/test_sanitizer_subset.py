"""Small GPU cases for compute-sanitizer (``make gpu-sanitize``, tier 2; they run in tier 1 too).

Each case is small enough to run under memcheck / racecheck / initcheck / synccheck in seconds
and touches every CUDA and Triton kernel the models use, through the public API (so the subset
does not depend on other test files' names): the stoich conv forward and backward (masked, a
hub row of 600 incidences for the long-row path, misaligned inputs), ``perturb_batch`` (edge
filters, reaction keep-mask, bipartite filter), the attention layer (grouped softmax) and one
HeteroCell training step (GATv2) on the small synthetic cell graph. Results are checked against
the references on the CPU, so a run under the sanitizer is also a correctness run.
"""

from __future__ import annotations

import pytest
import torch

from gpu.gpu_helpers import GPU_BACKENDS, GPU_MARKS

pytestmark = GPU_MARKS

DEV = "cuda"
METABOLISM = ("metabolite", "reaction", "metabolite")


def _hub_hypergraph(seed=0, n=40, m=60, nnz=900):
    gen = torch.Generator().manual_seed(seed)
    metabolites = torch.randint(0, n - 1, (nnz,), generator=gen)  # metabolite n - 1: no incidence
    metabolites[:600] = 0  # a hub row: the long-row path
    reactions = torch.randint(0, m - 1, (nnz,), generator=gen)  # reaction m - 1: empty
    reactions[600:660] = 5
    stoich = torch.randn(nnz, generator=gen, dtype=torch.float64)
    return torch.stack([metabolites, reactions]), stoich, n, m


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_stoich_conv_small(backend, misaligned):
    from stoichconv.ops import build_stoich_plan, stoich_conv

    edge_index, stoich, n, m = _hub_hypergraph()
    B, H, C = 3, 2, 20
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(B, n, H, C, generator=gen)
    w = stoich.float().view(1, -1, 1) * torch.rand(B, stoich.numel(), H, generator=gen)
    keep = torch.rand(B, m, generator=gen) > 0.3
    grad = torch.randn(B, n, H, C, generator=gen)
    results = []
    for device, bk in ((DEV, backend), ("cpu", "reference")):
        plan = build_stoich_plan(edge_index.to(device), stoich.float().to(device), n, m)
        args = [t.to(device) for t in (y, w, grad)]
        if misaligned and device == DEV:
            args = [torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape).copy_(t) for t in args]
        yy, ww = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
        out = stoich_conv(yy, ww, plan, keep.to(device), backend=bk)
        results.append([t.cpu() for t in (out, *torch.autograd.grad(out, (yy, ww), args[2]))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_perturb_batch_small(backend):
    from stoichconv.data import random_perturbations
    from stoichconv.perturb import perturb_batch
    from stoichconv.reference.perturb import perturb_batch_reference
    from stoichconv.train import make_small_cell_graph

    graph = make_small_cell_graph(seed=2)
    pert, ptr = random_perturbations(int(graph["gene"].num_nodes), 8, sizes=(0, 1, 2, 4), seed=3)
    got = perturb_batch(graph.to(DEV), pert.to(DEV), ptr.to(DEV), "compacted", backend=backend)
    want = perturb_batch_reference(graph, pert, ptr)
    for rel in (("gene", "physical_interaction", "gene"), ("gene", "regulatory_interaction", "gene"),
                ("gene", "gpr", "reaction")):
        for field in ("edge_index", "edge_ptr", "edge_keep"):
            assert torch.equal(got[rel][field].cpu(), want[rel][field]), (rel, field)
    for field in ("hyperedge_index", "edge_ptr", "edge_keep"):
        assert torch.equal(got[METABOLISM][field].cpu(), want[METABOLISM][field]), field
    assert torch.equal(got.reaction_keep.cpu(), want.reaction_keep)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_layer_small(backend):
    from stoichconv.nn import StoichHypergraphConv as FastConv
    from stoichconv.reference import StoichHypergraphConv as ReferenceConv

    edge_index, stoich, n, m = _hub_hypergraph(seed=4, nnz=700)
    options = dict(is_stoich_gated=True, use_attention=True, attention_mode="node", heads=2)
    torch.manual_seed(0)
    reference = ReferenceConv(8, 6, **options).double()
    fast = FastConv(8, 6, backend=backend, **options).double().to(DEV)
    fast.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    attr = torch.randn(m, 8, generator=gen, dtype=torch.float64)
    want = reference(x, edge_index, stoich, attr, m)
    got = fast(x.to(DEV), edge_index.to(DEV), stoich.to(DEV), attr.to(DEV), m)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11)
    got.sum().backward()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hetero_cell_step_small(backend):
    from stoichconv.data import random_perturbations
    from stoichconv.models import HeteroCell as FastHeteroCell
    from stoichconv.reference import HeteroCell as RefHeteroCell
    from stoichconv.reference.perturb import perturb_batch_reference
    from stoichconv.train import make_small_cell_graph

    graph = make_small_cell_graph(seed=0)
    graph[METABOLISM].stoichiometry = graph[METABOLISM].stoichiometry.double()
    torch.manual_seed(0)
    ref = RefHeteroCell.from_cell_graph(graph, hidden_channels=8, metabolism_to_gene=True).double()
    fast = FastHeteroCell.from_cell_graph(graph, hidden_channels=8, metabolism_to_gene=True,
                                          backend=backend).double().to(DEV)
    fast.load_state_dict(ref.state_dict())
    pert, ptr = random_perturbations(int(graph["gene"].num_nodes), 4, seed=1)
    pred_r, _ = ref(graph, perturb_batch_reference(graph, pert, ptr))
    pred_f, _ = fast(graph.to(DEV), pert.to(DEV), ptr.to(DEV))
    torch.testing.assert_close(pred_f.cpu(), pred_r.detach(), rtol=1e-8, atol=1e-10)
    pred_f.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
