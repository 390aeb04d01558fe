"""Fast HeteroCell: the reference model (:mod:`stoichconv.reference.hetero_cell`) on the
project's kernels, with identical parameter names and shapes (a ``state_dict`` loads either way),
every configuration of the reference (and so of the original torchcell model, see
:meth:`HeteroCell.from_torchcell`) and identical numbers.

``forward(cell_graph, pert, pert_ptr)`` takes the wildtype and the perturbations only
(``pert`` [P] gene ids, ``pert_ptr`` [B + 1], the CSR layout of :mod:`stoichconv.ops.pert_mask`) and
builds everything else on the device:

* **Perturbation masks** from the pert-mask operators (:mod:`stoichconv.ops.pert_mask`):
  ``filter_edges(..., relabel=False)`` gives the gene keep-mask and the gene-gene edge keep-masks
  of the full (shared-topology) layout, ``reaction_keep`` the [B, N_r] reaction keep-mask; a GPR
  pair survives iff its reaction does.
* **Layout.** Node features live in the full layout (row ``b * N + v``; removed nodes keep a row
  that no edge touches). Removed nodes are excluded from every graph-mode LayerNorm / BatchNorm
  statistic and from the attentional pooling, so the results equal the reference's compacted
  batch. The graph LayerNorm and the row-weighted BatchNorm are autograd Functions with
  hand-written backwards (a few passes over the rows instead of the formulas' ~20; float32 and
  float64 with parameters of the same dtype, else the formulas). Layer-1 inputs are the same for every sample (embeddings, the per-node preprocessor), so
  they are computed once on the wildtype rows and indexed, never copied B times; with a
  ``"batch"`` norm the preprocessor's statistics weight each wildtype row by the number of samples
  that keep it. Only a training-mode preprocessor dropout (independent masks per sample) makes it
  run on the kept rows of every sample, as the reference does.
* **Dropout** draws its masks as the reference does: one ``F.dropout`` call per reference call,
  over the kept rows (incidences) of all samples in sample-major order, scattered into the full
  layout. With the same seed both models draw the same masks (tested in train mode).
* **Gene-gene and GPR relations**: :func:`stoichconv.ops.gatv2_attention` (GATv2 attention and
  aggregation, fused forward and backward kernels on every backend)
  over per-batch :class:`~stoichconv.types.EdgeSet` s built from the keep-masks; the GPR sources
  are the genes with a GPR pair only (``lin_l`` runs on those rows). ``add_self_loops`` follows
  PyG on the compacted batch: gene-gene loops for every kept gene; GPR "loops" pair compacted
  gene j with compacted reaction j (PyG's bipartite behaviour, reproduced).
* **Metabolism**: the shared-topology fast :class:`stoichconv.nn.StoichHypergraphConv` on
  ``x`` [B, N_m, C] with ``reaction_keep`` [B, N_r] (never a B-times copy of the incidence
  structure), ``hyperedge_attr`` = the layer-0 reaction embeddings (the original's quirk).
* **Wildtype pass**: computed once per forward; when not training it is cached, keyed on the
  parameters' and buffers' version counters, the cell graph's tensors, dtype and device
  (``train()``, ``load_state_dict`` or any in-place parameter update invalidates it). The plan of
  the cell graph is cached likewise, on the graph tensors' identity and version (never their
  addresses); both caches are dropped when the model is pickled, deep-copied or saved with ``torch.save``.
* **torch.compile**: the forward and backward trace as one graph (``fullgraph=True``): the
  perturbation checks are in-graph assertions, the plan is built inside the graph, and the
  per-batch edge sets have data-dependent (unbacked) sizes, which Dynamo captures with
  ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` (set it, or use
  ``torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)`` around the first call;
  without it the compile falls back to one graph break per edge set).

By default the fast model computes everything the reference computes (the GPR and metabolism
relations included, although in the original design they never reach the prediction).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import BatchNorm as GraphBatchNorm
from torch_geometric.nn import LayerNorm as GraphLayerNorm

from stoichconv._tensor_key import TensorsKey, cacheable
from stoichconv.backends import check_backend_name, resolve
from stoichconv.data.relations import GENE_GENE_RELATIONS, GPR, METABOLISM, NODE_TYPES, REV_GPR
from stoichconv.nn.stoich_hypergraph_conv import StoichHypergraphConv as FastStoichHypergraphConv
from stoichconv.nn.stoich_hypergraph_conv import incidence_keep
from stoichconv.ops._dtypes import accumulate_dtype
from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.ops.pert_mask import filter_edges, reaction_keep
from stoichconv.ops.pert_mask.validation import check_perturbation_values, check_perturbations
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
    summary_matrix: Optional[Tensor]  # CSR [N_r, N_m]: B_e * s_k (metabolism_to_gene); None in a compiled graph
    summary_values: Tensor  # [nnz] B_e * s_k per incidence (the summary's values, incidence order)
    num_nodes: dict
    # gene-gene relation -> wildtype positions of its non-loop edges when the relation's edges are
    # "non-loop edges, then one self-loop per gene" (``add_self_loops``); absent otherwise
    loop_free: dict = field(default_factory=dict)


def _sort_relation(edge_index: Tensor, num_src: int, num_dst: int) -> _SortedRelation:
    perm = torch.sort(edge_index[1], stable=True).indices
    return _SortedRelation(edge_index[0, perm].contiguous(), edge_index[1, perm].contiguous(), perm, num_src, num_dst)


def build_cell_graph_plan(cell_graph: HeteroData, device: torch.device, dtype: torch.dtype, *,
                          gene_self_loops: bool = False) -> CellGraphPlan:
    """The plan of ``cell_graph``; ``gene_self_loops``: the gene-gene relations drop their
    self-loops and get one per gene (PyG ``GATv2Conv(add_self_loops=True)``)."""
    Ng, Nr, Nm = (int(cell_graph[t].num_nodes) for t in NODE_TYPES)
    relations, gene_edges, loop_free = {}, {}, {}
    for rel in GENE_GENE_RELATIONS:
        ei = cell_graph[rel].edge_index.to(device).long()
        gene_edges[rel] = ei
        if gene_self_loops:
            kept = (ei[0] != ei[1]).nonzero().view(-1)
            loops = torch.arange(Ng, device=device).expand(2, Ng)
            loop_free[rel] = kept
            relations[rel] = _sort_relation(torch.cat([ei[:, kept], loops], dim=1), Ng, Ng)
        else:
            relations[rel] = _sort_relation(ei, Ng, Ng)
    gpr = cell_graph[GPR].edge_index.to(device).long()
    relations[GPR] = _sort_relation(gpr, Ng, Nr)
    relations[REV_GPR] = _sort_relation(gpr.flip(0), Nr, Ng)
    met = cell_graph[METABOLISM]
    incidence = met.hyperedge_index.to(device)
    stoich = met.stoichiometry.to(device)
    s = stoich.to(accumulate_dtype(dtype))  # the summary's values: float32 for float16 / bfloat16 models
    inv = torch.zeros(Nr, dtype=s.dtype, device=device).index_add_(0, incidence[1].long(), s.abs()).reciprocal()
    inv = inv.masked_fill(torch.isinf(inv), 0.0)
    values = inv[incidence[1].long()] * s
    summary = None
    if not torch.compiler.is_compiling():  # sparse CSR does not trace: see _summary
        order = torch.sort(incidence[1], stable=True).indices
        crow = _csr_rows(incidence[1, order].long(), Nr)
        with warnings.catch_warnings():  # PyTorch flags every CSR construction as beta; this one is ours
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            summary = torch.sparse_csr_tensor(crow, incidence[0, order].long(), values[order], (Nr, Nm),
                                              check_invariants=False)
    return CellGraphPlan(relations, gene_edges, gpr, gpr[1].contiguous(), incidence, stoich, summary, values,
                         {"gene": Ng, "reaction": Nr, "metabolite": Nm}, loop_free)


def _summary(plan: CellGraphPlan, m: Tensor) -> Tensor:
    """``S @ m`` for the reaction summary ``S`` [N_r, N_m] (``B_e * s_k`` per incidence) and
    ``m`` [N_m, K]: a CSR SpMM eagerly, a gather + ``index_add_`` inside a ``torch.compile`` graph
    (the same sums; the SpMM is deterministic on every device)."""
    acc = plan.summary_values.dtype  # accumulated in float32 for float16 / bfloat16 features
    if plan.summary_matrix is not None:
        with torch.autocast(m.device.type, enabled=False):  # no sparse kernel in float16 / bfloat16
            return (plan.summary_matrix @ m.to(acc)).to(m.dtype)
    met, rxn = plan.incidence[0].long(), plan.incidence[1].long()
    return m.new_zeros(plan.num_nodes["reaction"], m.size(1), dtype=acc).index_add_(
        0, rxn, plan.summary_values.unsqueeze(1) * m.index_select(0, met).to(acc)).to(m.dtype)


def _csr_rows(row: Tensor, num_rows: int) -> Tensor:
    """CSR pointer [num_rows + 1] of the non-decreasing ``row``: ``crow[i]`` = #entries < i (a
    fixed-size result, unlike ``bincount``, so it traces with ``fullgraph=True``)."""
    bounds = torch.arange(num_rows + 1, dtype=row.dtype, device=row.device)
    return torch.searchsorted(row, bounds, side="left")


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
    return EdgeSet(
        src=src if shared_src else sample * rel.num_src + src,
        dst=dst if shared_dst else row,
        row=row,
        crow=_csr_rows(row, num_rows),
        num_rows=num_rows,
    )


def _gpr_loop_edge_set(rel: _SortedRelation, batch: "_Batch", shared_src: bool, shared_dst: bool) -> EdgeSet:
    """The GPR edges of ``GATv2Conv(add_self_loops=True)`` on the reference's compacted batch:
    PyG drops the pairs whose compacted gene and reaction numbers are equal and adds the pairs
    (compacted gene j, compacted reaction j) for j < min(#genes, #reactions) of the whole batch."""
    device = rel.src.device
    Ng, Nr, B = rel.num_src, rel.num_dst, batch.num_samples
    keep = batch.edge_keep.get(GPR)
    E = rel.src.numel()
    if keep is None:
        sample = torch.arange(B, device=device).repeat_interleave(E)
        k = torch.arange(E, device=device).repeat(B)
    else:
        sample, k = keep[:, rel.perm].nonzero(as_tuple=True)
    src = sample * Ng + rel.src[k]
    dst = sample * Nr + rel.dst[k]
    gene_keep = batch.gene_keep if batch.gene_keep is not None else torch.ones(B * Ng, dtype=torch.bool, device=device)
    rkeep = (batch.reaction_keep.reshape(-1) if batch.reaction_keep is not None
             else torch.ones(B * Nr, dtype=torch.bool, device=device))
    gene_number = gene_keep.long().cumsum(0) - 1  # full row -> compacted number
    reaction_number = rkeep.long().cumsum(0) - 1
    survive = gene_number[src] != reaction_number[dst]
    gene_rows, reaction_rows = gene_keep.nonzero().view(-1), rkeep.nonzero().view(-1)
    n = min(gene_rows.numel(), reaction_rows.numel())
    src = torch.cat([src[survive], gene_rows[:n]])
    dst = torch.cat([dst[survive], reaction_rows[:n]])
    order = torch.sort(dst, stable=True).indices
    src, row = src[order], dst[order]
    return EdgeSet(src=src % Ng if shared_src else src, dst=row % Nr if shared_dst else row, row=row,
                   crow=_csr_rows(row, B * Nr), num_rows=B * Nr)


def _compact_sources(edges: EdgeSet) -> tuple[EdgeSet, Tensor]:
    """``(edges', rows)``: the sources renumbered over ``rows``, the distinct source rows (so that
    ``lin_l`` runs on those rows only)."""
    rows, src = torch.unique(edges.src, sorted=True, return_inverse=True)
    return EdgeSet(src=src, dst=edges.dst, row=edges.row, crow=edges.crow, num_rows=edges.num_rows), rows


@dataclass
class _Batch:
    num_samples: int
    gene_keep: Optional[Tensor]  # [B * N_g] bool (None: all kept)
    reaction_keep: Optional[Tensor]  # [B, N_r] bool
    edge_keep: dict  # relation -> [B, E] bool or None
    _rows: dict = field(default_factory=dict)

    def rows(self, node_type: str) -> Optional[Tensor]:
        """Kept full-layout rows of ``node_type`` in sample-major order (the reference's
        compacted order); None when every row is kept."""
        mask = {"gene": self.gene_keep,
                "reaction": None if self.reaction_keep is None else self.reaction_keep.reshape(-1)}.get(node_type)
        if mask is None:
            return None
        if node_type not in self._rows:
            self._rows[node_type] = mask.nonzero().view(-1)
        return self._rows[node_type]


# ----------------------------------------------------------------------------------------------
# Norms, dropout and pooling over the kept rows of the full layout
# ----------------------------------------------------------------------------------------------
class _GraphLayerNormFunction(torch.autograd.Function):
    """``torch_geometric.nn.LayerNorm`` in graph mode (one mean and one biased std over the rows
    weighted by ``keep`` [rows] 0/1 x all channels; every row normalised) with a hand-written
    backward: the statistics from per-row sums (``[rows]`` vectors), the output in one
    ``addcmul`` pass, the backward in one product pass, two column sums and in-place updates
    of that product's buffer (the autograd graph of the formulas takes ~20 full passes)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> Tensor:
        rowsum = x.sum(1)
        if keep is None:
            n = x.new_tensor(float(x.numel()))
            total = rowsum.sum()
        else:
            n = keep.sum() * x.size(1)
            total = (rowsum * keep).sum()
        mean = total / n
        xc = x - mean
        sq = torch.linalg.vector_norm(xc, dim=1).square()
        var = (sq.sum() if keep is None else (sq * keep).sum()) / n
        std = var.sqrt()
        inv = 1.0 / (std + eps)
        scale = inv if weight is None else weight * inv
        out = xc * scale if bias is None else torch.addcmul(bias, xc, scale)
        ctx.save_for_backward(xc, keep, weight, n, std, inv)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        xc, keep, weight, n, std, inv = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad
        prod = grad * xc
        colsum = prod.sum(0)  # sum_rows grad * xc, per channel
        grad_sum = grad.sum(0)
        grad_w = colsum * inv if need_w else None
        grad_b = grad_sum if need_b else None
        grad_x = None
        if need_x:
            a = colsum.sum() if weight is None else torch.dot(colsum, weight)  # d loss / d inv
            beta = -a * inv * inv / (std * n)  # d loss / d xc (kept rows) through the variance, per xc
            scale = inv if weight is None else weight * inv
            shift = (grad_sum.sum() if weight is None else torch.dot(grad_sum, weight)) * inv / n
            # the sum over kept rows of xc is 0: the mean's gradient is -shift on every kept entry
            if keep is None:
                grad_x = torch.mul(xc, beta, out=prod).sub_(shift)
            else:
                coef = (keep * beta).unsqueeze(1)
                grad_x = torch.mul(xc, coef, out=prod).sub_((keep * shift).unsqueeze(1))
            grad_x.addcmul_(grad, scale)
        return grad_x, None, grad_w, grad_b, None


def _graph_layer_norm_formula(norm, x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """The masked graph LayerNorm as autograd formulas (any dtype mix, e.g. under autocast)."""
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


def _graph_layer_norm(norm, x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``torch_geometric.nn.LayerNorm`` (graph mode, no batch vector) over the kept rows only
    (``keep`` [rows] bool; None: all rows)."""
    weight, bias = norm.weight, norm.bias
    if (x.dim() != 2 or x.dtype not in (torch.float32, torch.float64) or (weight is None) != (bias is None)
            or (weight is not None and (weight.dtype != x.dtype or bias.dtype != x.dtype))):
        return _graph_layer_norm_formula(norm, x, keep)
    k = None if keep is None else keep.to(x.dtype)
    return _GraphLayerNormFunction.apply(x.contiguous(), k, weight, bias, float(norm.eps))


class _WeightedBatchNormFunction(torch.autograd.Function):
    """Training-mode ``BatchNorm1d`` over the rows weighted by ``weight`` [rows] (0/1 for kept
    rows, or how many samples share a row): per-channel weighted mean and biased variance, every
    row normalised; a hand-written backward (one product pass, two column sums, in-place updates
    of that product's buffer). Returns ``(out, mean, var)`` (the statistics without gradient,
    for the running-statistics update)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float):
        w = weight.unsqueeze(1)
        n = weight.sum()
        buf = x * w
        mean = buf.sum(0) / n
        xc = x - mean
        torch.mul(xc, xc, out=buf).mul_(w)
        var = buf.sum(0) / n
        rstd = torch.rsqrt(var + eps)
        scale = rstd if gamma is None else gamma * rstd
        out = torch.mul(xc, scale, out=buf) if beta is None else torch.addcmul(beta, xc, scale, out=buf)
        ctx.save_for_backward(xc, weight, gamma, n, rstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_mean, _grad_var):
        xc, weight, gamma, n, rstd = ctx.saved_tensors
        need_x, _, need_g, need_b, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        prod = grad * xc
        colsum = prod.sum(0)  # per channel: sum_rows grad * xc
        grad_sum = grad.sum(0)
        grad_x = None
        if need_x:
            scale = rstd if gamma is None else gamma * rstd
            # d loss / d x = grad * scale - w * (xc * scale * rstd^2 * colsum / n + scale * grad_sum / n)
            coef = scale * rstd * rstd * colsum / n
            shift = scale * grad_sum / n
            grad_x = torch.mul(xc, coef, out=prod).add_(shift).mul_(weight.unsqueeze(1)).neg_()
            grad_x.addcmul_(grad, scale)
        return grad_x, None, (colsum * rstd) if need_g else None, grad_sum if need_b else None, None


def _batch_norm(bn: nn.BatchNorm1d, x: Tensor, weight: Optional[Tensor]) -> Tensor:
    """``bn(x)`` with training statistics over the rows weighted by ``weight`` [rows] (0/1 for
    kept rows, or how many samples share a row): mean, biased variance for the normalisation,
    running statistics updated as PyTorch does (unbiased variance of the ``sum(weight)`` rows)."""
    if weight is None or not (bn.training or bn.running_mean is None):
        return bn(x)
    w = weight.to(x.dtype)
    if (x.dim() == 2 and x.dtype in (torch.float32, torch.float64)
            and (not bn.affine or (bn.weight.dtype == x.dtype and bn.bias.dtype == x.dtype))):
        out, mean, var = _WeightedBatchNormFunction.apply(x.contiguous(), w, bn.weight if bn.affine else None,
                                                          bn.bias if bn.affine else None, float(bn.eps))
        n = w.sum()
    else:  # the formulas (any dtype mix, e.g. under autocast)
        w1 = w.unsqueeze(-1)
        n = w1.sum()
        mean = (x * w1).sum(0) / n
        xc = x - mean
        var = (xc * xc * w1).sum(0) / n
        out = xc * torch.rsqrt(var + bn.eps)
        if bn.affine:
            out = out * bn.weight + bn.bias
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        # in place through ``.data``, as the native kernel updates them: without a version bump, so
        # that an earlier call of the same norm in this graph (which saved them) can still backward
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.data.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.data.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
    return out


def _relation_norm(norm: nn.Module, x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """A relation wrapper's norm over the kept rows ``keep`` [rows] bool (None: all rows)."""
    if isinstance(norm, nn.Identity):
        return x
    if isinstance(norm, GraphLayerNorm):
        return _graph_layer_norm(norm, x, keep)
    if isinstance(norm, GraphBatchNorm):
        return _batch_norm(norm.module, x, keep)
    raise TypeError(f"unsupported relation norm {type(norm).__name__}")


def _dropout_active(module: nn.Module) -> bool:
    return module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def _scatter_rows(x: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    return x.new_zeros((num_rows,) + tuple(x.shape[1:])).index_copy(0, rows, x)


def _dropout_rows(dropout: nn.Dropout, x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """``dropout`` applied as the reference applies it to its compacted rows: one mask over the
    kept ``rows`` in order (removed rows become 0)."""
    if not dropout.training or dropout.p == 0 or rows is None:
        return dropout(x)
    return _scatter_rows(dropout(x.index_select(0, rows)), rows, x.size(0))


def _sequential(seq: nn.Sequential, x: Tensor, rows: Optional[Tensor]) -> Tensor:
    for module in seq:
        x = _dropout_rows(module, x, rows) if isinstance(module, nn.Dropout) else module(x)
    return x


class _MetabolismConv(FastStoichHypergraphConv):
    """The fast metabolism conv with its attention dropout drawn as the reference layer draws it
    on a compacted batch: one mask over the kept incidences of all samples, in sample-major
    order (the reference layer's ``F.dropout`` of its ``alpha`` [nnz_kept, H])."""

    def _attention(self, x: Tensor, hyperedge_attr: Optional[Tensor], plan, reaction_keep: Optional[Tensor]) -> Tensor:
        p = self.dropout
        if not (self.training and p > 0) or reaction_keep is None:
            return super()._attention(x, hyperedge_attr, plan, reaction_keep)
        self.dropout = 0.0
        try:
            alpha = super()._attention(x, hyperedge_attr, plan, reaction_keep)  # [B, nnz, H]
        finally:
            self.dropout = p
        flat = alpha.reshape(-1, alpha.size(-1))
        rows = incidence_keep(reaction_keep, plan.reaction_index).reshape(-1).nonzero().view(-1)
        return _scatter_rows(F.dropout(flat.index_select(0, rows), p, True), rows, flat.size(0)).view_as(alpha)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class HeteroCell(ReferenceHeteroCell):
    """Fast HeteroCell; same constructor, parameters and outputs as
    :class:`stoichconv.reference.hetero_cell.HeteroCell` (also :meth:`from_torchcell`,
    :meth:`to_torchcell_state_dict`), but ``forward(cell_graph, pert, pert_ptr)`` (see the
    module docstring).

    ``backend`` selects the backend of every op the model runs (pert masks, GATv2, the
    metabolism conv; see :mod:`stoichconv.backends`); an op that lacks it runs its reference."""

    stoich_conv_class = _MetabolismConv

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_name(backend)
        for conv in self.convs:
            conv.convs[METABOLISM].conv.backend = backend
        self._clear_caches()

    # -- caches ---------------------------------------------------------------------------
    def _clear_caches(self) -> None:
        """The plan of the last cell graph and the inference wildtype embedding, each with its
        :class:`~stoichconv._tensor_key.TensorsKey` (identity + version of what it was made from)."""
        self._plan_key: Optional[TensorsKey] = None
        self._plan: Optional[CellGraphPlan] = None
        self._wildtype_key: Optional[TensorsKey] = None
        self._wildtype: Optional[Tensor] = None

    def __getstate__(self) -> dict:
        """Pickled, deep-copied and ``torch.save``d without the caches (a copy rebuilds them)."""
        state = dict(super().__getstate__())
        for name in ("_plan_key", "_plan", "_wildtype_key", "_wildtype"):
            state[name] = None
        return state

    def train(self, mode: bool = True):
        self._wildtype_key, self._wildtype = None, None
        return super().train(mode)

    def _get_plan(self, cell_graph: HeteroData, device, dtype) -> CellGraphPlan:
        tensors = [cell_graph[rel].edge_index for rel in GENE_GENE_RELATIONS + (GPR,)]
        tensors += [cell_graph[METABOLISM].hyperedge_index, cell_graph[METABOLISM].stoichiometry]
        extra = (str(device), dtype, tuple(int(cell_graph[t].num_nodes) for t in NODE_TYPES),
                 self.config["gene_add_self_loops"])
        if torch.compiler.is_compiling():  # built inside the graph (as the layer's plan is): no cache guards
            return build_cell_graph_plan(cell_graph, device, dtype, gene_self_loops=self.config["gene_add_self_loops"])
        if self._plan is not None and self._plan_key is not None and self._plan_key.matches(tensors, extra):
            return self._plan
        plan = build_cell_graph_plan(cell_graph, device, dtype, gene_self_loops=self.config["gene_add_self_loops"])
        self._plan, self._plan_key = plan, (TensorsKey(tensors, extra) if cacheable(tensors) else None)
        self._wildtype_key, self._wildtype = None, None  # made with the previous plan
        return plan

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
            res = filter_edges(ei, Ng, pert, pert_ptr, relabel=False, validate=False,  # checked in forward
                               backend=resolve("filter_edges", self.backend, pert.device, strict=False))
            edge_keep[rel] = res.edge_keep.view(B, ei.size(1))
            gene_keep = res.node_keep
        for rel, kept in plan.loop_free.items():  # non-loop edges, then one loop per kept gene
            edge_keep[rel] = torch.cat([edge_keep[rel][:, kept], gene_keep.view(B, Ng)], dim=1)
        rkeep = reaction_keep(plan.gpr_index, Nr, pert, pert_ptr, validate=False,
                              backend=resolve("reaction_keep", self.backend, pert.device, strict=False))
        gpr_keep = rkeep[:, plan.gpr_reaction]  # a GPR pair survives iff its reaction does
        edge_keep[GPR] = gpr_keep
        edge_keep[REV_GPR] = gpr_keep
        return _Batch(B, gene_keep, rkeep, edge_keep)

    # -- one pass ---------------------------------------------------------------------------
    def _preprocess(self, batch: _Batch) -> tuple[Tensor, bool]:
        """Layer-1 gene features and whether they are the shared wildtype rows [N_g, C] (else
        the full layout [B * N_g, C])."""
        emb = self.gene_embedding.weight
        pre = self.preprocessor
        if batch.gene_keep is None:  # the wildtype: every row once
            return pre(emb), True
        Ng = emb.size(0)
        if _dropout_active(pre):  # independent masks per sample: run on every sample's kept rows
            rows = batch.rows("gene")
            return _scatter_rows(pre(emb.index_select(0, rows % Ng)), rows, batch.num_samples * Ng), False
        if self.training and any(isinstance(m, nn.BatchNorm1d) for m in pre.mlp):
            count = batch.gene_keep.view(batch.num_samples, Ng).sum(0)  # samples keeping each gene
            x = emb
            for module in pre.mlp:
                x = _batch_norm(module, x, count) if isinstance(module, nn.BatchNorm1d) else module(x)
            return x, True
        return pre(emb), True

    def _encode(self, plan: CellGraphPlan, batch: _Batch) -> Tensor:
        """Gene features [B * N_g, C] in the full layout."""
        B = batch.num_samples
        C = self.hidden_channels
        Nm, Nr = plan.num_nodes["metabolite"], plan.num_nodes["reaction"]
        rkeep_rows = None if batch.reaction_keep is None else batch.reaction_keep.reshape(-1)
        gene_keep = batch.gene_keep
        gpr_loops = self.config["gpr_add_self_loops"]

        x_gene, gene_shared = self._preprocess(batch)  # [N_g, C] shared rows or [B * N_g, C]
        x_reaction = self.reaction_embedding.weight  # shared rows [N_r, C]
        reaction_shared = True
        reaction_attr = x_reaction
        x_met = self.metabolite_embedding.weight.unsqueeze(0).expand(B, Nm, C)
        edge_sets = {}

        def edges(rel, shared_src, shared_dst):
            key = (rel, shared_src, shared_dst)
            if key not in edge_sets:
                if rel == GPR and gpr_loops:
                    es = _gpr_loop_edge_set(plan.relations[GPR], batch, shared_src, shared_dst)
                else:
                    es = _edge_set(plan.relations[rel], batch.edge_keep.get(rel), B, shared_src, shared_dst)
                edge_sets[key] = _compact_sources(es) if rel == GPR else (es, None)
            return edge_sets[key]

        def gat(wrapper, x_src, x_dst, edge_rows):
            es, src_rows = edge_rows
            conv = wrapper.conv
            heads, out_ch = conv.heads, conv.out_channels
            if src_rows is not None:
                x_src = x_src.index_select(0, src_rows)
            x_l = conv.lin_l(x_src).view(-1, heads, out_ch)
            x_r = conv.lin_r(x_dst).view(-1, heads, out_ch)
            out = gatv2_attention(x_l, x_r, conv.att.view(heads, out_ch), es, conv.negative_slope,
                                  backend=resolve("gatv2", self.backend, x_l.device, strict=False))
            if conv.concat and conv.bias is not None and conv.bias.dtype == out.dtype:
                # the op's output is a fresh tensor that nothing saved: the bias added in place
                return out.add_(conv.bias.view(heads, out_ch)).view(es.num_rows, heads * out_ch)
            out = out.reshape(es.num_rows, heads * out_ch) if conv.concat else out.mean(dim=1)
            return out if conv.bias is None else out + conv.bias

        def post(wrapper, out, keep, node_type):
            out = wrapper.proj(out)
            out = _relation_norm(wrapper.norm, out, keep)
            return _dropout_rows(wrapper.dropout, wrapper.act(out), batch.rows(node_type))

        for layer, hetero in enumerate(self.convs):
            rel_convs = hetero.convs
            gene_out = None
            for rel in GENE_GENE_RELATIONS:
                w = rel_convs[rel]
                out = post(w, gat(w, x_gene, x_gene, edges(rel, gene_shared, gene_shared)), gene_keep, "gene")
                gene_out = out if gene_out is None else gene_out + out
            w = rel_convs[GPR]
            reaction_out = post(w, gat(w, x_gene, x_reaction, edges(GPR, gene_shared, reaction_shared)), rkeep_rows,
                                "reaction")
            w = rel_convs[METABOLISM]
            met = w.conv(x_met, plan.incidence, plan.stoich, hyperedge_attr=reaction_attr, num_edges=Nr,
                         reaction_keep=batch.reaction_keep)  # [B, N_m, width]
            met_out = post(w, met.reshape(B * Nm, met.size(-1)), None, "metabolite")
            if self.metabolism_to_gene:
                m = met_out.view(B, Nm, C).permute(1, 0, 2).reshape(Nm, B * C)
                summary = _summary(plan, m).view(Nr, B, C).permute(1, 0, 2).reshape(B * Nr, C)
                w = self.rev_gpr_convs[layer]
                out = post(w, gat(w, reaction_out + summary, x_gene, edges(REV_GPR, False, gene_shared)),
                           gene_keep, "gene")
                gene_out = gene_out + out
            x_gene, x_reaction, x_met = gene_out, reaction_out, met_out.view(B, Nm, C)
            gene_shared = reaction_shared = False
        return x_gene

    def _pool(self, x: Tensor, B: int, keep: Optional[Tensor], rows: Optional[Tensor] = None) -> Tensor:
        """AttentionalAggregation per sample over the kept genes (``keep`` [B, N_g]; ``rows``
        the kept full-layout rows, for the dropout masks)."""
        pool = self.pool
        gate = _sequential(pool.gate_nn, x, rows).view(B, -1)
        value = _sequential(pool.nn, x, rows).view(B, gate.size(1), -1)
        if keep is not None:
            gate = gate.masked_fill(~keep.view(B, -1), float("-inf"))
        gate = (gate - gate.max(dim=1, keepdim=True).values).exp()
        gate = gate / (gate.sum(dim=1, keepdim=True) + 1e-16)
        return (gate.unsqueeze(-1) * value).sum(dim=1)

    def _wildtype_embedding(self, plan: CellGraphPlan) -> Tensor:
        """z_w [1, C]: computed once per forward; cached in eval mode under ``torch.no_grad()``
        (inference), keyed on every parameter's and buffer's identity and version counter and
        on the plan."""
        if self.training or torch.is_grad_enabled():
            self._wildtype_key, self._wildtype = None, None
            return self._pool(self._encode(plan, _Batch(1, None, None, {})), 1, None)
        tensors = list(itertools.chain(self.parameters(), self.buffers()))
        device_type = plan.gpr_index.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # the plan is not in the key: the cache is cleared when the plan is rebuilt
        extra = (tuple((t.dtype, str(t.device)) for t in tensors), autocast)
        if self._wildtype is not None and self._wildtype_key is not None and plan is self._plan \
                and self._wildtype_key.matches(tensors, extra):
            return self._wildtype
        wildtype = self._pool(self._encode(plan, _Batch(1, None, None, {})), 1, None)
        cache = cacheable(tensors) and plan is self._plan and self._plan_key is not None
        self._wildtype, self._wildtype_key = (wildtype, TensorsKey(tensors, extra)) if cache else (None, None)
        return wildtype

    def forward(self, cell_graph: HeteroData, pert: Tensor, pert_ptr: Tensor) -> tuple[Tensor, dict]:
        """``(predictions [B, 2], {"z_w", "z_i", "z_p", "fitness", "gene_interaction"})`` for the
        wildtype ``cell_graph`` and the perturbation batch ``(pert, pert_ptr)`` (on the model's
        device)."""
        self._check_sizes(cell_graph)
        weight = self.gene_embedding.weight
        device, dtype = weight.device, weight.dtype
        if not isinstance(pert, Tensor) or not isinstance(pert_ptr, Tensor):
            raise TypeError("`pert` and `pert_ptr` must be tensors")
        if pert_ptr.dim() != 1 or pert_ptr.numel() < 2:
            raise ValueError(f"`pert_ptr` must be [B + 1] with B >= 1, got shape {tuple(pert_ptr.shape)}")
        pert, pert_ptr = check_perturbations(pert.to(device), pert_ptr.to(device), values=False)
        check_perturbation_values(pert, pert_ptr, self.num_nodes["gene"])  # once; in-graph under compile
        plan = self._get_plan(cell_graph, device, dtype)
        batch = self.perturbation_masks(plan, pert, pert_ptr)
        z_w = self._wildtype_embedding(plan)
        gene_keep = batch.gene_keep.view(batch.num_samples, -1)
        z_i = self._pool(self._encode(plan, batch), batch.num_samples, gene_keep, batch.rows("gene"))
        z_p = z_w - z_i
        predictions = self.head(z_p)
        return predictions, {"z_w": z_w, "z_i": z_i, "z_p": z_p, "fitness": predictions[:, 0:1],
                             "gene_interaction": predictions[:, 1:2]}
