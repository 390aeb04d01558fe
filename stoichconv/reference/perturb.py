"""Per-sample reference of the batched perturbation masking (the semantics are
stated once, in :mod:`stoichconv.ops.pert_mask`): the seed's pipeline, PyG
``subgraph`` / ``bipartite_subgraph`` per sample, one ``Data`` / ``HeteroData``
per sample, then ``Batch.from_data_list``, with the reaction row of the
metabolic incidence offset by reaction counts (PyG's default collation
offsets it by metabolite counts). The baseline every backend is tested and
benchmarked against, and the fallback when ``stoichconv._C`` is missing."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data, HeteroData
from torch_geometric.utils import bipartite_subgraph, subgraph

from stoichconv.ops.pert_mask import FilteredBipartite, FilteredEdges, check_perturbations

__all__ = [
    "filter_edges_reference",
    "reaction_keep_reference",
    "filter_bipartite_reference",
    "perturb_batch_reference",
    "GENE_GENE_RELATIONS",
    "GPR",
    "METABOLISM",
]

GENE_GENE_RELATIONS = (("gene", "physical_interaction", "gene"), ("gene", "regulatory_interaction", "gene"))
GPR = ("gene", "gpr", "reaction")
METABOLISM = ("metabolite", "reaction", "metabolite")


def _gene_keep(num_nodes: int, deleted: Tensor) -> Tensor:
    keep = torch.ones(num_nodes, dtype=torch.bool, device=deleted.device)
    keep[deleted] = False
    return keep


def _samples(pert: Tensor, pert_ptr: Tensor):
    ptr = pert_ptr.tolist()
    for b in range(len(ptr) - 1):
        yield b, pert[ptr[b]:ptr[b + 1]]


def filter_edges_reference(edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor,
                           relabel: bool = True) -> FilteredEdges:
    """``filter_edges`` by PyG ``subgraph`` per sample and ``Batch.from_data_list``."""
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_nodes)
    device = edge_index.device
    B = pert_ptr.numel() - 1
    data_list, node_keep, edge_keep = [], [], []
    for _, deleted in _samples(pert, pert_ptr):
        keep = _gene_keep(num_nodes, deleted)
        ei, _, mask = subgraph(keep, edge_index, relabel_nodes=relabel, num_nodes=num_nodes, return_edge_mask=True)
        data_list.append(Data(edge_index=ei, num_nodes=int(keep.sum()) if relabel else num_nodes))
        node_keep.append(keep)
        edge_keep.append(mask)
    if B == 0:
        zero = torch.zeros(1, dtype=torch.long, device=device)
        return FilteredEdges(edge_index.new_empty(2, 0), zero, torch.zeros(0, dtype=torch.bool, device=device),
                             torch.zeros(0, dtype=torch.bool, device=device), zero.clone())
    batch = Batch.from_data_list(data_list)
    counts = torch.tensor([d.edge_index.size(1) for d in data_list], dtype=torch.long, device=device)
    kept = torch.stack([k.sum() for k in node_keep]).to(device)
    return FilteredEdges(
        batch.edge_index.long(),
        torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        torch.cat(edge_keep),
        torch.cat(node_keep),
        torch.cat([kept.new_zeros(1), kept.cumsum(0)]),
    )


def reaction_keep_reference(gpr_index: Tensor, num_reactions: int, pert: Tensor, pert_ptr: Tensor) -> Tensor:
    """[B, num_reactions] bool: ``isin`` over the GPR gene row, sample by sample."""
    B = pert_ptr.numel() - 1
    keep = torch.ones(B, num_reactions, dtype=torch.bool, device=gpr_index.device)
    for b, deleted in _samples(pert, pert_ptr):
        keep[b, gpr_index[1][torch.isin(gpr_index[0], deleted)]] = False
    return keep


def filter_bipartite_reference(edge_index: Tensor, num_src: int, num_dst: int, num_samples: int,
                               src_keep: Optional[Tensor] = None, dst_keep: Optional[Tensor] = None,
                               relabel: bool = True) -> FilteredBipartite:
    """``filter_bipartite`` by PyG ``bipartite_subgraph`` per sample, offsets
    per side from the kept counts of that side."""
    device = edge_index.device
    ones_src = torch.ones(num_src, dtype=torch.bool, device=device)
    ones_dst = torch.ones(num_dst, dtype=torch.bool, device=device)
    rows, masks, counts = [], [], [0]
    src_offset = dst_offset = 0
    for b in range(num_samples):
        sk = ones_src if src_keep is None else src_keep[b]
        dk = ones_dst if dst_keep is None else dst_keep[b]
        ei, _, mask = bipartite_subgraph((sk, dk), edge_index, relabel_nodes=relabel, size=(num_src, num_dst),
                                         return_edge_mask=True)
        offset = torch.tensor([[src_offset], [dst_offset]], device=device)
        rows.append(ei + offset)
        masks.append(mask)
        counts.append(counts[-1] + ei.size(1))
        src_offset += int(sk.sum()) if relabel else num_src
        dst_offset += int(dk.sum()) if relabel else num_dst
    if num_samples == 0:
        return FilteredBipartite(edge_index.new_empty(2, 0), torch.zeros(1, dtype=torch.long, device=device),
                                 torch.zeros(0, dtype=torch.bool, device=device), edge_index.new_empty(0))
    keep = torch.cat(masks)
    return FilteredBipartite(
        torch.cat(rows, dim=1).long(),
        torch.tensor(counts, dtype=torch.long, device=device),
        keep,
        keep.view(num_samples, -1).nonzero()[:, 1] if edge_index.size(1) > 0 else edge_index.new_empty(0),
    )


def perturb_batch_reference(cell_graph: HeteroData, pert: Tensor, pert_ptr: Tensor) -> HeteroData:
    """The compacted perturbed batch of :func:`stoichconv.perturb.perturb_batch`
    (same field names), built sample by sample and collated by PyG."""
    num_genes = int(cell_graph["gene"].num_nodes)
    num_reactions = int(cell_graph["reaction"].num_nodes)
    num_metabolites = int(cell_graph["metabolite"].num_nodes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_genes)
    B = pert_ptr.numel() - 1
    if B == 0:
        raise ValueError("perturb_batch_reference needs at least one sample (PyG cannot collate an empty list)")
    gpr_index = cell_graph[GPR].edge_index
    metabolism = cell_graph[METABOLISM]
    reaction_keep = reaction_keep_reference(gpr_index, num_reactions, pert, pert_ptr)
    met_keep = torch.ones(num_metabolites, dtype=torch.bool, device=pert.device)

    data_list = []
    for b, deleted in _samples(pert, pert_ptr):
        gene_keep = _gene_keep(num_genes, deleted)
        rxn_keep = reaction_keep[b]
        data = HeteroData()
        for node_type, keep in (("gene", gene_keep), ("reaction", rxn_keep), ("metabolite", met_keep)):
            data[node_type].num_nodes = int(keep.sum())
            data[node_type].n_id = keep.nonzero().view(-1)
            data[node_type].node_keep = keep
        for relation in GENE_GENE_RELATIONS:
            ei, _, mask = subgraph(gene_keep, cell_graph[relation].edge_index, relabel_nodes=True,
                                   num_nodes=num_genes, return_edge_mask=True)
            data[relation].edge_index = ei
            data[relation].edge_keep = mask
        ei, _, mask = bipartite_subgraph((gene_keep, rxn_keep), gpr_index, relabel_nodes=True,
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
