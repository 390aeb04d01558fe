"""Vectorised pure-torch perturbation masking from a padded gene -> incident
edge table: the seed's later GPU mask generator, kept as the second baseline
of the pert-mask benchmarks (the first is the per-sample pipeline in
:mod:`stoichconv.reference.perturb`).

A :class:`PaddedIncidenceTable` lists, for every node, the positions of the
edges it touches, padded with -1 to the largest degree. A batch then scatters
False into dense [B, E] keep-masks at the touched positions and compacts them
with ``nonzero``. Outputs equal :func:`stoichconv.perturb.filter_edges` /
``perturb_batch(layout="compacted")`` (tested); the cost is the dense masks
and the padded gathers, which is what the fused kernels avoid.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from stoichconv.data.relations import GENE_GENE_RELATIONS, GPR, METABOLISM
from stoichconv.types import FilteredEdges


class PaddedIncidenceTable:
    """``table[v]`` = positions of the edges with node ``v`` at one of the
    ``rows`` of ``edge_index``, padded with -1 (built once per graph)."""

    def __init__(self, edge_index: Tensor, num_nodes: int, rows=(0, 1)):
        nodes = torch.cat([edge_index[r] for r in rows])
        positions = torch.arange(edge_index.size(1), device=edge_index.device).repeat(len(rows))
        if len(rows) == 2:  # a self-loop is listed once
            unique = torch.cat([torch.ones(edge_index.size(1), dtype=torch.bool, device=edge_index.device),
                                edge_index[0] != edge_index[1]])
            nodes, positions = nodes[unique], positions[unique]
        order = torch.sort(nodes, stable=True).indices
        nodes, positions = nodes[order], positions[order]
        degree = torch.bincount(nodes, minlength=num_nodes)
        start = torch.cumsum(degree, 0) - degree
        slot = torch.arange(nodes.numel(), device=nodes.device) - start[nodes]
        self.table = torch.full((num_nodes, int(degree.max()) if nodes.numel() else 0), -1, dtype=torch.long,
                                device=edge_index.device)
        self.table[nodes, slot] = positions
        self.num_nodes = num_nodes
        self.num_edges = edge_index.size(1)


def _deleted_mask(num_nodes: int, pert: Tensor, pert_ptr: Tensor) -> tuple[Tensor, Tensor]:
    B = pert_ptr.numel() - 1
    sample = torch.repeat_interleave(torch.arange(B, device=pert.device), pert_ptr.diff())
    keep = torch.ones(B, num_nodes, dtype=torch.bool, device=pert.device)
    keep[sample, pert] = False
    return keep, sample


def _edges_touched(table: PaddedIncidenceTable, B: int, pert: Tensor, sample: Tensor) -> Tensor:
    """[B, E] keep-mask: False at every edge touching a deleted node."""
    keep = torch.ones(B, table.num_edges, dtype=torch.bool, device=pert.device)
    positions = table.table[pert]  # [P, max_degree]
    rows = sample.unsqueeze(1).expand_as(positions)
    valid = positions >= 0
    keep[rows[valid], positions[valid]] = False
    return keep


def _ptr(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def filter_edges_padded(table: PaddedIncidenceTable, edge_index: Tensor, pert: Tensor, pert_ptr: Tensor,
                        relabel: bool = True) -> FilteredEdges:
    """Same outputs as :func:`stoichconv.perturb.filter_edges`."""
    N = table.num_nodes
    node_keep, sample = _deleted_mask(N, pert, pert_ptr)
    B = node_keep.size(0)
    edge_keep = _edges_touched(table, B, pert, sample)
    b, e = edge_keep.nonzero(as_tuple=True)
    if relabel:
        new_id = torch.cumsum(node_keep.reshape(-1).long(), 0) - 1
        out = new_id[b * N + edge_index[:, e]]
    else:
        out = edge_index[:, e] + b * N
    return FilteredEdges(out, _ptr(edge_keep.sum(1)), edge_keep.reshape(-1), node_keep.reshape(-1),
                         _ptr(node_keep.sum(1)))


class PaddedPerturber:
    """``perturb_batch(layout="compacted")`` built the seed's way: padded
    tables per relation, built once per cell graph."""

    def __init__(self, cell_graph: HeteroData):
        self.graph = cell_graph
        self.num_genes = int(cell_graph["gene"].num_nodes)
        self.num_reactions = int(cell_graph["reaction"].num_nodes)
        self.num_metabolites = int(cell_graph["metabolite"].num_nodes)
        self.gene_tables = {r: PaddedIncidenceTable(cell_graph[r].edge_index, self.num_genes)
                            for r in GENE_GENE_RELATIONS}
        self.gpr_table = PaddedIncidenceTable(cell_graph[GPR].edge_index, self.num_genes, rows=(0,))

    def __call__(self, pert: Tensor, pert_ptr: Tensor) -> HeteroData:
        g = self.graph
        out = HeteroData()
        for relation, table in self.gene_tables.items():
            f = filter_edges_padded(table, g[relation].edge_index, pert, pert_ptr)
            out[relation].edge_index, out[relation].edge_ptr, out[relation].edge_keep = f.edge_index, f.edge_ptr, f.edge_keep
        gene_keep, sample = _deleted_mask(self.num_genes, pert, pert_ptr)
        B = gene_keep.size(0)
        gpr_index = g[GPR].edge_index
        gpr_hit = ~_edges_touched(self.gpr_table, B, pert, sample)  # [B, E_gpr]
        removed = torch.zeros(B, self.num_reactions, dtype=torch.bool)
        removed.index_put_((torch.arange(B).unsqueeze(1).expand_as(gpr_hit)[gpr_hit], gpr_index[1].expand_as(gpr_hit)[gpr_hit]),
                           torch.ones((), dtype=torch.bool))
        reaction_keep = ~removed
        reaction_id = torch.cumsum(reaction_keep.reshape(-1).long(), 0) - 1
        gene_id = torch.cumsum(gene_keep.reshape(-1).long(), 0) - 1
        # GPR pairs: kept iff their reaction is kept
        gpr_keep = reaction_keep[:, gpr_index[1]]
        b, e = gpr_keep.nonzero(as_tuple=True)
        out[GPR].edge_index = torch.stack([gene_id[b * self.num_genes + gpr_index[0, e]],
                                           reaction_id[b * self.num_reactions + gpr_index[1, e]]])
        out[GPR].edge_ptr, out[GPR].edge_keep = _ptr(gpr_keep.sum(1)), gpr_keep.reshape(-1)
        # metabolic incidences: kept iff their reaction is kept; all metabolites kept
        met = g[METABOLISM]
        inc_keep = reaction_keep[:, met.hyperedge_index[1]]
        b, k = inc_keep.nonzero(as_tuple=True)
        out[METABOLISM].hyperedge_index = torch.stack([met.hyperedge_index[0, k] + b * self.num_metabolites,
                                                       reaction_id[b * self.num_reactions + met.hyperedge_index[1, k]]])
        out[METABOLISM].stoichiometry = met.stoichiometry[k]
        out[METABOLISM].num_edges = int(reaction_keep.sum())
        out[METABOLISM].edge_ptr, out[METABOLISM].edge_keep = _ptr(inc_keep.sum(1)), inc_keep.reshape(-1)
        for node_type, keep in (("gene", gene_keep), ("reaction", reaction_keep),
                                ("metabolite", torch.ones(B, self.num_metabolites, dtype=torch.bool))):
            kept = keep.nonzero()
            store = out[node_type]
            store.batch, store.n_id = kept[:, 0], kept[:, 1]
            store.ptr, store.node_keep, store.num_nodes = _ptr(keep.sum(1)), keep.reshape(-1), kept.size(0)
        out.reaction_keep = reaction_keep
        return out
