"""Triton batched edge filter for gene deletions (spec: ``pert_mask.md``).

The semantics of ``filter_edges`` are stated once, in
:mod:`stoichconv.ops.pert_mask`; ``stoichconv::triton_filter_edges(edge_index,
num_nodes, pert, pert_ptr, relabel)`` has the schema and outputs of the
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

__all__ = ["triton_filter_edges"]

_BLOCK_E = 128  # edges per program
_BLOCK_P = 32  # deletions per loop iteration


@triton.jit
def _delete_nodes_kernel(pert_ptr, pert_ptr_ptr, node_keep_ptr, N, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(pert_ptr_ptr + b)
    end = tl.load(pert_ptr_ptr + b + 1)
    offs = tl.arange(0, BLOCK_P)
    zeros = tl.zeros([BLOCK_P], dtype=node_keep_ptr.dtype.element_ty)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + offs
        m = p < end
        v = tl.load(pert_ptr + p, mask=m, other=0)
        tl.store(node_keep_ptr + b * N + v, zeros, mask=m)


@triton.jit
def _edge_count_kernel(edge_index_ptr, node_keep_ptr, edge_keep_ptr, count_ptr, E, N, num_blocks,
                       BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    src = tl.load(edge_index_ptr + e, mask=m, other=0)
    dst = tl.load(edge_index_ptr + E + e, mask=m, other=0)
    keep_src = tl.load(node_keep_ptr + b * N + src, mask=m, other=0)
    keep_dst = tl.load(node_keep_ptr + b * N + dst, mask=m, other=0)
    kept = (keep_src != 0) & (keep_dst != 0) & m
    tl.store(edge_keep_ptr + b * E + e, kept.to(edge_keep_ptr.dtype.element_ty), mask=m)
    tl.store(count_ptr + b * num_blocks + blk, tl.sum(kept.to(tl.int64), axis=0))


@triton.jit
def _edge_write_kernel(edge_index_ptr, edge_keep_ptr, offset_ptr, new_id_ptr, out_ptr, E, N, E_out,
                       num_blocks, RELABEL: tl.constexpr, BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    kept = tl.load(edge_keep_ptr + b * E + e, mask=m, other=0).to(tl.int64)
    rank = tl.cumsum(kept, axis=0) - kept  # exclusive scan within the block
    pos = tl.load(offset_ptr + b * num_blocks + blk) + rank
    wm = m & (kept != 0)
    src = tl.load(edge_index_ptr + e, mask=wm, other=0)
    dst = tl.load(edge_index_ptr + E + e, mask=wm, other=0)
    if RELABEL:
        src = tl.load(new_id_ptr + b * N + src, mask=wm, other=0)
        dst = tl.load(new_id_ptr + b * N + dst, mask=wm, other=0)
    else:
        src = b * N + src
        dst = b * N + dst
    tl.store(out_ptr + pos, src, mask=wm)
    tl.store(out_ptr + E_out + pos, dst, mask=wm)


def _check_index(name: str, t, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer indices, got dtype {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"`{name}` must be {dim}-D, got shape {tuple(t.shape)}")


def _check_args(edge_index, num_nodes, pert, pert_ptr) -> None:
    _check_index("edge_index", edge_index, 2)
    if edge_index.size(0) != 2:
        raise ValueError(f"`edge_index` must have shape [2, E], got {tuple(edge_index.shape)}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"`num_nodes` must be a non-negative int, got {num_nodes!r}")
    _check_index("pert", pert, 1)
    _check_index("pert_ptr", pert_ptr, 1)
    for name, t in (("pert", pert), ("pert_ptr", pert_ptr)):
        if t.device != edge_index.device:
            raise ValueError(f"`{name}` is on {t.device} but `edge_index` is on {edge_index.device}")
    if pert_ptr.numel() < 1:
        raise ValueError("`pert_ptr` must have length B + 1 >= 1")
    # Value checks (one small host sync; the output size needs one anyway).
    if int(pert_ptr[0]) != 0 or int(pert_ptr[-1]) != pert.numel():
        raise ValueError(f"`pert_ptr` must start at 0 and end at len(pert) = {pert.numel()}")
    if pert_ptr.numel() > 1 and bool((pert_ptr[1:] < pert_ptr[:-1]).any()):
        raise ValueError("`pert_ptr` must be non-decreasing")
    if pert.numel() > 0 and (int(pert.min()) < 0 or int(pert.max()) >= num_nodes):
        raise ValueError(f"`pert` holds node ids out of range [0, num_nodes = {num_nodes})")
    if edge_index.numel() > 0 and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"`edge_index` holds node ids out of range [0, num_nodes = {num_nodes})")


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


@triton_filter_edges.register_fake
def _filter_edges_fake(edge_index, num_nodes, pert, pert_ptr, relabel):
    B = pert_ptr.shape[0] - 1
    E = edge_index.shape[1]
    E_out = torch.library.get_ctx().new_dynamic_size()
    long = dict(dtype=torch.int64, device=edge_index.device)
    return (
        torch.empty(2, E_out, **long),
        torch.empty(B + 1, **long),
        torch.empty(B * E, dtype=torch.bool, device=edge_index.device),
        torch.empty(B * num_nodes, dtype=torch.bool, device=edge_index.device),
        torch.empty(B + 1, **long),
    )
