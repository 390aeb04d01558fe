"""Batched gene-deletion perturbations of a cell graph.

:func:`perturb_batch` turns the wildtype cell graph and a CSR batch of gene
deletions (``pert``, ``pert_ptr``) into a model-ready ``HeteroData`` batch in
one of two layouts; :func:`filter_edges`, :func:`reaction_keep` and
:func:`filter_bipartite` are the operators it is made of (semantics in
:mod:`stoichconv.ops.pert_mask`).

Output fields of :func:`perturb_batch`:

* per node type ``t`` in gene / reaction / metabolite: ``num_nodes``, ``n_id``
  (wildtype id of each output node), ``batch`` (sample of each output node),
  ``ptr`` [B + 1], ``node_keep`` [B * N_t] bool (full-layout mask, True = kept);
* gene-gene relations and ``(gene, gpr, reaction)``: ``edge_index``,
  ``edge_ptr`` [B + 1], ``edge_keep`` [B * E] bool;
* ``(metabolite, reaction, metabolite)``: ``hyperedge_index`` [2, nnz_out]
  (row 0 metabolite, row 1 reaction), ``stoichiometry``, ``num_edges`` (total
  reactions of the output layout), ``edge_ptr``, ``edge_keep``;
* batch level: ``pert``, ``pert_ptr``, ``num_samples``, ``reaction_keep``
  [B, N_r] bool, ``layout``.

``layout="compacted"``: removed nodes and edges are gone and nodes are
renumbered as per-sample PyG ``subgraph`` + ``Batch.from_data_list`` would
(the metabolic incidence's reaction row offset by reaction counts).
``layout="full"``: node v of sample b is ``b * N + v``, every node present
(removed ones flagged by ``node_keep``), only surviving edges listed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from stoichconv.data.relations import GENE_GENE_RELATIONS, GPR, METABOLISM, NODE_TYPES
from stoichconv.ops.pert_mask import filter_bipartite, filter_edges, reaction_keep
from stoichconv.ops.pert_mask.validation import check_edge_index, check_perturbations
from stoichconv.types import FilteredBipartite, FilteredEdges

__all__ = [
    "FilteredBipartite",
    "FilteredEdges",
    "LAYOUTS",
    "filter_bipartite",
    "filter_edges",
    "perturb_batch",
    "reaction_keep",
]

LAYOUTS = ("compacted", "full")


def _set_nodes(store, keep: Tensor, B: int, N: int, compacted: bool, node_ptr: Tensor | None = None,
               all_kept: bool = False) -> None:
    """Fill num_nodes / n_id / batch / ptr / node_keep of one node type from
    its full-layout keep-mask [B * N] (``all_kept``: the mask is all True, so
    both layouts number the nodes alike and no mask scan is needed)."""
    device = keep.device
    if compacted and not all_kept:
        kept = keep.view(B, N).nonzero()
        store.batch = kept[:, 0].contiguous()
        store.n_id = kept[:, 1].contiguous()
        if node_ptr is None:
            counts = keep.view(B, N).sum(dim=1)
            node_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        store.ptr = node_ptr
    else:
        store.n_id = torch.arange(N, device=device).repeat(B)
        store.batch = torch.arange(B, device=device).repeat_interleave(N)
        store.ptr = torch.arange(B + 1, device=device) * N
    store.num_nodes = int(store.n_id.numel())
    store.node_keep = keep


def _graph_tensor(cell_graph: HeteroData, relation: tuple, key: str) -> Tensor:
    if relation not in cell_graph.edge_types:
        raise ValueError(f"`cell_graph` lacks the relation {relation!r} (it has {cell_graph.edge_types})")
    value = cell_graph[relation].get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"`cell_graph[{relation!r}]` lacks the tensor `{key}`")
    return value


def _num_nodes(cell_graph: HeteroData, node_type: str) -> int:
    if node_type not in cell_graph.node_types or cell_graph[node_type].num_nodes is None:
        raise ValueError(f"`cell_graph` lacks the node type {node_type!r} (or its num_nodes)")
    return int(cell_graph[node_type].num_nodes)


def perturb_batch(cell_graph: HeteroData, pert: Tensor, pert_ptr: Tensor, layout: str = "compacted", *,
                  backend: str = "auto", validate_graph: bool = True) -> HeteroData:
    """Apply a batch of gene deletions to the wildtype ``cell_graph``.

    Args:
        cell_graph: the wildtype (``stoichconv.data.load_cell_graph``): node types gene,
            reaction, metabolite; relations ``(gene, physical_interaction, gene)``,
            ``(gene, regulatory_interaction, gene)``, ``(gene, gpr, reaction)`` (``edge_index``)
            and ``(metabolite, reaction, metabolite)`` (``hyperedge_index``, ``stoichiometry``).
        pert, pert_ptr: CSR gene deletions (sample b deletes ``pert[pert_ptr[b]:pert_ptr[b+1]]``).
        layout: ``"compacted"`` (PyG-collate numbering) or ``"full"`` (``b * N + v``).
        backend: see :mod:`stoichconv.backends`; every op of the pass (``filter_edges``,
            ``reaction_keep``, ``filter_bipartite``) runs on it.
        validate_graph: check the wildtype index values (host syncs on GPU); pass False
            for a graph already checked (every backend's kernels still check the bounds, on the device).

    Returns:
        a ``HeteroData`` with the fields listed in the module docstring.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(cell_graph, HeteroData):
        raise TypeError(f"`cell_graph` must be a torch_geometric HeteroData, got {type(cell_graph).__name__}")
    compacted = layout == "compacted"
    num_genes, num_reactions, num_metabolites = (_num_nodes(cell_graph, t) for t in NODE_TYPES)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_genes)
    B = pert_ptr.numel() - 1
    device = pert.device
    # Everything is validated once here; the ops below skip their host-syncing value checks.
    indices = {}
    for relation, key, num_src, num_dst in (
        (GENE_GENE_RELATIONS[0], "edge_index", num_genes, num_genes),
        (GENE_GENE_RELATIONS[1], "edge_index", num_genes, num_genes),
        (GPR, "edge_index", num_genes, num_reactions),
        (METABOLISM, "hyperedge_index", num_metabolites, num_reactions),
    ):
        name = f"cell_graph[{relation!r}].{key}"
        indices[relation] = check_edge_index(name, _graph_tensor(cell_graph, relation, key).to(device),
                                             num_src, num_dst, device,
                                              src_name=f"num_{relation[0]}s", dst_name=f"num_{relation[2]}s",
                                              values=validate_graph)

    out = HeteroData()
    gene_keep = node_ptr = None
    for relation in GENE_GENE_RELATIONS:
        filtered = filter_edges(indices[relation], num_genes, pert, pert_ptr, relabel=compacted, backend=backend,
                                validate=False)
        store = out[relation]
        store.edge_index = filtered.edge_index
        store.edge_ptr = filtered.edge_ptr
        store.edge_keep = filtered.edge_keep
        gene_keep, node_ptr = filtered.node_keep, filtered.node_ptr
    gpr_index = indices[GPR]
    rkeep = reaction_keep(gpr_index, num_reactions, pert, pert_ptr, backend=backend, validate=False)

    _set_nodes(out["gene"], gene_keep, B, num_genes, compacted, node_ptr)
    _set_nodes(out["reaction"], rkeep.view(-1), B, num_reactions, compacted)
    _set_nodes(out["metabolite"], torch.ones(B * num_metabolites, dtype=torch.bool, device=device), B,
               num_metabolites, compacted, all_kept=True)

    gpr = filter_bipartite(gpr_index, num_genes, num_reactions, B, gene_keep.view(B, num_genes), rkeep,
                           relabel=compacted, backend=backend, validate=False)
    out[GPR].edge_index = gpr.edge_index
    out[GPR].edge_ptr = gpr.edge_ptr
    out[GPR].edge_keep = gpr.edge_keep

    stoichiometry = _graph_tensor(cell_graph, METABOLISM, "stoichiometry")
    nnz = indices[METABOLISM].size(1)
    if not stoichiometry.is_floating_point() or stoichiometry.dim() != 1 or stoichiometry.numel() != nnz:
        raise ValueError(f"`cell_graph[{METABOLISM!r}].stoichiometry` must be a float tensor [nnz] = [{nnz}] "
                         f"(one coefficient per incidence), got {stoichiometry.dtype} {tuple(stoichiometry.shape)}")
    inc = filter_bipartite(indices[METABOLISM], num_metabolites, num_reactions, B, None, rkeep,
                           relabel=compacted, backend=backend, validate=False)
    store = out[METABOLISM]
    store.hyperedge_index = inc.edge_index
    store.stoichiometry = stoichiometry.to(device)[inc.edge_id]
    store.num_edges = int(out["reaction"].num_nodes)
    store.edge_ptr = inc.edge_ptr
    store.edge_keep = inc.edge_keep

    out.pert = pert
    out.pert_ptr = pert_ptr
    out.num_samples = B
    out.reaction_keep = rkeep
    out.layout = layout
    return out
