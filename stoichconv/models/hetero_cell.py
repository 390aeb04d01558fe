"""Fast HeteroCell: the reference model (:mod:`stoichconv.reference.hetero_cell`) on the
project's kernels, with identical parameter names and shapes (a ``state_dict`` loads either way)
and identical numbers.

``forward(cell_graph, pert, pert_ptr)`` takes the wildtype and the perturbations only
(``pert`` [P] gene ids, ``pert_ptr`` [B + 1], the CSR layout of ``shared/spec/pert_mask.md``) and
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
* **Gene-gene and GPR relations**: :func:`gatv2_attention`, GATv2 attention and aggregation with
  a fused C++ forward on CPU (:mod:`stoichconv.ops.gatv2`) and an edge-chunked hand-written
  backward: the per-edge tensors ([E, H, C/H]) exist only one chunk at a time (recomputed in
  the backward), the aggregation is a CSR sparse-dense product per head; only ``x_l``, ``x_r``
  and the attention coefficients [E, H] are kept for the backward.
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
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import HeteroData

from stoichconv.nn.stoich_hypergraph_conv import StoichHypergraphConv as FastStoichHypergraphConv
from stoichconv.ops.gatv2 import gatv2_backward, gatv2_forward, gatv2_op_available
from stoichconv.reference.hetero_cell import (
    GPR,
    METABOLISM,
    PHYSICAL,
    REGULATORY,
    HeteroCell as ReferenceHeteroCell,
)

__all__ = ["HeteroCell", "gatv2_attention", "EdgeSet", "CellGraphPlan", "build_cell_graph_plan"]

GENE_RELATIONS = (PHYSICAL, REGULATORY)


# ----------------------------------------------------------------------------------------------
# GATv2 attention + aggregation
# ----------------------------------------------------------------------------------------------
@dataclass
class EdgeSet:
    """Edges of one relation, sorted by output row: ``src`` indexes ``x_l``, ``dst`` indexes
    ``x_r``, ``row`` the output row (non-decreasing) with ``crow`` [num_rows + 1] its CSR
    pointer. ``dst`` and ``row`` differ when the destination features are shared by all samples
    (layer 1) while the outputs are per sample."""

    src: Tensor
    dst: Tensor
    row: Tensor
    crow: Tensor
    num_rows: int

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    def chunks(self, step: int) -> list:
        """``(start, stop, src_lo, src_hi, dst_lo, dst_hi, row_lo, row_hi)`` per chunk of ``step``
        edges: accumulations go into the narrow slices ``[lo, hi)`` (cached)."""
        cache = self.__dict__.setdefault("_chunks", {})
        if step not in cache:
            E = self.num_edges
            bounds = []
            if E:
                starts = torch.arange(0, E, step, device=self.src.device)
                stacked = torch.stack([self.src, self.dst, self.row])
                pad = (-E) % step
                stacked = torch.cat([stacked, stacked[:, -1:].expand(3, pad)], dim=1).view(3, -1, step)
                lo, hi = stacked.amin(-1), stacked.amax(-1) + 1
                info = torch.cat([starts.view(1, -1), lo, hi]).t().tolist()
                for start, sl, dl, rl, sh, dh, rh in info:
                    bounds.append((start, min(start + step, E), sl, sh, dl, dh, rl, rh))
            cache[step] = bounds
        return cache[step]


def _chunk_size(device: torch.device, width: int) -> int:
    if device.type == "cuda":
        return 1 << 20
    return max(1024, (1 << 18) // max(width, 1))  # ~1 MB of float32 per chunk tensor


def _segment_softmax(logits: Tensor, row: Tensor, num_rows: int) -> Tensor:
    """Softmax of ``logits`` [E, H] over edges sharing ``row`` (PyG's ``softmax`` formula,
    including its ``+ 1e-16`` in the denominator)."""
    E, H = logits.shape
    index = row.view(-1, 1).expand(E, H)
    row_max = logits.new_full((num_rows, H), float("-inf"))
    row_max.scatter_reduce_(0, index, logits, reduce="amax", include_self=True)
    exp = (logits - row_max.index_select(0, row)).exp()
    denom = logits.new_zeros((num_rows, H)).index_add_(0, row, exp) + 1e-16
    return exp / denom.index_select(0, row)


def _csr_matrix(edges: EdgeSet, values: Tensor, num_cols: int) -> Tensor:
    return torch.sparse_csr_tensor(edges.crow, edges.src, values, (edges.num_rows, num_cols),
                                   check_invariants=False)


def _index_add(out: Tensor, index: Tensor, source: Tensor) -> None:
    """``out.index_add_(0, index, source)`` for one chunk. On CPU it runs on one thread: the
    CPU ``index_add_`` opens a parallel region whatever the size, and per-chunk barriers cost
    more than they save (badly so on a loaded machine). Deterministic either way."""
    if out.device.type != "cpu":
        out.index_add_(0, index, source)
        return
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        out.index_add_(0, index, source)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _att_matrix(att: Tensor) -> Tensor:
    """[H, C'] -> block-diagonal [H, H*C'] so that per-head dot products are one GEMM."""
    return torch.block_diag(*att.unbind(0))


class _GATv2Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_l: Tensor, x_r: Tensor, att: Tensor, edges: EdgeSet, negative_slope: float,
                use_kernel: bool = False):
        ctx.edges, ctx.negative_slope, ctx.use_kernel = edges, negative_slope, use_kernel
        if use_kernel:  # the fused C++ forward (stoichconv.ops.gatv2); forward() runs without grad
            out, alpha = gatv2_forward(x_l, x_r, att.contiguous(), edges.src, edges.dst, edges.crow, negative_slope)
            ctx.save_for_backward(x_l, x_r, att, alpha)
            return out
        E = edges.num_edges
        _, H, Ch = x_l.shape
        W = H * Ch
        xl2, xr2 = x_l.view(-1, W), x_r.view(-1, W)
        logits = x_l.new_empty(E, H)
        step = _chunk_size(x_l.device, W)
        with torch.no_grad():
            att_t = _att_matrix(att).t().contiguous()  # [W, H]
            for start in range(0, E, step):
                stop = min(start + step, E)
                pre = xl2.index_select(0, edges.src[start:stop])
                pre += xr2.index_select(0, edges.dst[start:stop])
                F.leaky_relu_(pre, negative_slope)
                torch.mm(pre, att_t, out=logits[start:stop])
            alpha = _segment_softmax(logits, edges.row, edges.num_rows)
            out = x_l.new_empty(edges.num_rows, H, Ch)
            for h in range(H):
                matrix = _csr_matrix(edges, alpha[:, h].contiguous(), x_l.size(0))
                out[:, h] = matrix @ x_l[:, h].contiguous()
        ctx.save_for_backward(x_l, x_r, att, alpha)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x_l, x_r, att, alpha = ctx.saved_tensors
        edges, slope = ctx.edges, ctx.negative_slope
        if ctx.use_kernel:  # the C++ backward (stoichconv.ops.gatv2)
            grad_x_l, grad_x_r, grad_att = gatv2_backward(grad_out, x_l, x_r, att.contiguous(), alpha, edges.src,
                                                          edges.dst, edges.crow, slope)
            return grad_x_l, grad_x_r, grad_att, None, None, None
        E = edges.num_edges
        _, H, Ch = x_l.shape
        W = H * Ch
        xl2, xr2 = x_l.view(-1, W), x_r.view(-1, W)
        g2 = grad_out.contiguous().view(-1, W)
        step = _chunk_size(x_l.device, W)
        grad_x_l = torch.zeros_like(xl2)
        grad_x_r = torch.zeros_like(xr2)
        grad_alpha = alpha.new_empty(E, H)
        # 1. aggregation: d alpha_e = <g[row_e], x_l[src_e]>, d x_l[src_e] += alpha_e g[row_e]
        chunks = edges.chunks(step)
        for start, stop, s_lo, s_hi, d_lo, d_hi, r_lo, r_hi in chunks:
            src = edges.src[start:stop]
            g = g2[r_lo:r_hi].index_select(0, edges.row[start:stop] - r_lo)
            torch.sum((g * xl2.index_select(0, src)).view(-1, H, Ch), dim=-1, out=grad_alpha[start:stop])
            g = g.view(-1, H, Ch).mul_(alpha[start:stop].unsqueeze(-1)).view(-1, W)
            _index_add(grad_x_l[s_lo:s_hi], src - s_lo, g)
        # 2. softmax
        weighted = alpha * grad_alpha
        row_sum = alpha.new_zeros(edges.num_rows, H).index_add_(0, edges.row, weighted)
        grad_logits = weighted - alpha * row_sum.index_select(0, edges.row)
        # 3. scores: logit = <att, leaky_relu(x_l[src] + x_r[dst])>
        att_m = _att_matrix(att)  # [H, W]
        grad_att_full = att.new_zeros(H, W)
        for start, stop, s_lo, s_hi, d_lo, d_hi, r_lo, r_hi in chunks:
            src, dst = edges.src[start:stop], edges.dst[start:stop]
            pre = xl2.index_select(0, src)
            pre += xr2.index_select(0, dst)
            gl = grad_logits[start:stop]  # [n, H]
            grad_pre = torch.ops.aten.leaky_relu_backward(gl @ att_m, pre, slope, False)
            grad_att_full.addmm_(gl.t(), F.leaky_relu_(pre, slope))
            _index_add(grad_x_l[s_lo:s_hi], src - s_lo, grad_pre)
            _index_add(grad_x_r[d_lo:d_hi], dst - d_lo, grad_pre)
        grad_att = grad_att_full.view(H, H, Ch).diagonal(dim1=0, dim2=1).t()
        return grad_x_l.view_as(x_l), grad_x_r.view_as(x_r), grad_att, None, None, None


def gatv2_attention(x_l: Tensor, x_r: Tensor, att: Tensor, edges: EdgeSet, negative_slope: float = 0.2,
                    use_kernel: bool = True) -> Tensor:
    """GATv2 attention and aggregation (the part of ``torch_geometric.nn.GATv2Conv`` between
    its two linear maps and its bias).

    ``x_l`` [N_src, H, C'] (= ``lin_l(x_src)``), ``x_r`` [N_dst, H, C'] (= ``lin_r(x_dst)``),
    ``att`` [H, C']. For every output row i with incoming edges e = (src_e, dst_e, row_e = i):
    ``a_e = <att, leaky_relu(x_l[src_e] + x_r[dst_e])>`` per head, ``alpha`` = softmax of ``a``
    over the edges of row i, ``out[i] = sum_e alpha_e x_l[src_e]`` ([num_rows, H, C']; rows with
    no edge are 0). Differentiable w.r.t. ``x_l``, ``x_r``, ``att`` (hand-written backward).

    On CPU with the compiled extension the forward and backward run the fused C++ kernels
    (:mod:`stoichconv.ops.gatv2`); elsewhere, or with ``use_kernel=False``, the edge-chunked
    pure-PyTorch forward and backward (the kernels' reference in the tests)."""
    if x_l.dim() != 3 or x_r.dim() != 3 or x_l.shape[1:] != x_r.shape[1:]:
        raise ValueError(f"`x_l` and `x_r` must be [N, H, C'] with equal H, C'; got {tuple(x_l.shape)}, {tuple(x_r.shape)}")
    if tuple(att.shape) != tuple(x_l.shape[1:]):
        raise ValueError(f"`att` must have shape [H, C'] = {tuple(x_l.shape[1:])}, got {tuple(att.shape)}")
    use_kernel = bool(use_kernel) and gatv2_op_available(x_l.device)
    return _GATv2Attention.apply(x_l.contiguous(), x_r.contiguous(), att, edges, negative_slope, use_kernel)


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
    Ng, Nr, Nm = (int(cell_graph[t].num_nodes) for t in ("gene", "reaction", "metabolite"))
    relations, gene_edges = {}, {}
    for rel in GENE_RELATIONS:
        ei = cell_graph[rel].edge_index.to(device).long()
        gene_edges[rel] = ei
        relations[rel] = _sort_relation(ei, Ng, Ng)
    gpr = cell_graph[GPR].edge_index.to(device).long()
    relations[GPR] = _sort_relation(gpr, Ng, Nr)
    relations["rev_gpr"] = _sort_relation(gpr.flip(0), Nr, Ng)
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

    ``backend`` selects the backend of the metabolism conv and of the pert-mask operators
    (see :mod:`stoichconv.backends`)."""

    stoich_conv_class = FastStoichHypergraphConv

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
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
        tensors = [cell_graph[rel].edge_index for rel in GENE_RELATIONS + (GPR,)]
        tensors += [cell_graph[METABOLISM].hyperedge_index, cell_graph[METABOLISM].stoichiometry]
        key = (tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), str(device), dtype,
               tuple(int(cell_graph[t].num_nodes) for t in ("gene", "reaction", "metabolite")))
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
        from stoichconv.ops.pert_mask import filter_edges, reaction_keep

        Ng, Nr = plan.num_nodes["gene"], plan.num_nodes["reaction"]
        B = int(pert_ptr.numel()) - 1
        edge_keep, gene_keep = {}, None
        for rel in GENE_RELATIONS:
            ei = plan.gene_edge_index[rel]
            res = filter_edges(ei, Ng, pert, pert_ptr, relabel=False, backend=self.backend)
            edge_keep[rel] = res.edge_keep.view(B, ei.size(1))
            gene_keep = res.node_keep
        rkeep = reaction_keep(plan.gpr_index, Nr, pert, pert_ptr, backend=self.backend)
        gpr_keep = rkeep[:, plan.gpr_reaction]  # a GPR pair survives iff its reaction does
        edge_keep[GPR] = gpr_keep
        edge_keep["rev_gpr"] = gpr_keep
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
            out = gatv2_attention(x_l, x_r, conv.att.view(out_heads, out_ch), es, conv.negative_slope)
            return out.reshape(es.num_rows, out_heads * out_ch) + conv.bias

        def post(wrapper, out, keep):
            out = wrapper.proj(out)
            out = _graph_layer_norm(wrapper.norm, out, keep)
            return wrapper.dropout(wrapper.act(out))

        for layer, hetero in enumerate(self.convs):
            rel_convs = hetero.convs
            gene_out = None
            for rel in GENE_RELATIONS:
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
                out = post(w, gat(w, reaction_out + summary, x_gene, edges("rev_gpr", False, shared), H, C // H),
                           gene_keep)
                gene_out = gene_out + out
            x_gene, x_reaction, x_met = gene_out, reaction_out, met_out.view(B, Nm, C)
            shared = False
        if shared:  # zero layers (not reachable: num_layers >= 1)
            x_gene = x_gene.repeat(B, 1)
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
