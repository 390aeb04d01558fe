import pytest
import torch
from torch_geometric.data import HeteroData

from stoichconv.data import load_cell_graph, load_yeast_gem, random_perturbations

PHYSICAL = ("gene", "physical_interaction", "gene")
REGULATORY = ("gene", "regulatory_interaction", "gene")
GPR = ("gene", "gpr", "reaction")
METABOLISM = ("metabolite", "reaction", "metabolite")


@pytest.fixture(scope="module")
def graph() -> HeteroData:
    return load_cell_graph(seed=0)


# --------------------------------------------------------------------------- cell graph


def test_node_sizes(graph):
    assert set(graph.node_types) == {"gene", "reaction", "metabolite"}
    for node_type, size in [("gene", 6607), ("reaction", 4881), ("metabolite", 2534)]:
        assert graph[node_type].num_nodes == size
        assert len(graph[node_type].node_ids) == size
        assert len(set(graph[node_type].node_ids)) == size


def test_edge_sizes_and_dtypes(graph):
    assert set(graph.edge_types) == {PHYSICAL, REGULATORY, GPR, METABOLISM}
    assert graph[PHYSICAL].edge_index.shape == (2, 144211)
    assert graph[REGULATORY].edge_index.shape == (2, 16095)
    assert graph[GPR].edge_index.shape == (2, 5450)
    assert graph[METABOLISM].hyperedge_index.shape == (2, 20960)
    assert graph[METABOLISM].stoichiometry.shape == (20960,)
    assert graph[METABOLISM].stoichiometry.dtype == torch.float32
    assert graph[METABOLISM].num_edges == 4881
    for index in [
        graph[PHYSICAL].edge_index,
        graph[REGULATORY].edge_index,
        graph[GPR].edge_index,
        graph[METABOLISM].hyperedge_index,
    ]:
        assert index.dtype == torch.long and index.is_contiguous()


def test_ids_in_range(graph):
    def in_range(row, n):
        return int(row.min()) >= 0 and int(row.max()) < n

    for edge_type in (PHYSICAL, REGULATORY):
        assert in_range(graph[edge_type].edge_index.flatten(), 6607)
    assert in_range(graph[GPR].edge_index[0], 6607)
    assert in_range(graph[GPR].edge_index[1], 4881)
    assert in_range(graph[METABOLISM].hyperedge_index[0], 2534)
    assert in_range(graph[METABOLISM].hyperedge_index[1], 4881)


def test_physical_pairs_once_with_self_loops(graph):
    row, col = graph[PHYSICAL].edge_index
    assert (row <= col).all()  # each unordered pair stored as (min, max)
    keys = row * 6607 + col
    assert keys.unique().numel() == keys.numel()
    num_loops = int((row == col).sum())
    assert 1000 <= num_loops <= 5000


def test_regulatory_no_duplicate_ordered_pairs(graph):
    row, col = graph[REGULATORY].edge_index
    keys = row * 6607 + col
    assert keys.unique().numel() == keys.numel()
    # directed: the graph is not stored symmetrically
    reverse = col * 6607 + row
    assert torch.isin(reverse, keys).float().mean() < 0.5


def test_heavy_tailed_degrees(graph):
    row, col = graph[PHYSICAL].edge_index
    degree = torch.bincount(torch.cat([row, col]), minlength=6607).double()
    assert degree.max() > 20 * degree.median()
    out_degree = torch.bincount(graph[REGULATORY].edge_index[0], minlength=6607)
    regulators = out_degree[out_degree > 0]
    assert regulators.numel() < 1000  # few regulators
    assert out_degree.max() > 20 * regulators.double().median()
    assert out_degree.max() > 1000


def test_reproducible(graph):
    same = load_cell_graph(seed=0)
    other = load_cell_graph(seed=1)
    for edge_type in (PHYSICAL, REGULATORY):
        assert torch.equal(same[edge_type].edge_index, graph[edge_type].edge_index)
        assert not torch.equal(other[edge_type].edge_index, graph[edge_type].edge_index)
    assert torch.equal(other[GPR].edge_index, graph[GPR].edge_index)
    assert same["gene"].node_ids == graph["gene"].node_ids == other["gene"].node_ids


def test_gem_genes_and_gpr_mapping(graph):
    net = load_yeast_gem()
    gene_ids = graph["gene"].node_ids
    assert gene_ids == sorted(gene_ids)
    assert set(net.gene_names) <= set(gene_ids)
    synthetic = [g for g in gene_ids if g not in set(net.gene_names)]
    assert len(synthetic) == 6607 - 1161
    assert all(g.startswith("SYN") for g in synthetic)
    cell_names = [gene_ids[i] for i in graph[GPR].edge_index[0].tolist()]
    gem_names = [net.gene_names[i] for i in net.gpr_index[0].tolist()]
    assert cell_names == gem_names
    assert torch.equal(graph[GPR].edge_index[1], net.gpr_index[1])


def test_metabolism_matches_yeast_gem(graph):
    net = load_yeast_gem()
    assert torch.equal(graph[METABOLISM].hyperedge_index, net.incidence)
    assert torch.equal(graph[METABOLISM].stoichiometry, net.stoich)
    assert graph["reaction"].node_ids == net.reaction_names
    assert graph["metabolite"].node_ids == net.metabolite_names
    # the graph owns its tensors: editing it leaves the cached network intact
    graph_copy = load_cell_graph(seed=0)
    graph_copy[METABOLISM].stoichiometry.zero_()
    assert (net.stoich != 0).all()


# --------------------------------------------------------------------------- perturbations


def _samples(pert, pert_ptr):
    return [pert[pert_ptr[b] : pert_ptr[b + 1]] for b in range(pert_ptr.numel() - 1)]


def test_perturbation_shapes_and_sizes():
    pert, pert_ptr = random_perturbations(6607, 32, seed=3)
    assert pert.dtype == torch.long and pert_ptr.dtype == torch.long
    assert pert_ptr.shape == (33,)
    assert int(pert_ptr[0]) == 0 and int(pert_ptr[-1]) == pert.numel()
    counts = pert_ptr.diff()
    assert set(counts.tolist()) <= {1, 2, 3}
    assert int(pert.min()) >= 0 and int(pert.max()) < 6607


def test_perturbation_distinct_within_sample():
    pert, pert_ptr = random_perturbations(4, 2000, sizes=(3, 4), seed=0)
    counts = pert_ptr.diff()
    assert set(counts.tolist()) == {3, 4}
    for sample in _samples(pert, pert_ptr):
        assert sample.unique().numel() == sample.numel()


def test_perturbation_distributions_uniform():
    pert, pert_ptr = random_perturbations(10, 30000, sizes=(0, 2, 5), seed=1)
    counts = torch.bincount(pert_ptr.diff(), minlength=6)
    for size in (0, 2, 5):
        assert abs(int(counts[size]) - 10000) < 500
    assert int(counts[1]) == int(counts[3]) == int(counts[4]) == 0
    per_gene = torch.bincount(pert, minlength=10).double()
    expected = (2 * 10000 + 5 * 10000) / 10
    assert ((per_gene - expected).abs() < 0.05 * expected).all()


def test_perturbation_reproducible():
    a = random_perturbations(6607, 64, seed=7)
    b = random_perturbations(6607, 64, seed=7)
    c = random_perturbations(6607, 64, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_perturbation_empty_batch():
    pert, pert_ptr = random_perturbations(6607, 0)
    assert pert.dtype == torch.long and pert.numel() == 0
    assert pert_ptr.dtype == torch.long and pert_ptr.tolist() == [0]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_genes": 0, "batch_size": 4}, "num_genes"),
        ({"num_genes": -3, "batch_size": 4}, "num_genes"),
        ({"num_genes": 10, "batch_size": -1}, "batch_size"),
        ({"num_genes": 10, "batch_size": 4, "sizes": ()}, "sizes"),
        ({"num_genes": 10, "batch_size": 4, "sizes": (1, 11)}, "sizes"),
        ({"num_genes": 10, "batch_size": 4, "sizes": (-1, 2)}, "sizes"),
    ],
)
def test_perturbation_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        random_perturbations(**kwargs)
