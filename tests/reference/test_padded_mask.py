"""The padded-table baseline (the seed's vectorised mask) gives exactly the
fused ops' outputs, so the benchmarks compare like with like."""

import pytest
import torch

from stoichconv.data import load_cell_graph, random_perturbations
from stoichconv.perturb import filter_edges, perturb_batch
from stoichconv.reference.padded_mask import PaddedIncidenceTable, PaddedPerturber, filter_edges_padded

RELATIONS = [("gene", "physical_interaction", "gene"), ("gene", "regulatory_interaction", "gene"), ("gene", "gpr", "reaction")]
METABOLISM = ("metabolite", "reaction", "metabolite")


@pytest.fixture(scope="module")
def graph():
    return load_cell_graph(seed=0)


@pytest.mark.parametrize("relabel", [True, False])
def test_filter_edges_padded_matches_fused_op_on_random_graph(relabel):
    gen = torch.Generator().manual_seed(0)
    N, E = 12, 40
    edge_index = torch.randint(0, N - 2, (2, E), generator=gen)  # nodes N-2, N-1 isolated
    edge_index[:, :3] = torch.tensor([[1, 1, 4], [1, 1, 2]])  # self-loop repeated, multi-edge
    pert = torch.tensor([1, 1, 5, 3, 0, 7, 2])  # a duplicate deletion
    pert_ptr = torch.tensor([0, 3, 3, 7])  # an empty deletion set
    got = filter_edges_padded(PaddedIncidenceTable(edge_index, N), edge_index, pert, pert_ptr, relabel=relabel)
    want = filter_edges(edge_index, N, pert, pert_ptr, relabel=relabel)
    for g, w, name in zip(got, want, want._fields):
        assert torch.equal(g, w), name


def test_padded_perturber_matches_perturb_batch(graph):
    pert, pert_ptr = random_perturbations(graph["gene"].num_nodes, 4, sizes=(1, 2, 3), seed=1)
    gpr = graph["gene", "gpr", "reaction"].edge_index
    pert = torch.cat([pert, gpr[0, :1], gpr[0, :1]])  # a metabolic gene, deleted twice in the last sample
    pert_ptr = torch.cat([pert_ptr[:-1], pert_ptr[-1:] + 2])
    got, want = PaddedPerturber(graph)(pert, pert_ptr), perturb_batch(graph, pert, pert_ptr)
    assert not bool(want.reaction_keep.all())
    for relation in RELATIONS:
        for key in ("edge_index", "edge_ptr", "edge_keep"):
            assert torch.equal(got[relation][key], want[relation][key]), (relation, key)
    for key in ("hyperedge_index", "stoichiometry", "edge_ptr", "edge_keep"):
        assert torch.equal(got[METABOLISM][key], want[METABOLISM][key]), key
    assert got[METABOLISM].num_edges == want[METABOLISM].num_edges
    for node_type in ("gene", "reaction", "metabolite"):
        for key in ("n_id", "batch", "ptr", "node_keep"):
            assert torch.equal(got[node_type][key], want[node_type][key]), (node_type, key)
    assert torch.equal(got.reaction_keep, want.reaction_keep)
