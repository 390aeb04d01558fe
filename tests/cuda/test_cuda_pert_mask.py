"""CUDA kernels of the perturbation-masking operators against the CPU
kernels and the pure-PyTorch references (exact integer/bool equality).
Marked ``cuda``: skipped only when no GPU is visible."""

import pytest
import torch

import stoichconv
from stoichconv.ops import pert_mask
from stoichconv.reference.perturb import (
    filter_bipartite_reference,
    filter_edges_reference,
    reaction_keep_reference,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]

DEV = "cuda"
OPS = ("filter_edges", "reaction_keep", "filter_bipartite")


@pytest.fixture(autouse=True)
def _needs_kernels():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stoichconv::{op}", "CUDA"), op


def random_graph(num_nodes, num_edges, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_nodes, (2, num_edges), generator=gen)


def random_pert(num_nodes, batch, seed, max_size=4):
    """CSR deletions with repeats, unsorted ids, empty samples."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_size + 1, (batch,), generator=gen)
    if batch > 1:
        sizes[0] = 0
    pert = torch.randint(0, num_nodes, (int(sizes.sum()),), generator=gen)
    if pert.numel() > 1:
        pert[1] = pert[0]  # a repeated id (may fall into two samples: harmless)
    pert_ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return pert, pert_ptr


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert torch.equal(g.cpu(), w.cpu())


def run_raw(op, *args):
    return getattr(torch.ops.stoichconv, op)(*args)


def to_dev(*ts):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("N,E,B", [(50, 300, 7), (40, 5000, 3), (13, 0, 4), (10, 20, 0), (30, 2048, 2)])
def test_filter_edges_matches_cpu_and_reference(relabel, N, E, B):
    edge_index = random_graph(N, E, seed=E + B)
    pert, pert_ptr = random_pert(N, B, seed=N)
    want = run_raw("filter_edges", edge_index, N, pert, pert_ptr, relabel)
    got = run_raw("filter_edges", *to_dev(edge_index, N, pert, pert_ptr, relabel))
    assert_same(got, want)
    ref = filter_edges_reference(edge_index, N, pert, pert_ptr, relabel=relabel)
    assert_same(got, tuple(ref))


@pytest.mark.parametrize("B", [0, 1, 9])
def test_reaction_keep_matches_cpu_and_reference(B):
    G, R, E = 60, 45, 200
    gen = torch.Generator().manual_seed(B)
    gpr = torch.stack([torch.randint(0, G, (E,), generator=gen), torch.randint(0, R - 5, (E,), generator=gen)])
    pert, pert_ptr = random_pert(G, B, seed=3, max_size=6)
    want = run_raw("reaction_keep", gpr, R, pert, pert_ptr)
    got = run_raw("reaction_keep", *to_dev(gpr, R, pert, pert_ptr))
    assert_same((got,), (want,))
    assert_same((got,), (reaction_keep_reference(gpr, R, pert, pert_ptr),))
    if B > 0:
        assert bool(got[:, R - 5:].all())  # reactions without GPR genes are never removed


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("masks", ["both", "src", "dst", "none"])
def test_filter_bipartite_matches_cpu_and_reference(relabel, masks):
    S, D, E, B = 35, 20, 3000, 5
    gen = torch.Generator().manual_seed(7)
    edge_index = torch.stack([torch.randint(0, S, (E,), generator=gen), torch.randint(0, D, (E,), generator=gen)])
    src_keep = torch.rand(B, S, generator=gen) > 0.2 if masks in ("both", "src") else None
    dst_keep = torch.rand(B, D, generator=gen) > 0.3 if masks in ("both", "dst") else None
    want = run_raw("filter_bipartite", edge_index, S, D, B, src_keep, dst_keep, relabel)
    got = run_raw("filter_bipartite", *to_dev(edge_index, S, D, B, src_keep, dst_keep, relabel))
    assert_same(got, want)
    ref = filter_bipartite_reference(edge_index, S, D, B, src_keep, dst_keep, relabel=relabel)
    assert_same(got, tuple(ref))


def test_cell_graph_batch_matches_cpu():
    from stoichconv.data import load_cell_graph, random_perturbations

    g = load_cell_graph()
    num_genes = g["gene"].num_nodes
    pert, pert_ptr = random_perturbations(num_genes, 32, seed=1)
    for rel in ("physical_interaction", "regulatory_interaction"):
        ei = g["gene", rel, "gene"].edge_index
        for relabel in (True, False):
            want = run_raw("filter_edges", ei, num_genes, pert, pert_ptr, relabel)
            got = run_raw("filter_edges", *to_dev(ei, num_genes, pert, pert_ptr, relabel))
            assert_same(got, want)
    gpr = g["gene", "gpr", "reaction"].edge_index
    R = g["reaction"].num_nodes
    keep = run_raw("reaction_keep", *to_dev(gpr, R, pert, pert_ptr))
    assert_same((keep,), (run_raw("reaction_keep", gpr, R, pert, pert_ptr),))
    inc = g["metabolite", "reaction", "metabolite"].hyperedge_index
    M = g["metabolite"].num_nodes
    want = run_raw("filter_bipartite", inc, M, R, 32, None, keep.cpu(), True)
    got = run_raw("filter_bipartite", *to_dev(inc, M, R, 32, None, keep, True))
    assert_same(got, want)


def test_public_wrappers_pick_cuda():
    edge_index = random_graph(30, 200, seed=1).to(DEV)
    pert, pert_ptr = to_dev(*random_pert(30, 4, seed=2))
    out = pert_mask.filter_edges(edge_index, 30, pert, pert_ptr, backend="cuda")
    want = pert_mask.filter_edges(edge_index.cpu(), 30, pert.cpu(), pert_ptr.cpu(), backend="cpu")
    assert_same(tuple(out), tuple(want))


def test_deterministic_across_runs():
    edge_index = random_graph(200, 20000, seed=5)
    pert, pert_ptr = random_pert(200, 16, seed=6, max_size=20)
    args = to_dev(edge_index, 200, pert, pert_ptr, True)
    first = run_raw("filter_edges", *args)
    for _ in range(3):
        assert_same(run_raw("filter_edges", *args), tuple(t.cpu() for t in first))


@pytest.mark.parametrize("B", [0, 3])
def test_opcheck(B):
    edge_index = random_graph(20, 60, seed=1).to(DEV)
    pert, pert_ptr = to_dev(*random_pert(20, B, seed=2))
    keep = torch.rand(B, 20, generator=torch.Generator().manual_seed(0)).gt(0.3).to(DEV)
    for relabel in (True, False):
        torch.library.opcheck(torch.ops.stoichconv.filter_edges.default, (edge_index, 20, pert, pert_ptr, relabel))
        torch.library.opcheck(torch.ops.stoichconv.filter_bipartite.default,
                              (edge_index, 20, 20, B, keep, None, relabel))
    torch.library.opcheck(torch.ops.stoichconv.reaction_keep.default, (edge_index, 20, pert, pert_ptr))


# ---------------------------------------------------------------- bad input


def test_raw_ops_reject_bad_values_after_the_sizing_sync():
    edge_index = random_graph(10, 30, seed=0).to(DEV)
    pert = torch.tensor([1, 2], device=DEV)
    with pytest.raises(RuntimeError, match="`pert_ptr` must start at 0"):
        run_raw("filter_edges", edge_index, 10, pert, torch.tensor([0, 1, 1], device=DEV), True)
    with pytest.raises(RuntimeError, match="`pert` has a gene id outside"):
        run_raw("filter_edges", edge_index, 10, torch.tensor([1, 12], device=DEV), torch.tensor([0, 2], device=DEV), True)
    bad_src = torch.tensor([[0, 7], [1, 2]], device=DEV)  # 7 >= num_nodes = 5
    with pytest.raises(RuntimeError, match=r"`edge_index\[0\]` has an id outside"):
        run_raw("filter_edges", bad_src, 5, pert, torch.tensor([0, 2], device=DEV), True)
    bad_dst = torch.tensor([[0, 1], [0, 3]], device=DEV)  # 3 >= num_dst = 2
    with pytest.raises(RuntimeError, match=r"`edge_index\[1\]` has an id outside"):
        run_raw("filter_bipartite", bad_dst, 10, 2, 1, None, None, True)


def test_raw_ops_reject_device_mismatch():
    edge_index = random_graph(10, 30, seed=0)
    pert, pert_ptr = torch.tensor([1, 2]), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="`edge_index` must be a CUDA tensor, got cpu"):
        run_raw("filter_edges", edge_index, 10, pert.to(DEV), pert_ptr.to(DEV), True)
    with pytest.raises(RuntimeError, match="`pert_ptr` must be a CUDA tensor, got cpu"):
        run_raw("reaction_keep", edge_index.to(DEV), 10, pert.to(DEV), pert_ptr)
    with pytest.raises(RuntimeError, match="`src_keep` is on cpu"):
        run_raw("filter_bipartite", edge_index.to(DEV), 10, 10, 1, torch.ones(1, 10, dtype=torch.bool), None, True)


def test_wrappers_reject_device_mismatch():
    edge_index = random_graph(10, 30, seed=0)
    pert, pert_ptr = torch.tensor([1, 2], device=DEV), torch.tensor([0, 2], device=DEV)
    with pytest.raises(ValueError, match="`edge_index` is on cpu"):
        pert_mask.filter_edges(edge_index, 10, pert, pert_ptr)
    with pytest.raises(ValueError, match="`pert_ptr` is on cpu"):
        pert_mask.reaction_keep(edge_index.to(DEV), 10, pert, pert_ptr.cpu())
    with pytest.raises(stoichconv.BackendUnavailableError):
        pert_mask.filter_edges(edge_index.to(DEV), 10, pert, pert_ptr, backend="cpu")
