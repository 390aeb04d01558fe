"""Pure-PyTorch reference of :func:`stoichconv.ops.gatv2_attention` (semantics there): GATv2
attention and aggregation over an :class:`~stoichconv.types.EdgeSet`, edge-chunked so that it
runs the real cell graph in bounded memory, with a hand-written backward. It is the kernels'
reference in the tests and benchmarks and the path ``"auto"`` takes where no kernel runs; it
matches ``torch_geometric.nn.GATv2Conv`` (tested through the reference HeteroCell).

Dtypes (the rules: :mod:`stoichconv.ops.gatv2`): float16 / bfloat16 features are computed in
float32 (float32 and float64 in themselves) and ``out`` and the gradients are rounded back to
their dtype; autocast is switched off inside, so that its matrix products stay in that
precision."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from stoichconv.types import EdgeSet

__all__ = ["gatv2_attention_reference"]


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


def _no_autocast(device: torch.device):
    """A context in which autocast does not recast the reference's products."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _att_matrix(att: Tensor) -> Tensor:
    """[H, C'] -> block-diagonal [H, H*C'] so that per-head dot products are one GEMM."""
    return torch.block_diag(*att.unbind(0))


class _ChunkedGATv2(torch.autograd.Function):
    """Edge-chunked forward and hand-written backward: the per-edge tensors ([E, H, C']) exist
    one chunk at a time (recomputed in the backward); only ``x_l``, ``x_r`` and ``alpha`` are kept."""

    @staticmethod
    def forward(ctx, x_l: Tensor, x_r: Tensor, att: Tensor, edges: EdgeSet, negative_slope: float):
        ctx.edges, ctx.negative_slope = edges, negative_slope
        E = edges.num_edges
        _, H, Ch = x_l.shape
        W = H * Ch
        xl2, xr2 = x_l.view(-1, W), x_r.view(-1, W)
        logits = x_l.new_empty(E, H)
        step = _chunk_size(x_l.device, W)
        with torch.no_grad(), _no_autocast(x_l.device):
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
        with _no_autocast(x_l.device):
            return _ChunkedGATv2._backward(ctx, grad_out, x_l, x_r, att, alpha)

    @staticmethod
    def _backward(ctx, grad_out: Tensor, x_l: Tensor, x_r: Tensor, att: Tensor, alpha: Tensor):
        edges, slope = ctx.edges, ctx.negative_slope
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
        return grad_x_l.view_as(x_l), grad_x_r.view_as(x_r), grad_att, None, None


def gatv2_attention_reference(x_l: Tensor, x_r: Tensor, att: Tensor, edges: EdgeSet,
                              negative_slope: float = 0.2) -> Tensor:
    """``out`` [num_rows, H, C'] of :func:`stoichconv.ops.gatv2_attention`, in the dtype of
    ``x_l`` (computed in float64 for float64 and float32 otherwise); differentiable w.r.t.
    ``x_l``, ``x_r`` and ``att``."""
    dtype = x_l.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = _ChunkedGATv2.apply(x_l.to(acc).contiguous(), x_r.to(acc).contiguous(), att.to(acc), edges,
                              negative_slope)
    return out.to(dtype)
