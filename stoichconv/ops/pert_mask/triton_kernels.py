"""Triton kernels of the pert-mask ops: the batched edge filter for gene deletions, the
reaction keep-mask and the bipartite filter.

The semantics are stated once, in :mod:`stoichconv.ops.pert_mask`. Each op has the schema
and outputs of its compiled counterpart plus a trailing ``bool validate=True``:

* ``stoichconv::triton_filter_edges(Tensor edge_index, int num_nodes, Tensor pert,
  Tensor pert_ptr, bool relabel, bool validate=True) -> (Tensor edge_index_out [2, E_out],
  Tensor edge_ptr [B + 1], Tensor edge_keep [B*E], Tensor node_keep [B*N], Tensor node_ptr [B + 1])``,
  ``node_ptr`` the cumulative kept-node counts in both layouts;
* ``stoichconv::triton_reaction_keep(Tensor gpr_index, int num_reactions, Tensor pert,
  Tensor pert_ptr, bool validate=True) -> Tensor [B, num_reactions] bool``;
* ``stoichconv::triton_filter_bipartite(Tensor edge_index, int num_src, int num_dst,
  int num_samples, Tensor? src_keep, Tensor? dst_keep, bool relabel, bool validate=True)
  -> (Tensor edge_index_out [2, E_out], Tensor edge_ptr [B + 1], Tensor edge_keep [B*E],
  Tensor edge_id [E_out])``.

They are the ``backend="triton"`` of the public functions of :mod:`stoichconv.ops.pert_mask`
(which check values themselves when asked and then call these with ``validate=False``). Types,
shapes and devices are always checked. Index *values*:

* ``validate=True`` (the default of a direct ``torch.ops`` call): the Python checks of
  :mod:`.validation` (``ValueError``; one host sync per reduction on a GPU);
* ``validate=False``: no Python value check; the operator computes the compiled kernels'
  checks on the device (:func:`~stoichconv.ops.pert_mask.validation.value_witnesses`), reads
  them in the host sync it makes anyway (the read of the output size E_out of the two
  filters; ``reaction_keep``, whose output size is known, makes that one sync for them) and
  raises the compiled CPU kernel's ``RuntimeError`` word for word
  (:func:`~stoichconv.ops.pert_mask.validation.raise_kernel_value_error`). So bad input gives
  the same error as the ``cpu`` and ``cuda`` operators, with one host sync per call, on CPU
  tensors (the interpreter) and CUDA tensors alike. Until that read the kernels run on the
  unchecked values: every id they use as an offset is masked to its bounds, so nothing reads
  or writes outside the tensors.

Integer inputs of any width are accepted and widened to int64.

Kernels of ``filter_edges`` (one pass over the wildtype edges to count, one to write; no
atomics, so the output is deterministic):

1. ``_delete_nodes_kernel``, one program per sample: stores False into
   ``node_keep`` at the sample's deleted nodes (duplicate deletions store the
   same value again: idempotent, no atomics needed).
2. ``_edge_count_kernel``, one program per (edge block, sample): the edge keep
   flags of the block and the block's kept count.
3. Scan (``torch.cumsum`` on the small [B, E / BLOCK_E] count array, plus the
   node-rank scan over ``node_keep`` when relabelling): output offsets of every
   block, ``edge_ptr`` and ``node_ptr``. The one host sync reads E_out (with the
   device-side value checks when ``validate=False``).
4. ``_edge_write_kernel``, one program per (edge block, sample): compaction
   with a within-block exclusive scan (``tl.cumsum``) of the keep flags,
   writing the (relabelled) endpoints of kept edges.

``filter_bipartite`` is the same count / scan / write with a keep-mask per side
(``_bipartite_count_kernel``, ``_bipartite_write_kernel``, which also writes ``edge_id``);
the compacted ids of a masked side are the global ranks of its kept nodes (a ``cumsum`` of
the flattened mask), an unmasked side is numbered ``b * N_side + v`` in both layouts.

``reaction_keep`` (``_reaction_keep_kernel``) is one program per (GPR-edge block, sample):
each edge's gene is compared with the sample's deletions in tiles of ``_BLOCK_P`` (deletions
are few) and the edges hit store False into ``keep[b, reaction]``. Several edges may store
that same False into one reaction: idempotent, no atomics, deterministic. Loads of ``pert``
and stores into ``keep`` are masked to their bounds, so even unchecked values cannot reach
outside the tensors. No host sync with ``validate=True`` beyond the Python checks' (the output
size is known); one, for the device-side checks, with ``validate=False``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from stoichconv.ops.pert_mask import registration
from stoichconv.ops.pert_mask.validation import (
    ANY_ID,
    check_count,
    check_edge_index,
    check_keep,
    check_perturbations,
    raise_kernel_value_error,
    value_witnesses,
)

__all__ = ["triton_filter_bipartite", "triton_filter_edges", "triton_reaction_keep"]

_BLOCK_E = 128  # edges per program
_BLOCK_P = 32  # deletions per loop iteration


@triton.jit
def _delete_nodes_kernel(pert, pert_ptr, node_keep, N, P, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # bounds clamped to [0, P] and ids masked to [0, N): unchecked values stay in the tensors
    start = tl.minimum(tl.maximum(tl.load(pert_ptr + b), 0), P)
    end = tl.minimum(tl.maximum(tl.load(pert_ptr + b + 1), start), P)
    offs = tl.arange(0, BLOCK_P)
    zeros = tl.zeros([BLOCK_P], dtype=node_keep.dtype.element_ty)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + offs
        m = p < end
        v = tl.load(pert + p, mask=m, other=0)
        tl.store(node_keep + b * N + v, zeros, mask=m & (v >= 0) & (v < N))


@triton.jit
def _edge_count_kernel(edge_index, node_keep, edge_keep, counts, E, N, num_blocks,
                       BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    src = tl.load(edge_index + e, mask=m, other=0)
    dst = tl.load(edge_index + E + e, mask=m, other=0)
    m = m & (src >= 0) & (src < N) & (dst >= 0) & (dst < N)  # an unchecked bad id: dropped, raised later
    keep_src = tl.load(node_keep + b * N + src, mask=m, other=0)
    keep_dst = tl.load(node_keep + b * N + dst, mask=m, other=0)
    kept = (keep_src != 0) & (keep_dst != 0) & m
    tl.store(edge_keep + b * E + e, kept.to(edge_keep.dtype.element_ty), mask=e < E)
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


def _check_args(edge_index, num_nodes, pert, pert_ptr, values: bool = True) -> None:
    """The checks of the public :func:`~stoichconv.ops.pert_mask.filter_edges`; index values
    only with ``values``."""
    check_count("num_nodes", num_nodes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_nodes, values=values)
    check_edge_index("edge_index", edge_index, num_nodes, num_nodes, pert.device, values=values)


def _read(sizes: Optional[Tensor], witnesses: Optional[Tensor], raise_error) -> list:
    """The one host sync of an operator: ``sizes`` (device int64 [k], the output sizes) and the
    device-side ``witnesses`` (or None: values checked in Python) in one copy; calls
    ``raise_error(witness list)`` first. Returns the sizes as Python ints."""
    parts = [t for t in (sizes, witnesses) if t is not None]
    if not parts:
        return []
    host = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()
    k = 0 if sizes is None else sizes.numel()
    if witnesses is not None:
        raise_error(host[k:])
    return host[:k]


def _buffer(into: Optional[dict], name: str, n: int, make):
    """An output of ``n`` elements: the first ``n`` of the caller's buffer ``into[name]`` (the
    ``*_out`` operators, buffers checked by their public wrapper) or ``make()``."""
    if into is None:
        return make()
    return into[name].view(-1)[:n]


def _edges(into: Optional[dict], E_out: int, device) -> Tensor:
    """The edge list [2, E_out]: a view of the first 2 * E_out values of ``into["edge_index"]``
    or a fresh tensor."""
    if into is None:
        return torch.empty(2, E_out, dtype=torch.int64, device=device)
    return into["edge_index"].view(-1)[:2 * E_out].view(2, E_out)


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("stoichconv::triton_filter_edges", mutates_args=())
def triton_filter_edges(
    edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor, relabel: bool, validate: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton batched edge filter: ``(edge_index_out, edge_ptr, edge_keep, node_keep, node_ptr)``
    (semantics in the module docstring)."""
    _check_args(edge_index, num_nodes, pert, pert_ptr, values=bool(validate))
    with _device_guard(edge_index.device):
        return _filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel, check_on_device=not validate)


def _filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel, check_on_device, into=None):
    device = edge_index.device
    N, E, B = num_nodes, edge_index.size(1), pert_ptr.numel() - 1
    edge_index = edge_index.to(torch.int64).contiguous()
    pert = pert.to(torch.int64).contiguous()
    pert_ptr = pert_ptr.to(torch.int64).contiguous()
    P = pert.numel()
    witnesses = value_witnesses(edge_index, N, N, pert, pert_ptr, N) if check_on_device else None

    def raise_error(host):
        raise_kernel_value_error("filter_edges", "edge_index", host, N, N, P, N)

    node_keep = _buffer(into, "node_keep", B * N, lambda: torch.empty(B * N, dtype=torch.bool, device=device))
    node_keep.fill_(True)
    edge_keep = _buffer(into, "edge_keep", B * E, lambda: torch.empty(B * E, dtype=torch.bool, device=device))
    edge_keep.zero_()
    if B > 0 and P > 0:
        _delete_nodes_kernel[(B,)](pert, pert_ptr, node_keep.view(torch.uint8), N, P, BLOCK_P=_BLOCK_P)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    node_ptr = torch.cat([zero, torch.cumsum(node_keep.view(B, N).sum(1), 0)])
    if into is not None:
        node_ptr = into["node_ptr"].view(-1)[:B + 1].copy_(node_ptr)
    if relabel:
        # Rank among all kept nodes in sample-major order = rank within the
        # sample + kept nodes of the earlier samples (the PyG collate numbering).
        new_id = torch.cumsum(node_keep.to(torch.int64), 0) - 1
    else:
        new_id = zero

    num_blocks = triton.cdiv(E, _BLOCK_E)
    if B == 0 or num_blocks == 0:
        _read(None, witnesses, raise_error)
        edge_ptr = _buffer(into, "edge_ptr", B + 1, lambda: torch.empty(B + 1, dtype=torch.int64, device=device))
        return _edges(into, 0, device), edge_ptr.zero_(), edge_keep, node_keep, node_ptr
    counts = torch.empty(B * num_blocks, dtype=torch.int64, device=device)
    _edge_count_kernel[(num_blocks, B)](
        edge_index, node_keep.view(torch.uint8), edge_keep.view(torch.uint8), counts, E, N, num_blocks,
        BLOCK_E=_BLOCK_E,
    )
    inclusive = torch.cumsum(counts, 0)
    offsets = inclusive - counts
    edge_ptr = torch.cat([zero, inclusive.view(B, num_blocks)[:, -1]])
    if into is not None:
        edge_ptr = into["edge_ptr"].view(-1)[:B + 1].copy_(edge_ptr)
    (E_out,) = _read(edge_ptr[-1:], witnesses, raise_error)  # the one host sync: the output size
    out = _edges(into, E_out, device)
    if E_out > 0:
        _edge_write_kernel[(num_blocks, B)](
            edge_index, edge_keep.view(torch.uint8), offsets, new_id, out, E, N, E_out, num_blocks,
            RELABEL=bool(relabel), BLOCK_E=_BLOCK_E,
        )
    return out, edge_ptr, edge_keep, node_keep, node_ptr


triton_filter_edges.register_fake(
    lambda edge_index, num_nodes, pert, pert_ptr, relabel, validate=True:
    registration.filter_edges_fake(edge_index, num_nodes, pert, pert_ptr, relabel))


@torch.library.custom_op("stoichconv::triton_filter_edges_out",
                         mutates_args=("edge_index_out", "edge_ptr_out", "edge_keep_out", "node_keep_out",
                                       "node_ptr_out"))
def triton_filter_edges_out(
    edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor, relabel: bool, edge_index_out: Tensor,
    edge_ptr_out: Tensor, edge_keep_out: Tensor, node_keep_out: Tensor, node_ptr_out: Tensor,
    validate: bool = True,
) -> None:
    """:func:`triton_filter_edges` into caller buffers (the ``stoichconv::filter_edges_out``
    layout; the buffers are checked by :func:`stoichconv.ops.pert_mask.filter_edges`)."""
    _check_args(edge_index, num_nodes, pert, pert_ptr, values=bool(validate))
    into = dict(edge_index=edge_index_out, edge_ptr=edge_ptr_out, edge_keep=edge_keep_out,
                node_keep=node_keep_out, node_ptr=node_ptr_out)
    with _device_guard(edge_index.device):
        _filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel, check_on_device=not validate, into=into)


triton_filter_edges_out.register_fake(lambda *args, **kwargs: None)


# --------------------------------------------------------------------------
# reaction_keep
# --------------------------------------------------------------------------


@triton.jit
def _reaction_keep_kernel(gpr_index, pert, pert_ptr, keep, E, P, R,
                          BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    gene = tl.load(gpr_index + e, mask=m, other=-1)
    reaction = tl.load(gpr_index + E + e, mask=m, other=0)
    start = tl.minimum(tl.maximum(tl.load(pert_ptr + b), 0), P)  # unchecked bounds: clamped to [0, P]
    end = tl.minimum(tl.maximum(tl.load(pert_ptr + b + 1), start), P)
    offs = tl.arange(0, BLOCK_P)
    hit = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + offs
        pm = (p < end) & (p >= 0)
        deleted = tl.load(pert + p, mask=pm, other=-1)
        match = (gene[:, None] == deleted[None, :]) & pm[None, :]
        hit = tl.maximum(hit, tl.max(match.to(tl.int32), axis=1))
    write = m & (hit != 0) & (reaction >= 0) & (reaction < R)
    tl.store(keep + b * R + reaction, tl.zeros([BLOCK_E], dtype=keep.dtype.element_ty), mask=write)


@torch.library.custom_op("stoichconv::triton_reaction_keep", mutates_args=())
def triton_reaction_keep(gpr_index: Tensor, num_reactions: int, pert: Tensor, pert_ptr: Tensor,
                         validate: bool = True) -> Tensor:
    """Triton reaction keep-mask [B, num_reactions] bool (semantics in :mod:`stoichconv.ops.pert_mask`)."""
    return _reaction_keep(gpr_index, num_reactions, pert, pert_ptr, validate, None)


def _reaction_keep(gpr_index, num_reactions, pert, pert_ptr, validate, into):
    check_count("num_reactions", num_reactions)
    values = bool(validate)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, None, values=values)
    gpr_index = check_edge_index("gpr_index", gpr_index, None, num_reactions, pert.device,
                                 src_name="num_genes", dst_name="num_reactions", values=values)
    B, E, R, P = pert_ptr.numel() - 1, gpr_index.size(1), num_reactions, pert.numel()
    witnesses = None if values else value_witnesses(gpr_index, ANY_ID, R, pert, pert_ptr, -1)
    if into is None:
        keep = torch.ones(B, R, dtype=torch.bool, device=pert.device)
    else:
        keep = into.view(-1)[:B * R].fill_(True).view(B, R)
    if B * R > 0 and E > 0 and P > 0:
        with _device_guard(pert.device):
            _reaction_keep_kernel[(triton.cdiv(E, _BLOCK_E), B)](
                gpr_index, pert, pert_ptr, keep.view(torch.uint8), E, P, R, BLOCK_E=_BLOCK_E, BLOCK_P=_BLOCK_P,
            )
    # with validate=False, the one host sync: the device-side checks
    _read(None, witnesses, lambda host: raise_kernel_value_error("reaction_keep", "gpr_index", host, ANY_ID, R, P))
    return keep


triton_reaction_keep.register_fake(
    lambda gpr_index, num_reactions, pert, pert_ptr, validate=True:
    registration.reaction_keep_fake(gpr_index, num_reactions, pert, pert_ptr))


@torch.library.custom_op("stoichconv::triton_reaction_keep_out", mutates_args=("out",))
def triton_reaction_keep_out(gpr_index: Tensor, num_reactions: int, pert: Tensor, pert_ptr: Tensor, out: Tensor,
                             validate: bool = True) -> None:
    """:func:`triton_reaction_keep` into the first B * num_reactions values of ``out``."""
    _reaction_keep(gpr_index, num_reactions, pert, pert_ptr, validate, out)


triton_reaction_keep_out.register_fake(lambda *args, **kwargs: None)


# --------------------------------------------------------------------------
# filter_bipartite
# --------------------------------------------------------------------------


@triton.jit
def _bipartite_count_kernel(edge_index, src_keep, dst_keep, edge_keep, counts, E, num_src, num_dst,
                            num_blocks, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr, BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    u = tl.load(edge_index + e, mask=m, other=0)
    v = tl.load(edge_index + E + e, mask=m, other=0)
    kept = m & (u >= 0) & (u < num_src) & (v >= 0) & (v < num_dst)  # an unchecked bad id: dropped, raised later
    if HAS_SRC:
        kept = kept & (tl.load(src_keep + b * num_src + u, mask=kept, other=0) != 0)
    if HAS_DST:
        kept = kept & (tl.load(dst_keep + b * num_dst + v, mask=kept, other=0) != 0)
    tl.store(edge_keep + b * E + e, kept.to(edge_keep.dtype.element_ty), mask=m)
    tl.store(counts + b * num_blocks + blk, tl.sum(kept.to(tl.int64), axis=0))


@triton.jit
def _bipartite_write_kernel(edge_index, edge_keep, offsets, src_id, dst_id, out, edge_id, E, num_src, num_dst,
                            E_out, num_blocks, SRC_RELABEL: tl.constexpr, DST_RELABEL: tl.constexpr,
                            BLOCK_E: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    m = e < E
    kept = tl.load(edge_keep + b * E + e, mask=m, other=0).to(tl.int64)
    rank = tl.cumsum(kept, axis=0) - kept  # exclusive scan within the block
    pos = tl.load(offsets + b * num_blocks + blk) + rank
    wm = m & (kept != 0)
    u = tl.load(edge_index + e, mask=wm, other=0)
    v = tl.load(edge_index + E + e, mask=wm, other=0)
    if SRC_RELABEL:
        u = tl.load(src_id + b * num_src + u, mask=wm, other=0)
    else:
        u = b * num_src + u
    if DST_RELABEL:
        v = tl.load(dst_id + b * num_dst + v, mask=wm, other=0)
    else:
        v = b * num_dst + v
    tl.store(out + pos, u, mask=wm)
    tl.store(out + E_out + pos, v, mask=wm)
    tl.store(edge_id + pos, e, mask=wm)


@torch.library.custom_op("stoichconv::triton_filter_bipartite", mutates_args=())
def triton_filter_bipartite(edge_index: Tensor, num_src: int, num_dst: int, num_samples: int,
                            src_keep: Optional[Tensor], dst_keep: Optional[Tensor], relabel: bool,
                            validate: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton bipartite filter: ``(edge_index_out, edge_ptr, edge_keep, edge_id)`` (semantics in
    :mod:`stoichconv.ops.pert_mask`)."""
    for name, value in (("num_src", num_src), ("num_dst", num_dst), ("num_samples", num_samples)):
        check_count(name, value)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"`edge_index` must be a torch.Tensor, got {type(edge_index).__name__}")
    device = edge_index.device
    edge_index = check_edge_index("edge_index", edge_index, num_src, num_dst, device, src_name="num_src",
                                  dst_name="num_dst", values=bool(validate))
    src_keep = check_keep("src_keep", src_keep, num_samples, num_src, device)
    dst_keep = check_keep("dst_keep", dst_keep, num_samples, num_dst, device)
    witnesses = None if validate else value_witnesses(edge_index, num_src, num_dst)
    with _device_guard(device):
        return _filter_bipartite(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel, witnesses)


@torch.library.custom_op("stoichconv::triton_filter_bipartite_out",
                         mutates_args=("edge_index_out", "edge_ptr_out", "edge_keep_out", "edge_id_out"))
def triton_filter_bipartite_out(edge_index: Tensor, num_src: int, num_dst: int, num_samples: int,
                                src_keep: Optional[Tensor], dst_keep: Optional[Tensor], relabel: bool,
                                edge_index_out: Tensor, edge_ptr_out: Tensor, edge_keep_out: Tensor,
                                edge_id_out: Tensor, validate: bool = True) -> None:
    """:func:`triton_filter_bipartite` into caller buffers (the ``stoichconv::filter_bipartite_out``
    layout; buffers checked by :func:`stoichconv.ops.pert_mask.filter_bipartite`)."""
    device = edge_index.device
    edge_index = check_edge_index("edge_index", edge_index, num_src, num_dst, device, src_name="num_src",
                                  dst_name="num_dst", values=bool(validate))
    src_keep = check_keep("src_keep", src_keep, num_samples, num_src, device)
    dst_keep = check_keep("dst_keep", dst_keep, num_samples, num_dst, device)
    witnesses = None if validate else value_witnesses(edge_index, num_src, num_dst)
    into = dict(edge_index=edge_index_out, edge_ptr=edge_ptr_out, edge_keep=edge_keep_out, edge_id=edge_id_out)
    with _device_guard(device):
        _filter_bipartite(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel, witnesses, into)


def _global_ranks(keep: Tensor) -> Tensor:
    """Compacted ids [B * N]: the rank of each kept node among all kept nodes in sample-major
    order (the PyG collate numbering); removed nodes are never read."""
    return torch.cumsum(keep.reshape(-1).to(torch.int64), 0) - 1


def _filter_bipartite(edge_index, num_src, num_dst, B, src_keep, dst_keep, relabel, witnesses, into=None):
    device = edge_index.device
    E = edge_index.size(1)

    def raise_error(host):
        raise_kernel_value_error("filter_bipartite", "edge_index", host, num_src, num_dst)

    edge_keep = _buffer(into, "edge_keep", B * E, lambda: torch.empty(B * E, dtype=torch.bool, device=device))
    edge_keep.zero_()
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    num_blocks = triton.cdiv(E, _BLOCK_E)
    if B == 0 or num_blocks == 0:
        _read(None, witnesses, raise_error)
        edge_ptr = _buffer(into, "edge_ptr", B + 1, lambda: torch.empty(B + 1, dtype=torch.int64, device=device))
        edge_id = _buffer(into, "edge_id", 0, lambda: edge_index.new_empty(0))
        return _edges(into, 0, device), edge_ptr.zero_(), edge_keep, edge_id
    counts = torch.empty(B * num_blocks, dtype=torch.int64, device=device)
    src_bytes = src_keep.view(torch.uint8) if src_keep is not None else counts
    dst_bytes = dst_keep.view(torch.uint8) if dst_keep is not None else counts
    _bipartite_count_kernel[(num_blocks, B)](
        edge_index, src_bytes, dst_bytes, edge_keep.view(torch.uint8), counts, E, num_src, num_dst, num_blocks,
        HAS_SRC=src_keep is not None, HAS_DST=dst_keep is not None, BLOCK_E=_BLOCK_E,
    )
    inclusive = torch.cumsum(counts, 0)
    offsets = inclusive - counts
    edge_ptr = torch.cat([zero, inclusive.view(B, num_blocks)[:, -1]])
    if into is not None:
        edge_ptr = into["edge_ptr"].view(-1)[:B + 1].copy_(edge_ptr)
    (E_out,) = _read(edge_ptr[-1:], witnesses, raise_error)  # the one host sync: the output size
    out = _edges(into, E_out, device)
    edge_id = _buffer(into, "edge_id", E_out, lambda: torch.empty(E_out, dtype=torch.int64, device=device))
    if E_out > 0:
        src_relabel = bool(relabel) and src_keep is not None
        dst_relabel = bool(relabel) and dst_keep is not None
        _bipartite_write_kernel[(num_blocks, B)](
            edge_index, edge_keep.view(torch.uint8), offsets,
            _global_ranks(src_keep) if src_relabel else zero, _global_ranks(dst_keep) if dst_relabel else zero,
            out, edge_id, E, num_src, num_dst, E_out, num_blocks,
            SRC_RELABEL=src_relabel, DST_RELABEL=dst_relabel, BLOCK_E=_BLOCK_E,
        )
    return out, edge_ptr, edge_keep, edge_id


triton_filter_bipartite.register_fake(
    lambda edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel, validate=True:
    registration.filter_bipartite_fake(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel))


triton_filter_bipartite_out.register_fake(lambda *args, **kwargs: None)
