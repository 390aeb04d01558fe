"""perturb_batch (both layouts) against the per-sample PyG reference, on small
random cell graphs and on the real one, and the stoich conv on the compacted
batch against the shared-topology run with the reaction keep-mask."""

import pytest
import torch
from torch_geometric.data import HeteroData

from stoichconv.data import load_cell_graph, random_perturbations
from stoichconv.data.relations import GPR, METABOLISM, NODE_TYPES, PHYSICAL, REGULATORY
from stoichconv.ops.stoich_conv import build_stoich_plan, stoich_propagate
from stoichconv.perturb import perturb_batch
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.testing import random_cell_graph, random_deletions, skip_reason

NODE_FIELDS = ("num_nodes", "n_id", "batch", "ptr", "node_keep")
EDGE_FIELDS = ("edge_index", "edge_ptr", "edge_keep")
INCIDENCE_FIELDS = ("hyperedge_index", "stoichiometry", "num_edges", "edge_ptr", "edge_keep")


# --------------------------------------------------------------------------- inputs


def deletions(num_genes: int, batch_size: int, seed: int, all_genes_of=None):
    """The toolkit's deletion batch (sizes 0..5, unsorted; sample 0 deletes a gene twice, sample
    1 nothing when B >= 3) with, when given, every gene of one reaction (``all_genes_of``) also
    deleted in sample 0."""
    pert, ptr = random_deletions(num_genes, batch_size, seed)
    if batch_size > 0 and all_genes_of is not None:
        extra = torch.as_tensor(all_genes_of, dtype=torch.long)
        pert = torch.cat([pert[: ptr[1]], extra, pert[ptr[1]:]])
        ptr = torch.cat([ptr[:1], ptr[1:] + extra.numel()])
    return pert, ptr


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def assert_batches_equal(out, ref):
    for t in NODE_TYPES:
        for field in NODE_FIELDS:
            assert _equal(out[t][field], ref[t][field]), (t, field)
    for rel in (PHYSICAL, REGULATORY, GPR):
        for field in EDGE_FIELDS:
            assert _equal(out[rel][field], ref[rel][field]), (rel, field)
    for field in INCIDENCE_FIELDS:
        assert _equal(out[METABOLISM][field], ref[METABOLISM][field]), (METABOLISM, field)
    for field in ("pert", "pert_ptr", "num_samples", "reaction_keep", "layout"):
        assert _equal(out[field], ref[field]), field


def full_from_compacted(ref, cell_graph) -> dict:
    """The full layout predicted from the compacted reference: output node i of
    type t is node ``n_id[i]`` of sample ``batch[i]``, i.e. full id ``batch*N + n_id``."""
    B = ref.num_samples
    sizes = {t: int(cell_graph[t].num_nodes) for t in NODE_TYPES}

    def to_full(t, ids):
        return ref[t].batch[ids] * sizes[t] + ref[t].n_id[ids]

    expected = {}
    for t in NODE_TYPES:
        N = sizes[t]
        expected[t] = dict(num_nodes=B * N, n_id=torch.arange(N).repeat(B),
                           batch=torch.arange(B).repeat_interleave(N), ptr=torch.arange(B + 1) * N,
                           node_keep=ref[t].node_keep)
    for rel in (PHYSICAL, REGULATORY, GPR):
        ei = ref[rel].edge_index
        expected[rel] = dict(edge_index=torch.stack([to_full(rel[0], ei[0]), to_full(rel[2], ei[1])]),
                             edge_ptr=ref[rel].edge_ptr, edge_keep=ref[rel].edge_keep)
    inc = ref[METABOLISM]
    expected[METABOLISM] = dict(
        hyperedge_index=torch.stack([to_full("metabolite", inc.hyperedge_index[0]),
                                     to_full("reaction", inc.hyperedge_index[1])]),
        stoichiometry=inc.stoichiometry, num_edges=B * sizes["reaction"], edge_ptr=inc.edge_ptr,
        edge_keep=inc.edge_keep)
    return expected


def assert_full_layout(full, ref, cell_graph):
    expected = full_from_compacted(ref, cell_graph)
    for key, fields in expected.items():
        for field, value in fields.items():
            assert _equal(full[key][field], value), (key, field)
    assert full.layout == "full"
    assert torch.equal(full.reaction_keep, ref.reaction_keep)


# --------------------------------------------------------------------------- small graphs


@pytest.mark.parametrize("batch_size", [1, 3, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_both_layouts_match_reference_small(batch_size, seed):
    graph = random_cell_graph(seed)
    pert, ptr = deletions(40, batch_size, seed + 10, all_genes_of=[1, 2])
    ref = perturb_batch_reference(graph, pert, ptr)
    compacted = perturb_batch(graph, pert, ptr, layout="compacted")
    assert_batches_equal(compacted, ref)
    assert_full_layout(perturb_batch(graph, pert, ptr, layout="full"), ref, graph)
    # reaction 0 needs genes 1 and 2, both deleted in sample 0
    assert not bool(ref.reaction_keep[0, 0]) and not bool(compacted.reaction_keep[0, 0])
    assert bool(compacted.reaction_keep[:, -3:].all())  # reactions without GPR genes stay
    assert compacted["metabolite"].num_nodes == batch_size * 30  # metabolites all kept


def test_reaction_row_offset_by_reaction_counts():
    graph = random_cell_graph(3)
    pert, ptr = deletions(40, 4, 3, all_genes_of=[1, 2])
    out = perturb_batch(graph, pert, ptr)
    inc = out[METABOLISM]
    rows = inc.hyperedge_index
    assert int(rows[1].max()) < out["reaction"].num_nodes == inc.num_edges
    # every incidence's reaction belongs to the incidence's own sample
    inc_batch = torch.repeat_interleave(torch.arange(4), inc.edge_ptr.diff())
    assert torch.equal(out["reaction"].batch[rows[1]], inc_batch)
    assert torch.equal(out["metabolite"].batch[rows[0]], inc_batch)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    skip_reason("triton", "cpu") is not None, reason=str(skip_reason("triton", "cpu"))))])
@pytest.mark.parametrize("layout", ["compacted", "full"])
def test_every_backend_matches_compiled(layout, backend):
    """Every op of the pass runs on the backend asked for (Triton included); same batch."""
    graph = random_cell_graph(4)
    pert, ptr = deletions(40, 5, 4)
    a = perturb_batch(graph, pert, ptr, layout=layout, backend="cpu")
    b = perturb_batch(graph, pert, ptr, layout=layout, backend=backend)
    assert_batches_equal(a, b)


@pytest.mark.parametrize("layout", ["compacted", "full"])
def test_empty_batch_and_empty_sets(layout):
    graph = random_cell_graph(5)
    out = perturb_batch(graph, torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), layout=layout)
    assert out.num_samples == 0 and out.reaction_keep.shape == (0, 25)
    for t in NODE_TYPES:
        assert out[t].num_nodes == 0 and out[t].ptr.tolist() == [0] and out[t].node_keep.numel() == 0
    for rel in (PHYSICAL, REGULATORY, GPR):
        assert out[rel].edge_index.shape == (2, 0) and out[rel].edge_ptr.tolist() == [0]
    assert out[METABOLISM].hyperedge_index.shape == (2, 0) and out[METABOLISM].num_edges == 0
    # two samples deleting nothing: two copies of the wildtype
    out = perturb_batch(graph, torch.empty(0, dtype=torch.long), torch.zeros(3, dtype=torch.long), layout=layout)
    phys = graph[PHYSICAL].edge_index
    assert torch.equal(out[PHYSICAL].edge_index, torch.cat([phys, phys + 40], dim=1))
    assert out[METABOLISM].hyperedge_index.size(1) == 2 * 90
    assert bool(out.reaction_keep.all())


def test_perturb_batch_bad_input():
    graph = random_cell_graph(6)
    pert, ptr = torch.tensor([3]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="`layout` must be one of"):
        perturb_batch(graph, pert, ptr, layout="dense")
    with pytest.raises(TypeError, match="`cell_graph` must be a torch_geometric HeteroData"):
        perturb_batch({"gene": None}, pert, ptr)
    with pytest.raises(ValueError, match=r"`pert` has gene id 40 outside \[0, num_nodes=40\)"):
        perturb_batch(graph, torch.tensor([40]), ptr)
    with pytest.raises(ValueError, match="`pert_ptr` must start at 0"):
        perturb_batch(graph, pert, torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="`pert` must hold integer indices"):
        perturb_batch(graph, pert.float(), ptr)
    broken = random_cell_graph(6)
    broken[GPR].edge_index = broken[GPR].edge_index.clone()
    broken[GPR].edge_index[1, 0] = 25
    with pytest.raises(ValueError, match=r"`cell_graph\[\('gene', 'gpr', 'reaction'\)\].edge_index\[1\]` has id 25 >= num_reactions = 25"):
        perturb_batch(broken, pert, ptr)
    # without the Python value checks the kernel still refuses
    with pytest.raises(RuntimeError, match="has id 25 outside"):
        perturb_batch(broken, pert, ptr, backend="cpu", validate_graph=False)


# --------------------------------------------------------------------------- real cell graph


@pytest.fixture(scope="module")
def cell_graph() -> HeteroData:
    return load_cell_graph(seed=0)


def _real_deletions(cell_graph, batch_size, seed):
    gpr = cell_graph[GPR].edge_index
    counts = torch.bincount(gpr[1], minlength=cell_graph["reaction"].num_nodes)
    reaction = int(torch.nonzero(counts >= 2)[0])
    genes = gpr[0][gpr[1] == reaction].tolist()
    return deletions(cell_graph["gene"].num_nodes, batch_size, seed, all_genes_of=genes), reaction


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_both_layouts_match_reference_real(cell_graph, batch_size):
    (pert, ptr), reaction = _real_deletions(cell_graph, batch_size, batch_size)
    ref = perturb_batch_reference(cell_graph, pert, ptr)
    assert_batches_equal(perturb_batch(cell_graph, pert, ptr, layout="compacted"), ref)
    assert_full_layout(perturb_batch(cell_graph, pert, ptr, layout="full"), ref, cell_graph)
    assert not bool(ref.reaction_keep[0, reaction])


def test_random_perturbations_real_compacted(cell_graph):
    pert, ptr = random_perturbations(cell_graph["gene"].num_nodes, 3, seed=7)
    assert_batches_equal(perturb_batch(cell_graph, pert, ptr), perturb_batch_reference(cell_graph, pert, ptr))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stoich_conv_on_compacted_equals_masked_shared_topology(cell_graph, batch_size):
    (pert, ptr), reaction = _real_deletions(cell_graph, batch_size, 100 + batch_size)
    batch = perturb_batch(cell_graph, pert, ptr, layout="compacted")
    inc = cell_graph[METABOLISM]
    N, M, nnz, H, C = cell_graph["metabolite"].num_nodes, cell_graph["reaction"].num_nodes, inc.stoichiometry.numel(), 2, 3
    g = torch.Generator().manual_seed(batch_size)
    y = torch.randn(batch_size, N, H, C, generator=g, dtype=torch.float64)
    weight = inc.stoichiometry.double()[None, :, None] * (0.5 + torch.rand(batch_size, nnz, H, generator=g, dtype=torch.float64))

    shared_plan = build_stoich_plan(inc.hyperedge_index, inc.stoichiometry, N, M)
    shared = stoich_propagate(y, weight, shared_plan, batch.reaction_keep)

    out_inc = batch[METABOLISM]
    plan = build_stoich_plan(out_inc.hyperedge_index, out_inc.stoichiometry, batch["metabolite"].num_nodes,
                             out_inc.num_edges)
    met = batch["metabolite"]
    inc_batch = torch.repeat_interleave(torch.arange(batch_size), out_inc.edge_ptr.diff())
    edge_id = out_inc.edge_keep.view(batch_size, nnz).nonzero()[:, 1]
    assert torch.equal(out_inc.stoichiometry, inc.stoichiometry[edge_id])
    compact = stoich_propagate(y[met.batch, met.n_id].unsqueeze(0), weight[inc_batch, edge_id].unsqueeze(0), plan)
    torch.testing.assert_close(compact[0], shared[met.batch, met.n_id], rtol=1e-12, atol=1e-12)
    # the masked reaction matters: without the mask the shared run differs
    assert not torch.allclose(stoich_propagate(y, weight, shared_plan), shared)
