"""Per-sample references of the batched pert-mask ops (semantics: :mod:`stoichconv.ops.pert_mask`):
the seed's pipeline, PyG ``subgraph`` / ``bipartite_subgraph`` per sample, one ``Data`` per
sample, then ``Batch.from_data_list``. The baselines every backend is tested and benchmarked
against, and the fallback when ``stoichconv._C`` is missing. Inputs are taken as validated by
the caller (the public ops validate before dispatching here)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.utils import bipartite_subgraph, subgraph

from stoichconv.types import FilteredBipartite, FilteredEdges, KeptNodes

__all__ = ["filter_bipartite_reference", "filter_edges_reference", "kept_nodes_reference", "reaction_keep_reference"]


def gene_keep(num_nodes: int, deleted: Tensor) -> Tensor:
    keep = torch.ones(num_nodes, dtype=torch.bool, device=deleted.device)
    keep[deleted] = False
    return keep


def samples(pert: Tensor, pert_ptr: Tensor):
    ptr = pert_ptr.tolist()
    for b in range(len(ptr) - 1):
        yield b, pert[ptr[b]:ptr[b + 1]]


def filter_edges_reference(edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor,
                           relabel: bool = True) -> FilteredEdges:
    """``filter_edges`` by PyG ``subgraph`` per sample and ``Batch.from_data_list``."""
    pert, pert_ptr = pert.long(), pert_ptr.long()
    device = edge_index.device
    B = pert_ptr.numel() - 1
    data_list, node_keep, edge_keep = [], [], []
    for _, deleted in samples(pert, pert_ptr):
        keep = gene_keep(num_nodes, deleted)
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
    for b, deleted in samples(pert, pert_ptr):
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


def kept_nodes_reference(keep: Tensor) -> KeptNodes:
    """The kept nodes of ``keep`` [B, N]: the columns of ``torch.nonzero`` and the per-sample
    offsets of their counts."""
    kept = keep.nonzero()
    counts = keep.sum(1)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return KeptNodes(kept[:, 0].contiguous(), kept[:, 1].contiguous(), ptr)
