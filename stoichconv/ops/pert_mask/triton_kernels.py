"""Triton batched edge filter for gene deletions.

The semantics of ``filter_edges`` are stated once, in
:mod:`stoichconv.ops.pert_mask`; ``stoichconv::triton_filter_edges(edge_index,
num_nodes, pert, pert, relabel)`` has the schema and outputs of the
compiled ``stoichconv::filter_edges``: ``(edge_index_out [2, E_out] int64,
edge_ptr [B + 1] int64, edge_keep [B*E] bool, node_keep [B*N] bool,
node_ptr [B + 1] int64)``, ``node_ptr`` the cumulative kept-node counts in
both layouts. It is the ``backend="triton"`` of
:func:`stoichconv.ops.pert_mask.filter_edges`. Index values are checked here
too (the interpreter and the GPU have no bounds protection); integer inputs
of any width are accepted and widened to int64.

Kernels (one pass over the wildtype edges to count, one to write; no atomics,
so the output is deterministic):

1. ``_delete_nodes_kernel``, one program per sample: stores False into
   ``node_keep`` at the sample's deleted nodes (duplicate deletions store the
   same value again: idempotent, no atomics needed).
2. ``_edge_count_kernel``, one program per (edge block, sample): the edge keep
   flags of the block and the block's kept count.
3. Scan (``torch.cumsum`` on the small [B, E / BLOCK_E] count array, plus the
   node-rank scan over ``node_keep`` when relabelling): output offsets of every
   block, ``edge_ptr`` and ``node_ptr``. Besides the input value checks, the
   one host sync reads E_out.
4. ``_edge_write_kernel``, one program per (edge block, sample): compaction
   with a within-block exclusive scan (``tl.cumsum``) of the keep flags,
   writing the (relabelled) endpoints of kept edges.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from stoichconv.ops.pert_mask import registration
from stoichconv.ops.pert_mask.validation import check_count, check_edge_index, check_perturbations

__all__ = ["triton_filter_edges"]

_BLOCK_E = 128  # edges per program
_BLOCK_P = 32  # deletions per loop iteration


@triton.jit
def _delete_nodes_kernel(pert, pert_ptr, node_keep, N, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(pert_ptr + b)
    end = tl.load(pert_ptr + b + 1)
    offs = tl.arange(0, BLOCK_P)
    zeros = tl.zeros([BLOCK_P], dtype=node_keep.dtype.element_ty)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + offs
        m = p < end
        v = tl.load(pert + p, mask=m, other=0)
        tl.store(node_keep + b * N + v, zeros, mask=m)


@triton.jit
def _edge_count_kernel(edge_index, node_keep, edge_keep, counts, E, N, num_blocks,
                       BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    src = tl.load(edge_index + e, mask=m, other=0)
    dst = tl.load(edge_index + E + e, mask=m, other=0)
    keep_src = tl.load(node_keep + b * N + src, mask=m, other=0)
    keep_dst = tl.load(node_keep + b * N + dst, mask=m, other=0)
    kept = (keep_src != 0) & (keep_dst != 0) & m
    tl.store(edge_keep + b * E + e, kept.to(edge_keep.dtype.element_ty), mask=m)
    tl.store(counts + b * num_blocks + blk, tl.sum(kept.to(tl.int64), axis=0))


@triton.jit
def _edge_write_kernel(edge_index, edge_keep, offsets, new_id, out, E, N, E_out,
                       num_blocks, RELABEL: tl.constexpr, BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    kept = tl.load(edge_keep + b * E + e, mask=m, other=0).to(tl.int64)
    rank = tl.cumsum(kept, axis=0) - kept  # exclusive scan within the block
    pos = tl.load(offsets + b * num_blocks + blk) + rank
    wm = m & (kept != 0)
    src = tl.load(edge_index + e, mask=wm, other=0)
    dst = tl.load(edge_index + E + e, mask=wm, other=0)
    if RELABEL:
        src = tl.load(new_id + b * N + src, mask=wm, other=0)
        dst = tl.load(new_id + b * N + dst, mask=wm, other=0)
    else:
        src = b * N + src
        dst = b * N + dst
    tl.store(out + pos, src, mask=wm)
    tl.store(out + E_out + pos, dst, mask=wm)


def _check_args(edge_index, num_nodes, pert, pert_ptr) -> None:
    """The checks of the public :func:`~stoichconv.ops.pert_mask.filter_edges` (index values
    included: the interpreter and the GPU have no bounds protection)."""
    check_count("num_nodes", num_nodes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_nodes)
    check_edge_index("edge_index", edge_index, num_nodes, num_nodes, pert.device)


@torch.library.custom_op("stoichconv::triton_filter_edges", mutates_args=())
def triton_filter_edges(
    edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor, relabel: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton batched edge filter: ``(edge_index_out, edge_ptr, edge_keep, node_keep, node_ptr)``
    (semantics in the module docstring)."""
    _check_args(edge_index, num_nodes, pert, pert_ptr)
    device = edge_index.device
    # Triton launches on the current CUDA device: make it the tensors' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel)


def _filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel):
    device = edge_index.device
    N, E, B = num_nodes, edge_index.size(1), pert_ptr.numel() - 1
    edge_index = edge_index.to(torch.int64).contiguous()
    pert = pert.to(torch.int64).contiguous()
    pert_ptr = pert_ptr.to(torch.int64).contiguous()

    node_keep = torch.ones(B * N, dtype=torch.bool, device=device)
    edge_keep = torch.zeros(B * E, dtype=torch.bool, device=device)
    if B > 0 and pert.numel() > 0:
        _delete_nodes_kernel[(B,)](pert, pert_ptr, node_keep.view(torch.uint8), N, BLOCK_P=_BLOCK_P)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    node_ptr = torch.cat([zero, torch.cumsum(node_keep.view(B, N).sum(1), 0)])
    if relabel:
        # Rank among all kept nodes in sample-major order = rank within the
        # sample + kept nodes of the earlier samples (the PyG collate numbering).
        new_id = torch.cumsum(node_keep.to(torch.int64), 0) - 1
    else:
        new_id = zero

    num_blocks = triton.cdiv(E, _BLOCK_E)
    if B == 0 or num_blocks == 0:
        edge_ptr = torch.zeros(B + 1, dtype=torch.int64, device=device)
        return edge_index.new_empty(2, 0), edge_ptr, edge_keep, node_keep, node_ptr
    counts = torch.empty(B * num_blocks, dtype=torch.int64, device=device)
    _edge_count_kernel[(num_blocks, B)](
        edge_index, node_keep.view(torch.uint8), edge_keep.view(torch.uint8), counts, E, N, num_blocks,
        BLOCK_E=_BLOCK_E,
    )
    inclusive = torch.cumsum(counts, 0)
    offsets = inclusive - counts
    edge_ptr = torch.cat([zero, inclusive.view(B, num_blocks)[:, -1]])
    E_out = int(edge_ptr[-1])  # the one host sync: the output size
    out = torch.empty(2, E_out, dtype=torch.int64, device=device)
    if E_out > 0:
        _edge_write_kernel[(num_blocks, B)](
            edge_index, edge_keep.view(torch.uint8), offsets, new_id, out, E, N, E_out, num_blocks,
            RELABEL=bool(relabel), BLOCK_E=_BLOCK_E,
        )
    return out, edge_ptr, edge_keep, node_keep, node_ptr


triton_filter_edges.register_fake(registration.filter_edges_fake)
