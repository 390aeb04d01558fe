"""Batched perturbation masking operators.

Semantics
---------
A batch of B samples shares one wildtype graph; sample b deletes the set P_b
of node (gene) ids, given in CSR form: ``pert`` [P] ids and ``pert_ptr``
[B + 1] (sample b owns ``pert[pert_ptr[b]:pert_ptr[b + 1]]``). Ids may repeat
within a sample (they count once) and come in any order; a set may be empty;
B = 0 and E = 0 are valid.

* ``filter_edges(edge_index [2, E], num_nodes N, pert, pert_ptr, relabel)``
  for a homogeneous (gene-gene) relation. Sample b keeps every node not in
  P_b and every edge whose two endpoints are kept. Returns
  ``(edge_index_out [2, E_out], edge_ptr [B + 1], edge_keep [B*E] bool,
  node_keep [B*N] bool, node_ptr [B + 1])``: the surviving edges of all
  samples concatenated in sample order, wildtype order within a sample,
  ``edge_ptr`` their per-sample CSR offsets, ``edge_keep[b*E + e]`` / ``node_keep[b*N + v]``
  the full-layout keep-masks (True = kept), ``node_ptr`` the cumulative kept
  node counts. With ``relabel=True`` (compacted layout) a kept node v of
  sample b is numbered ``node_ptr[b] + rank`` where ``rank = v - #{d in P_b :
  d < v}`` is its rank among the kept nodes of the sample: exactly
  ``torch_geometric.utils.subgraph(keep_b, edge_index, relabel_nodes=True)``
  per sample followed by ``Batch.from_data_list``. With ``relabel=False``
  (full layout) it is ``b*N + v``.
* ``reaction_keep(gpr_index [2, E_gpr], num_reactions R, pert, pert_ptr)``
  -> [B, R] bool: reaction r of sample b is removed iff at least one gene g
  with a GPR pair ``(g, r)`` is in P_b (each reaction node is one AND-set);
  reactions with no GPR gene are never removed.
* ``filter_bipartite(edge_index [2, E], num_src, num_dst, num_samples,
  src_keep [B, num_src] | None, dst_keep [B, num_dst] | None, relabel)``:
  generic bipartite filter (GPR pairs, metabolic incidences). Edge (u, v) of
  sample b survives iff ``src_keep[b, u]`` and ``dst_keep[b, v]`` (a missing
  mask keeps everything). Returns ``(edge_index_out [2, E_out], edge_ptr
  [B + 1], edge_keep [B*E] bool, edge_id [E_out])``, ``edge_id`` the wildtype
  position of each surviving edge (to gather edge attributes such as the
  stoichiometry). Each side is numbered like ``filter_edges`` numbers nodes,
  with its own kept counts: compacted ``(#kept of that type in samples < b) +
  rank among kept``, full ``b*N_side + v``. For the metabolic incidence
  (row 0 metabolite, row 1 reaction) this offsets the reaction row by
  reaction counts, the fix of PyG's default collation.

The compiled CPU kernels make one counting pass, a scan and one writing
pass. Deletions are few, so the counting pass tests per sample only the
edges with an endpoint removed in some sample, and the writing pass copies the
runs of surviving edges between a sample's removed ones: deterministic, no
atomics. Output sizes
are data dependent; the fake kernels declare them with
``torch.library.get_ctx().new_dynamic_size()`` so that ``torch.compile`` can
trace around the ops.

Backends (one :class:`~stoichconv.backends.OpSpec` per op: :data:`FILTER_EDGES`,
:data:`REACTION_KEEP`, :data:`FILTER_BIPARTITE`, :data:`KEPT_NODES`; the last as above):
``cpu`` / ``cuda`` run the
compiled ops (``csrc/cpu/pert_mask.cpp``, ``csrc/cuda/pert_mask.cpp``),
``triton`` runs ``stoichconv::triton_filter_edges`` / ``triton_reaction_keep`` /
``triton_filter_bipartite`` (:mod:`.triton_kernels`; they take the compiled op's arguments
plus ``validate``), ``reference`` runs :mod:`stoichconv.reference.pert_mask`
(PyG ``subgraph`` per sample and ``Batch.from_data_list``). Fake kernels:
:mod:`.registration`.

Validation. The public functions check types, shapes and devices, and with ``validate=True``
(the default) the index values in Python (``ValueError``, one host sync per reduction on a
GPU). Whatever ``validate`` says, the ``cpu``, ``cuda`` and ``triton`` kernels then check the
values themselves and raise the compiled CPU kernel's ``RuntimeError`` for bad ones, word for
word on every backend (texts in ``csrc/include/stoichconv/pert_mask_checks.h``): the CPU
kernel on the host, the CUDA kernels and the Triton operators (called with
``validate=False``: no Python check of their own) on the device, read in the one host sync of
the call (with the output size of ``filter_edges`` / ``filter_bipartite``; ``reaction_keep``
makes that one sync for the checks alone). So ``validate=False`` drops only the Python checks
and their syncs; the ``reference`` backend does not check values.

``out=`` variants. Each public function takes ``out=``, caller buffers sized for the worst
case (no deletion; :func:`allocate_filter_edges_out`, :func:`allocate_bipartite_out`, a bool
tensor of at least B * R elements for ``reaction_keep``): the op writes into their first
elements, flat (an edge list [2, E_out] as the first 2 * E_out values, so its view is
contiguous), and returns views equal to the result without ``out``. The compiled operators
``stoichconv::filter_edges_out`` / ``reaction_keep_out`` / ``filter_bipartite_out`` (CPU and
CUDA; schemas in ``csrc/stoichconv.cpp``) and the Triton ``stoichconv::triton_*_out`` take the
normal op's arguments plus the buffers and return nothing (fake kernels: no-ops); the
reference backend computes, then copies. A buffer of the wrong type, dtype or device, not
contiguous or too small raises before anything is written, naming it (``out.edge_index``,
...; the compiled ops name ``edge_index_out``, ...); value errors are the normal op's, word
for word. :class:`stoichconv.perturb.PerturbBatcher` is built on them.

Deletion sets of any size: the compiled kernels sort each sample's ids, then drop the repeats;
up to 32 ids (``kSmallSort``) by insertion, beyond that by a bottom-up merge sort (O(n log^2 n);
on CUDA one thread block per such sample), the per-set steps being the same inline functions
of ``csrc/include/stoichconv/pert_mask_math.h`` on the CPU and on CUDA.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv.backends import OpSpec, register_op, select
from stoichconv.ops._checks import check_size_product
from stoichconv.ops.pert_mask import registration  # noqa: F401  (fake kernels)
from stoichconv.ops.pert_mask.validation import (
    check_count,
    check_edge_index,
    check_keep,
    check_out_buffer,
    check_perturbations,
)
from stoichconv.types import FilteredBipartite, FilteredEdges, KeptNodes

__all__ = [
    "FILTER_BIPARTITE",
    "FILTER_EDGES",
    "KEPT_NODES",
    "REACTION_KEEP",
    "FilteredBipartite",
    "FilteredEdges",
    "KeptNodes",
    "allocate_bipartite_out",
    "allocate_filter_edges_out",
    "check_perturbations",
    "filter_bipartite",
    "filter_edges",
    "kept_nodes",
    "reaction_keep",
]

FILTER_EDGES = register_op(OpSpec(
    name="filter_edges",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="filter_edges",
    compiled_out="filter_edges_out",
    triton="stoichconv.ops.pert_mask.triton_kernels:triton_filter_edges",
    reference="stoichconv.reference.pert_mask:filter_edges_reference",
))
REACTION_KEEP = register_op(OpSpec(
    name="reaction_keep",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="reaction_keep",
    compiled_out="reaction_keep_out",
    triton="stoichconv.ops.pert_mask.triton_kernels:triton_reaction_keep",
    reference="stoichconv.reference.pert_mask:reaction_keep_reference",
))
FILTER_BIPARTITE = register_op(OpSpec(
    name="filter_bipartite",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="filter_bipartite",
    compiled_out="filter_bipartite_out",
    triton="stoichconv.ops.pert_mask.triton_kernels:triton_filter_bipartite",
    reference="stoichconv.reference.pert_mask:filter_bipartite_reference",
))
KEPT_NODES = register_op(OpSpec(
    name="kept_nodes",
    backends=("cpu", "reference"),
    compiled="kept_nodes",
    compiled_out="kept_nodes_out",
    reference="stoichconv.reference.pert_mask:kept_nodes_reference",
))


# --------------------------------------------------------------------------
# out= buffers
# --------------------------------------------------------------------------


def allocate_filter_edges_out(num_samples: int, num_edges: int, num_nodes: int,
                              device=None) -> FilteredEdges:
    """Buffers for ``filter_edges(..., out=)`` sized for the worst case (no deletion) of up to
    ``num_samples`` samples: ``edge_index`` [2 * B * E] int64 (flat: the op writes the
    [2, E_out] list as its first 2 * E_out values), ``edge_ptr`` / ``node_ptr`` [B + 1] int64,
    ``edge_keep`` [B * E] / ``node_keep`` [B * N] bool."""
    B, E, N = (check_count(n, v) for n, v in (("num_samples", num_samples), ("num_edges", num_edges),
                                                ("num_nodes", num_nodes)))
    long = dict(dtype=torch.int64, device=device)
    return FilteredEdges(torch.empty(2 * B * E, **long), torch.empty(B + 1, **long),
                         torch.empty(B * E, dtype=torch.bool, device=device),
                         torch.empty(B * N, dtype=torch.bool, device=device), torch.empty(B + 1, **long))


def allocate_bipartite_out(num_samples: int, num_edges: int, device=None) -> FilteredBipartite:
    """Buffers for ``filter_bipartite(..., out=)`` sized for the worst case: ``edge_index``
    [2 * B * E] int64 (flat), ``edge_ptr`` [B + 1] int64, ``edge_keep`` [B * E] bool,
    ``edge_id`` [B * E] int64."""
    B, E = check_count("num_samples", num_samples), check_count("num_edges", num_edges)
    long = dict(dtype=torch.int64, device=device)
    return FilteredBipartite(torch.empty(2 * B * E, **long), torch.empty(B + 1, **long),
                             torch.empty(B * E, dtype=torch.bool, device=device), torch.empty(B * E, **long))


def _check_out_tuple(out, kind: type, specs: dict, device) -> None:
    if not isinstance(out, kind):
        raise TypeError(f"`out` must be a {kind.__name__} of buffers (see allocate_*_out), got {type(out).__name__}")
    for field, (dtype, needed, what) in specs.items():
        check_out_buffer(f"out.{field}", getattr(out, field), dtype, device, needed, what)


def _edge_view(buffer: Tensor, total: int) -> Tensor:
    return buffer.view(-1)[:2 * total].view(2, total)


def _copy_into(buffer: Tensor, value: Tensor) -> Tensor:
    """``value`` copied into the first ``value.numel()`` values of ``buffer``, as a view of
    ``value``'s shape (the reference backend's out= path)."""
    return buffer.view(-1)[:value.numel()].copy_(value.reshape(-1)).view(value.shape)


# --------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------


def filter_edges(edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor, *,
                 relabel: bool = True, backend: str = "auto", validate: bool = True,
                 out: Optional[FilteredEdges] = None) -> FilteredEdges:
    """Filter one gene-gene relation for a batch of gene deletions (see the
    module docstring); returns a :class:`FilteredEdges`.

    ``validate=False`` skips the Python checks of index values (their host
    syncs; types, shapes and devices are still checked, and every kernel checks
    the values on its own, see the module docstring) for callers that validated
    them already.

    ``out``: a :class:`FilteredEdges` of caller buffers (:func:`allocate_filter_edges_out`),
    contiguous, on the inputs' device, at least ``edge_index`` 2 * B * E int64 (the worst
    case, no deletion), ``edge_ptr`` / ``node_ptr`` B + 1 int64, ``edge_keep`` B * E and
    ``node_keep`` B * N bool. The op writes into their first elements (``cpu`` / ``cuda``:
    ``stoichconv::filter_edges_out``; ``triton``: ``stoichconv::triton_filter_edges_out``;
    ``reference``: computed, then copied) and returns views of them, equal to the result
    without ``out``; the edge list is the first 2 * E_out values viewed as [2, E_out]
    (contiguous). The buffers must not overlap the inputs or each other."""
    num_nodes = check_count("num_nodes", num_nodes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_nodes, values=validate)
    edge_index = check_edge_index("edge_index", edge_index, num_nodes, num_nodes, pert.device, values=validate)
    B = pert_ptr.numel() - 1
    check_size_product("node_keep", B=B, num_nodes=num_nodes)
    check_size_product("edge_keep", B=B, E=edge_index.size(1))
    selected = select("filter_edges", backend, pert.device)
    if out is not None:
        return _filter_edges_out(selected, edge_index, num_nodes, pert, pert_ptr, bool(relabel), out)
    if selected.backend == "reference":
        return selected.fn(edge_index, num_nodes, pert, pert_ptr, relabel=bool(relabel))
    if selected.backend == "triton":  # values checked above or not at all in Python: on the device
        return FilteredEdges(*selected.fn(edge_index, num_nodes, pert, pert_ptr, bool(relabel), False))
    return FilteredEdges(*selected.fn(edge_index, num_nodes, pert, pert_ptr, bool(relabel)))


def _filter_edges_out(selected, edge_index, num_nodes, pert, pert_ptr, relabel, out) -> FilteredEdges:
    B, E, N = pert_ptr.numel() - 1, edge_index.size(1), num_nodes
    check_size_product("out.edge_index", B=B, E=E, two=2)
    long, flag = torch.int64, torch.bool
    _check_out_tuple(out, FilteredEdges, {
        "edge_index": (long, 2 * B * E, "2 * B * E"), "edge_ptr": (long, B + 1, "B + 1"),
        "edge_keep": (flag, B * E, "B * E"), "node_keep": (flag, B * N, "B * num_nodes"),
        "node_ptr": (long, B + 1, "B + 1")}, pert.device)
    if selected.backend == "reference":
        result = selected.fn(edge_index, num_nodes, pert, pert_ptr, relabel=relabel)
        return FilteredEdges(*(_copy_into(buffer, value) for buffer, value in zip(out, result)))
    if selected.backend == "triton":
        torch.ops.stoichconv.triton_filter_edges_out(edge_index, num_nodes, pert, pert_ptr, relabel, *out, False)
    else:
        torch.ops.stoichconv.filter_edges_out(edge_index, num_nodes, pert, pert_ptr, relabel, *out)
    edge_ptr = out.edge_ptr.view(-1)[:B + 1]
    total = int(edge_ptr[B])
    return FilteredEdges(_edge_view(out.edge_index, total), edge_ptr, out.edge_keep.view(-1)[:B * E],
                         out.node_keep.view(-1)[:B * N], out.node_ptr.view(-1)[:B + 1])


def reaction_keep(gpr_index: Tensor, num_reactions: int, pert: Tensor, pert_ptr: Tensor,
                  backend: str = "auto", *, num_genes: Optional[int] = None, validate: bool = True,
                  out: Optional[Tensor] = None) -> Tensor:
    """[B, num_reactions] bool reaction keep-mask (see the module docstring).
    ``num_genes``, when given, bounds the gene ids of ``pert`` and ``gpr_index[0]``;
    ``validate`` as in :func:`filter_edges`. ``out``: a contiguous bool buffer of at least
    B * num_reactions elements on the inputs' device; the mask is written into its first
    ones and returned as a [B, num_reactions] view of them."""
    num_reactions = check_count("num_reactions", num_reactions)
    if num_genes is not None:
        num_genes = check_count("num_genes", num_genes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_genes, values=validate)
    gpr_index = check_edge_index("gpr_index", gpr_index, num_genes, num_reactions, pert.device,
                                 src_name="num_genes", dst_name="num_reactions", values=validate)
    B = pert_ptr.numel() - 1
    check_size_product("reaction_keep", B=B, num_reactions=num_reactions)
    selected = select("reaction_keep", backend, pert.device)
    if out is not None:
        check_out_buffer("out", out, torch.bool, pert.device, B * num_reactions, "B * num_reactions")
        if selected.backend == "reference":
            return _copy_into(out, selected.fn(gpr_index, num_reactions, pert, pert_ptr))
        if selected.backend == "triton":
            torch.ops.stoichconv.triton_reaction_keep_out(gpr_index, num_reactions, pert, pert_ptr, out, False)
        else:
            torch.ops.stoichconv.reaction_keep_out(gpr_index, num_reactions, pert, pert_ptr, out)
        return out.view(-1)[:B * num_reactions].view(B, num_reactions)
    if selected.backend == "triton":
        return selected.fn(gpr_index, num_reactions, pert, pert_ptr, False)
    return selected.fn(gpr_index, num_reactions, pert, pert_ptr)


def filter_bipartite(edge_index: Tensor, num_src: int, num_dst: int, num_samples: int,
                     src_keep: Optional[Tensor] = None, dst_keep: Optional[Tensor] = None, *,
                     relabel: bool = True, backend: str = "auto", validate: bool = True,
                     out: Optional[FilteredBipartite] = None) -> FilteredBipartite:
    """Filter a bipartite relation by per-sample node keep-masks (see the
    module docstring); returns a :class:`FilteredBipartite` (``validate`` as
    in :func:`filter_edges`). ``out``: a :class:`FilteredBipartite` of caller buffers
    (:func:`allocate_bipartite_out`), contiguous, on the inputs' device, at least
    ``edge_index`` 2 * B * E int64, ``edge_ptr`` B + 1 int64, ``edge_keep`` B * E bool and
    ``edge_id`` B * E int64; filled and returned as views as in :func:`filter_edges`."""
    num_src = check_count("num_src", num_src)
    num_dst = check_count("num_dst", num_dst)
    num_samples = check_count("num_samples", num_samples)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"`edge_index` must be a torch.Tensor, got {type(edge_index).__name__}")
    device = edge_index.device
    edge_index = check_edge_index("edge_index", edge_index, num_src, num_dst, device,
                                  src_name="num_src", dst_name="num_dst", values=validate)
    src_keep = check_keep("src_keep", src_keep, num_samples, num_src, device)
    dst_keep = check_keep("dst_keep", dst_keep, num_samples, num_dst, device)
    check_size_product("edge_keep", num_samples=num_samples, E=edge_index.size(1))
    # output ids (either layout) reach up to num_samples * num_side
    check_size_product("edge_index[0]", "ids", num_samples=num_samples, num_src=num_src)
    check_size_product("edge_index[1]", "ids", num_samples=num_samples, num_dst=num_dst)
    selected = select("filter_bipartite", backend, device)
    if out is not None:
        return _filter_bipartite_out(selected, edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                                     bool(relabel), out)
    if selected.backend == "reference":
        return selected.fn(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel=bool(relabel))
    if selected.backend == "triton":
        return FilteredBipartite(*selected.fn(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                                              bool(relabel), False))
    return FilteredBipartite(*selected.fn(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                                          bool(relabel)))


def _filter_bipartite_out(selected, edge_index, num_src, num_dst, B, src_keep, dst_keep, relabel,
                          out) -> FilteredBipartite:
    E = edge_index.size(1)
    check_size_product("out.edge_index", B=B, E=E, two=2)
    long = torch.int64
    _check_out_tuple(out, FilteredBipartite, {
        "edge_index": (long, 2 * B * E, "2 * B * E"), "edge_ptr": (long, B + 1, "B + 1"),
        "edge_keep": (torch.bool, B * E, "B * E"), "edge_id": (long, B * E, "B * E")}, edge_index.device)
    if selected.backend == "reference":
        result = selected.fn(edge_index, num_src, num_dst, B, src_keep, dst_keep, relabel=relabel)
        return FilteredBipartite(*(_copy_into(buffer, value) for buffer, value in zip(out, result)))
    args = (edge_index, num_src, num_dst, B, src_keep, dst_keep, relabel, *out)
    if selected.backend == "triton":
        torch.ops.stoichconv.triton_filter_bipartite_out(*args, False)
    else:
        torch.ops.stoichconv.filter_bipartite_out(*args)
    edge_ptr = out.edge_ptr.view(-1)[:B + 1]
    total = int(edge_ptr[B])
    return FilteredBipartite(_edge_view(out.edge_index, total), edge_ptr, out.edge_keep.view(-1)[:B * E],
                             out.edge_id.view(-1)[:total])


def kept_nodes(keep: Tensor, *, backend: str = "auto", out: Optional[KeptNodes] = None) -> KeptNodes:
    """The kept nodes of the keep-mask ``keep`` [B, N] bool as a :class:`KeptNodes` ``(batch,
    n_id, ptr)`` (see the module docstring). ``out``: a :class:`KeptNodes` of caller buffers
    (contiguous int64 on ``keep``'s device, ``batch`` / ``n_id`` of at least B * N elements,
    ``ptr`` of at least B + 1), filled and returned as views."""
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"`keep` must be a bool tensor, got {getattr(keep, 'dtype', type(keep).__name__)}")
    if keep.dim() != 2:
        raise ValueError(f"`keep` must be [B, N], got shape {tuple(keep.shape)}")
    B, N = keep.shape
    selected = select("kept_nodes", backend, keep.device)
    if out is None:
        return KeptNodes(*selected.fn(keep))
    long = torch.int64
    _check_out_tuple(out, KeptNodes, {"batch": (long, B * N, "B * N"), "n_id": (long, B * N, "B * N"),
                                      "ptr": (long, B + 1, "B + 1")}, keep.device)
    if selected.backend == "reference":
        return KeptNodes(*(_copy_into(buffer, value) for buffer, value in zip(out, selected.fn(keep))))
    torch.ops.stoichconv.kept_nodes_out(keep, *out)
    ptr = out.ptr.view(-1)[:B + 1]
    total = int(ptr[B])
    return KeptNodes(out.batch.view(-1)[:total], out.n_id.view(-1)[:total], ptr)
