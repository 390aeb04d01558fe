"""Per-sample reference of :func:`stoichconv.perturb.perturb_batch` (semantics there and in
:mod:`stoichconv.ops.pert_mask`): the seed's pipeline, one ``HeteroData`` per sample built with
PyG ``subgraph`` / ``bipartite_subgraph``, then ``Batch.from_data_list``, with the reaction row
of the metabolic incidence offset by reaction counts (PyG's default collation offsets it by
metabolite counts). The baseline the fast path is tested and benchmarked against.

The per-op references live in :mod:`stoichconv.reference.pert_mask` (re-exported here)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Batch, HeteroData
from torch_geometric.utils import bipartite_subgraph, subgraph

from stoichconv.data.relations import GENE_GENE_RELATIONS, GPR, METABOLISM
from stoichconv.reference.pert_mask import (
    filter_bipartite_reference,
    filter_edges_reference,
    gene_keep,
    reaction_keep_reference,
    samples,
)

__all__ = [
    "filter_edges_reference",
    "reaction_keep_reference",
    "filter_bipartite_reference",
    "perturb_batch_reference",
    "GENE_GENE_RELATIONS",
    "GPR",
    "METABOLISM",
]


def _checked_perturbations(pert: Tensor, pert_ptr: Tensor, num_genes: int) -> tuple[Tensor, Tensor]:
    """The reference's own minimal checks of a CSR deletion batch (int64 copies)."""
    pert, pert_ptr = torch.as_tensor(pert).long(), torch.as_tensor(pert_ptr).long()
    if pert.dim() != 1 or pert_ptr.dim() != 1 or pert_ptr.numel() < 1:
        raise ValueError("`pert` must be [P] and `pert_ptr` [B + 1]")
    ptr = pert_ptr.tolist()
    if ptr[0] != 0 or ptr[-1] != pert.numel() or any(a > b for a, b in zip(ptr, ptr[1:])):
        raise ValueError("`pert_ptr` must rise from 0 to len(pert)")
    if pert.numel() and (int(pert.min()) < 0 or int(pert.max()) >= num_genes):
        raise ValueError(f"`pert` has gene ids outside [0, {num_genes})")
    return pert, pert_ptr


def perturb_batch_reference(cell_graph: HeteroData, pert: Tensor, pert_ptr: Tensor) -> HeteroData:
    """The compacted perturbed batch of :func:`stoichconv.perturb.perturb_batch`
    (same field names), built sample by sample and collated by PyG."""
    num_genes = int(cell_graph["gene"].num_nodes)
    num_reactions = int(cell_graph["reaction"].num_nodes)
    num_metabolites = int(cell_graph["metabolite"].num_nodes)
    pert, pert_ptr = _checked_perturbations(pert, pert_ptr, num_genes)
    B = pert_ptr.numel() - 1
    if B == 0:
        raise ValueError("perturb_batch_reference needs at least one sample (PyG cannot collate an empty list)")
    gpr_index = cell_graph[GPR].edge_index
    metabolism = cell_graph[METABOLISM]
    reaction_keep = reaction_keep_reference(gpr_index, num_reactions, pert, pert_ptr)
    met_keep = torch.ones(num_metabolites, dtype=torch.bool, device=pert.device)

    data_list = []
    for b, deleted in samples(pert, pert_ptr):
        keep_genes = gene_keep(num_genes, deleted)
        rxn_keep = reaction_keep[b]
        data = HeteroData()
        for node_type, keep in (("gene", keep_genes), ("reaction", rxn_keep), ("metabolite", met_keep)):
            data[node_type].num_nodes = int(keep.sum())
            data[node_type].n_id = keep.nonzero().view(-1)
            data[node_type].node_keep = keep
        for relation in GENE_GENE_RELATIONS:
            ei, _, mask = subgraph(keep_genes, cell_graph[relation].edge_index, relabel_nodes=True,
                                   num_nodes=num_genes, return_edge_mask=True)
            data[relation].edge_index = ei
            data[relation].edge_keep = mask
        ei, _, mask = bipartite_subgraph((keep_genes, rxn_keep), gpr_index, relabel_nodes=True,
                                         size=(num_genes, num_reactions), return_edge_mask=True)
        data[GPR].edge_index = ei
        data[GPR].edge_keep = mask
        ei, _, mask = bipartite_subgraph((met_keep, rxn_keep), metabolism.hyperedge_index, relabel_nodes=True,
                                         size=(num_metabolites, num_reactions), return_edge_mask=True)
        data[METABOLISM].hyperedge_index = ei
        data[METABOLISM].stoichiometry = metabolism.stoichiometry[mask]
        data[METABOLISM].edge_keep = mask
        data_list.append(data)

    batch = Batch.from_data_list(data_list)
    for relation in GENE_GENE_RELATIONS + (GPR, METABOLISM):
        key = "hyperedge_index" if relation == METABOLISM else "edge_index"
        batch[relation].edge_ptr = batch._slice_dict[relation][key].long()
    # The fix: PyG offset the reaction row by metabolite counts; use reaction counts.
    inc = batch[METABOLISM]
    inc_batch = torch.repeat_interleave(torch.arange(B, device=pert.device), inc.edge_ptr.diff())
    shift = batch["reaction"].ptr[:-1] - batch["metabolite"].ptr[:-1]
    inc.hyperedge_index = torch.stack([inc.hyperedge_index[0], inc.hyperedge_index[1] + shift[inc_batch]])
    inc.num_edges = int(batch["reaction"].num_nodes)
    batch.pert = pert
    batch.pert_ptr = pert_ptr
    batch.num_samples = B
    batch.reaction_keep = reaction_keep
    batch.layout = "compacted"
    return batch
