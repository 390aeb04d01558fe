"""Fast HeteroCell: the reference model (:mod:`stoichconv.reference.hetero_cell`) on the
project's kernels, with identical parameter names and shapes (a ``state_dict`` loads either way)
and identical numbers.

``forward(cell_graph, pert, pert_ptr)`` takes the wildtype and the perturbations only
(``pert`` [P] gene ids, ``pert_ptr`` [B + 1], the CSR layout of :mod:`stoichconv.ops.pert_mask`) and
builds everything else on the device:

* **Perturbation masks** from the pert-mask operators (:mod:`stoichconv.ops.pert_mask`):
  ``filter_edges(..., relabel=False)`` gives the gene keep-mask and the gene-gene edge keep-masks
  of the full (shared-topology) layout, ``reaction_keep`` the [B, N_r] reaction keep-mask; a GPR
  pair survives iff its reaction does.
* **Layout.** Node features live in the full layout (row ``b * N + v``; removed nodes keep a row
  that no edge touches). Removed nodes are excluded from every graph-mode LayerNorm statistic and
  from the attentional pooling, so the results equal the reference's compacted batch. Layer-1
  inputs are the same for every sample (embeddings, the per-node preprocessor), so they are
  computed once on the wildtype rows and indexed, never copied B times.
* **Gene-gene and GPR relations**: :func:`stoichconv.ops.gatv2_attention` (GATv2 attention and
  aggregation, fused forward and backward kernels on CPU, the edge-chunked reference elsewhere)
  over per-batch :class:`~stoichconv.types.EdgeSet` s built from the keep-masks.
* **Metabolism**: the shared-topology fast :class:`stoichconv.nn.StoichHypergraphConv` on
  ``x`` [B, N_m, C] with ``reaction_keep`` [B, N_r] (never a B-times copy of the incidence
  structure), ``hyperedge_attr`` = the layer-0 reaction embeddings (the seed's parity quirk).
* **Wildtype pass**: computed once per forward; when not training it is cached, keyed on the
  parameters' version counters, the cell graph's tensors, dtype and device (``train()``,
  ``load_state_dict`` or any in-place parameter update invalidates it).

By default the fast model computes everything the reference computes (the GPR and metabolism
relations included, although in the seed's design they never reach the prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from stoichconv.backends import check_backend_name, resolve
from stoichconv.data.relations import GENE_GENE_RELATIONS, GPR, METABOLISM, NODE_TYPES, REV_GPR
from stoichconv.nn.stoich_hypergraph_conv import StoichHypergraphConv as FastStoichHypergraphConv
from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.ops.pert_mask import filter_edges, reaction_keep
from stoichconv.reference.hetero_cell import HeteroCell as ReferenceHeteroCell
from stoichconv.types import EdgeSet

__all__ = ["HeteroCell", "CellGraphPlan", "build_cell_graph_plan"]


# ----------------------------------------------------------------------------------------------
# Structure plan of the wildtype and per-batch edge sets
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SortedRelation:
    src: Tensor  # [E] source ids, edges sorted (stably) by destination
    dst: Tensor  # [E] destination ids, non-decreasing
    perm: Tensor  # [E] wildtype position of each sorted edge
    num_src: int
    num_dst: int


@dataclass(frozen=True)
class CellGraphPlan:
    """Preprocessed wildtype structure (built once per cell graph and device)."""

    relations: dict  # relation -> _SortedRelation (gene-gene, GPR, reversed GPR)
    gene_edge_index: dict  # gene-gene relation -> wildtype edge_index (for the pert-mask ops)
    gpr_index: Tensor
    gpr_reaction: Tensor  # [E_gpr] reaction of each wildtype GPR pair
    incidence: Tensor
    stoich: Tensor
    summary_matrix: Tensor  # CSR [N_r, N_m]: B_e * s_k (metabolism_to_gene)
    num_nodes: dict


def _sort_relation(edge_index: Tensor, num_src: int, num_dst: int) -> _SortedRelation:
    perm = torch.sort(edge_index[1], stable=True).indices
    return _SortedRelation(edge_index[0, perm].contiguous(), edge_index[1, perm].contiguous(), perm, num_src, num_dst)


def build_cell_graph_plan(cell_graph: HeteroData, device: torch.device, dtype: torch.dtype) -> CellGraphPlan:
    Ng, Nr, Nm = (int(cell_graph[t].num_nodes) for t in NODE_TYPES)
    relations, gene_edges = {}, {}
    for rel in GENE_GENE_RELATIONS:
        ei = cell_graph[rel].edge_index.to(device).long()
        gene_edges[rel] = ei
        relations[rel] = _sort_relation(ei, Ng, Ng)
    gpr = cell_graph[GPR].edge_index.to(device).long()
    relations[GPR] = _sort_relation(gpr, Ng, Nr)
    relations[REV_GPR] = _sort_relation(gpr.flip(0), Nr, Ng)
    met = cell_graph[METABOLISM]
    incidence = met.hyperedge_index.to(device)
    stoich = met.stoichiometry.to(device)
    s = stoich.to(dtype)
    inv = torch.zeros(Nr, dtype=dtype, device=device).index_add_(0, incidence[1].long(), s.abs()).reciprocal()
    inv = inv.masked_fill(torch.isinf(inv), 0.0)
    values = inv[incidence[1].long()] * s
    order = torch.sort(incidence[1], stable=True).indices
    crow = torch.zeros(Nr + 1, dtype=torch.long, device=device)
    crow[1:] = torch.cumsum(torch.bincount(incidence[1].long(), minlength=Nr), 0)
    summary = torch.sparse_csr_tensor(crow, incidence[0, order].long(), values[order], (Nr, Nm),
                                      check_invariants=False)
    return CellGraphPlan(relations, gene_edges, gpr, gpr[1].contiguous(), incidence, stoich, summary,
                         {"gene": Ng, "reaction": Nr, "metabolite": Nm})


def _edge_set(rel: _SortedRelation, keep: Optional[Tensor], num_samples: int, shared_src: bool,
              shared_dst: bool) -> EdgeSet:
    """Surviving edges of all samples in output-row order. ``keep`` [B, E] (wildtype edge order,
    None = all kept); sources / destinations indexed locally (wildtype row) when their features are
    shared by all samples, else in the full layout ``b * N + v``."""
    device = rel.src.device
    E = rel.src.numel()
    B = num_samples
    if keep is None:
        sample = torch.arange(B, device=device).repeat_interleave(E)
        k = torch.arange(E, device=device).repeat(B)
    else:
        sample, k = keep[:, rel.perm].nonzero(as_tuple=True)
    src, dst = rel.src[k], rel.dst[k]
    row = sample * rel.num_dst + dst
    num_rows = B * rel.num_dst
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=num_rows), 0)
    return EdgeSet(
        src=src if shared_src else sample * rel.num_src + src,
        dst=dst if shared_dst else row,
        row=row,
        crow=crow,
        num_rows=num_rows,
    )


@dataclass
class _Batch:
    num_samples: int
    gene_keep: Optional[Tensor]  # [B * N_g] bool (None: all kept)
    reaction_keep: Optional[Tensor]  # [B, N_r] bool
    edge_keep: dict  # relation -> [B, E] bool or None


# ----------------------------------------------------------------------------------------------
# Masked graph-mode LayerNorm and pooling
# ----------------------------------------------------------------------------------------------
def _graph_layer_norm(norm, x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``torch_geometric.nn.LayerNorm`` (graph mode, no batch vector) over the kept rows only."""
    if isinstance(norm, torch.nn.Identity):
        return x
    if keep is None:
        return norm(x)
    k = keep.to(x.dtype).unsqueeze(-1)
    count = k.sum() * x.size(-1)
    x = x - (x * k).sum() / count
    std = ((x * x * k).sum() / count).sqrt()
    out = x / (std + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight + norm.bias
    return out


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class HeteroCell(ReferenceHeteroCell):
    """Fast HeteroCell; same constructor, parameters and outputs as
    :class:`stoichconv.reference.hetero_cell.HeteroCell`, but
    ``forward(cell_graph, pert, pert_ptr)`` (see the module docstring).

    ``backend`` selects the backend of every op the model runs (pert masks, GATv2, the
    metabolism conv; see :mod:`stoichconv.backends`); an op that lacks it runs its reference."""

    stoich_conv_class = FastStoichHypergraphConv

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_name(backend)
        for conv in self.convs:
            conv.convs[METABOLISM].conv.backend = backend
        self._plan_key = None
        self._plan: Optional[CellGraphPlan] = None
        self._wildtype_key = None
        self._wildtype: Optional[Tensor] = None

    # -- caches ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self._wildtype_key, self._wildtype = None, None
        return super().train(mode)

    def _get_plan(self, cell_graph: HeteroData, device, dtype) -> CellGraphPlan:
        tensors = [cell_graph[rel].edge_index for rel in GENE_GENE_RELATIONS + (GPR,)]
        tensors += [cell_graph[METABOLISM].hyperedge_index, cell_graph[METABOLISM].stoichiometry]
        key = (tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), str(device), dtype,
               tuple(int(cell_graph[t].num_nodes) for t in NODE_TYPES))
        if self._plan is None or key != self._plan_key:
            self._plan = build_cell_graph_plan(cell_graph, device, dtype)
            self._plan_key = key
        return self._plan

    def _check_sizes(self, cell_graph: HeteroData) -> None:
        for t, n in self.num_nodes.items():
            if int(cell_graph[t].num_nodes) != n:
                raise ValueError(f"`cell_graph` has {int(cell_graph[t].num_nodes)} {t} nodes but the model was built for {n}")

    # -- perturbation masks ---------------------------------------------------------------
    def perturbation_masks(self, plan: CellGraphPlan, pert: Tensor, pert_ptr: Tensor) -> _Batch:
        Ng, Nr = plan.num_nodes["gene"], plan.num_nodes["reaction"]
        B = int(pert_ptr.numel()) - 1
        edge_keep, gene_keep = {}, None
        for rel in GENE_GENE_RELATIONS:
            ei = plan.gene_edge_index[rel]
            res = filter_edges(ei, Ng, pert, pert_ptr, relabel=False,
                               backend=resolve("filter_edges", self.backend, pert.device, strict=False))
            edge_keep[rel] = res.edge_keep.view(B, ei.size(1))
            gene_keep = res.node_keep
        rkeep = reaction_keep(plan.gpr_index, Nr, pert, pert_ptr,
                              backend=resolve("reaction_keep", self.backend, pert.device, strict=False))
        gpr_keep = rkeep[:, plan.gpr_reaction]  # a GPR pair survives iff its reaction does
        edge_keep[GPR] = gpr_keep
        edge_keep[REV_GPR] = gpr_keep
        return _Batch(B, gene_keep, rkeep, edge_keep)

    # -- one pass ---------------------------------------------------------------------------
    def _encode(self, plan: CellGraphPlan, batch: _Batch) -> Tensor:
        """Gene features [B * N_g, C] in the full layout."""
        B = batch.num_samples
        C, H = self.hidden_channels, self.heads
        Ng, Nr, Nm = plan.num_nodes["gene"], plan.num_nodes["reaction"], plan.num_nodes["metabolite"]
        rkeep_rows = None if batch.reaction_keep is None else batch.reaction_keep.reshape(-1)
        gene_keep = batch.gene_keep

        x_gene = self.preprocessor(self.gene_embedding.weight)  # shared rows [N_g, C]
        x_reaction = self.reaction_embedding.weight  # shared rows [N_r, C]
        reaction_attr = x_reaction
        x_met = self.metabolite_embedding.weight.unsqueeze(0).expand(B, Nm, C)
        shared = True
        edge_sets = {}

        def edges(rel, shared_src, shared_dst):
            key = (rel, shared_src, shared_dst)
            if key not in edge_sets:
                edge_sets[key] = _edge_set(plan.relations[rel], batch.edge_keep.get(rel), B, shared_src, shared_dst)
            return edge_sets[key]

        def gat(wrapper, x_src, x_dst, es, out_heads, out_ch):
            conv = wrapper.conv
            x_l = conv.lin_l(x_src).view(-1, out_heads, out_ch)
            x_r = conv.lin_r(x_dst).view(-1, out_heads, out_ch)
            out = gatv2_attention(x_l, x_r, conv.att.view(out_heads, out_ch), es, conv.negative_slope,
                                  backend=resolve("gatv2", self.backend, x_l.device, strict=False))
            return out.reshape(es.num_rows, out_heads * out_ch) + conv.bias

        def post(wrapper, out, keep):
            out = wrapper.proj(out)
            out = _graph_layer_norm(wrapper.norm, out, keep)
            return wrapper.dropout(wrapper.act(out))

        for layer, hetero in enumerate(self.convs):
            rel_convs = hetero.convs
            gene_out = None
            for rel in GENE_GENE_RELATIONS:
                w = rel_convs[rel]
                out = post(w, gat(w, x_gene, x_gene, edges(rel, shared, shared), H, C // H), gene_keep)
                gene_out = out if gene_out is None else gene_out + out
            w = rel_convs[GPR]
            reaction_out = post(w, gat(w, x_gene, x_reaction, edges(GPR, shared, shared), H, C), rkeep_rows)
            w = rel_convs[METABOLISM]
            met = w.conv(x_met, plan.incidence, plan.stoich, hyperedge_attr=reaction_attr, num_edges=Nr,
                         reaction_keep=batch.reaction_keep)  # [B, N_m, H * C]
            met_out = post(w, met.reshape(B * Nm, H * C), None)
            if self.metabolism_to_gene:
                m = met_out.view(B, Nm, C).permute(1, 0, 2).reshape(Nm, B * C)
                summary = (plan.summary_matrix @ m).view(Nr, B, C).permute(1, 0, 2).reshape(B * Nr, C)
                w = self.rev_gpr_convs[layer]
                out = post(w, gat(w, reaction_out + summary, x_gene, edges(REV_GPR, False, shared), H, C // H),
                           gene_keep)
                gene_out = gene_out + out
            x_gene, x_reaction, x_met = gene_out, reaction_out, met_out.view(B, Nm, C)
            shared = False
        return x_gene

    def _pool(self, x: Tensor, B: int, keep: Optional[Tensor]) -> Tensor:
        """AttentionalAggregation per sample over the kept genes."""
        pool = self.pool
        gate = pool.gate_nn(x).view(B, -1)
        value = pool.nn(x).view(B, gate.size(1), -1)
        if keep is not None:
            gate = gate.masked_fill(~keep.view(B, -1), float("-inf"))
        gate = (gate - gate.max(dim=1, keepdim=True).values).exp()
        gate = gate / (gate.sum(dim=1, keepdim=True) + 1e-16)
        return (gate.unsqueeze(-1) * value).sum(dim=1)

    def _wildtype_embedding(self, plan: CellGraphPlan) -> Tensor:
        """z_w [1, C]: computed once per forward; cached in eval mode under ``torch.no_grad()``
        (inference), keyed on every parameter's identity and version counter and on the plan."""
        if self.training or torch.is_grad_enabled():
            self._wildtype_key, self._wildtype = None, None
            return self._pool(self._encode(plan, _Batch(1, None, None, {})), 1, None)
        key = (tuple((id(p), p._version, p.dtype, str(p.device)) for p in self.parameters()), self._plan_key)
        if self._wildtype is None or key != self._wildtype_key:
            self._wildtype = self._pool(self._encode(plan, _Batch(1, None, None, {})), 1, None)
            self._wildtype_key = key
        return self._wildtype

    def forward(self, cell_graph: HeteroData, pert: Tensor, pert_ptr: Tensor) -> tuple[Tensor, dict]:
        """``(predictions [B, 2], {"z_w", "z_i", "z_p"})`` for the wildtype ``cell_graph`` and the
        perturbation batch ``(pert, pert_ptr)`` (on the model's device)."""
        self._check_sizes(cell_graph)
        weight = self.gene_embedding.weight
        device, dtype = weight.device, weight.dtype
        if not isinstance(pert, Tensor) or not isinstance(pert_ptr, Tensor):
            raise TypeError("`pert` and `pert_ptr` must be tensors")
        if pert_ptr.dim() != 1 or pert_ptr.numel() < 2:
            raise ValueError(f"`pert_ptr` must be [B + 1] with B >= 1, got shape {tuple(pert_ptr.shape)}")
        pert, pert_ptr = pert.to(device), pert_ptr.to(device)
        plan = self._get_plan(cell_graph, device, dtype)
        batch = self.perturbation_masks(plan, pert, pert_ptr)
        z_w = self._wildtype_embedding(plan)
        gene_keep = batch.gene_keep.view(batch.num_samples, -1)
        z_i = self._pool(self._encode(plan, batch), batch.num_samples, gene_keep)
        z_p = z_w - z_i
        return self.head(z_p), {"z_w": z_w, "z_i": z_i, "z_p": z_p}
