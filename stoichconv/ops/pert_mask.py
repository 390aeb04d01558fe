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

``backend`` follows :mod:`stoichconv.backends`; ``"reference"`` runs
:mod:`stoichconv.reference.perturb`, ``"triton"`` (``filter_edges`` only)
runs ``stoichconv.triton.filter_edges.triton_filter_edges``. A compiled
backend whose kernel for an op is not registered on the device falls back to
the reference under ``"auto"`` and raises
:class:`~stoichconv.backends.BackendUnavailableError` when asked for by name.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels
from stoichconv.backends import BackendUnavailableError, check_backend_name, resolve_backend

__all__ = [
    "FilteredEdges",
    "FilteredBipartite",
    "filter_edges",
    "reaction_keep",
    "filter_bipartite",
    "check_perturbations",
]


class FilteredEdges(NamedTuple):
    """Result of :func:`filter_edges` (see the module docstring)."""

    edge_index: Tensor  # [2, E_out] int64
    edge_ptr: Tensor  # [B + 1] int64
    edge_keep: Tensor  # [B * E] bool
    node_keep: Tensor  # [B * N] bool
    node_ptr: Tensor  # [B + 1] int64


class FilteredBipartite(NamedTuple):
    """Result of :func:`filter_bipartite` (see the module docstring)."""

    edge_index: Tensor  # [2, E_out] int64
    edge_ptr: Tensor  # [B + 1] int64
    edge_keep: Tensor  # [B * E] bool
    edge_id: Tensor  # [E_out] int64, wildtype edge position


# --------------------------------------------------------------------------
# Validation (clear Python exceptions naming the argument)
# --------------------------------------------------------------------------


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}")
    return value


def _as_index(name: str, t, device: Optional[torch.device] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer indices, got dtype {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"`{name}` is on {t.device} but `pert` is on {device}")
    return t.long().contiguous()


def check_perturbations(pert, pert_ptr, num_nodes: Optional[int] = None, values: bool = True) -> tuple[Tensor, Tensor]:
    """Validate a CSR perturbation batch; returns int64 contiguous copies.

    ``num_nodes`` bounds the ids when given (otherwise they need only be >= 0);
    ``values=False`` checks types, shapes and devices only (no host sync)."""
    pert = _as_index("pert", pert)
    pert_ptr = _as_index("pert_ptr", pert_ptr, pert.device)
    if pert.dim() != 1:
        raise ValueError(f"`pert` must be 1-D [P], got shape {tuple(pert.shape)}")
    if pert_ptr.dim() != 1 or pert_ptr.numel() < 1:
        raise ValueError(f"`pert_ptr` must be 1-D [B + 1] with B >= 0, got shape {tuple(pert_ptr.shape)}")
    if not values:
        return pert, pert_ptr
    if int(pert_ptr[0]) != 0:
        raise ValueError(f"`pert_ptr` must start at 0, got {int(pert_ptr[0])}")
    if pert_ptr.numel() > 1 and bool((pert_ptr[1:] < pert_ptr[:-1]).any()):
        raise ValueError("`pert_ptr` must be non-decreasing")
    if int(pert_ptr[-1]) != pert.numel():
        raise ValueError(f"`pert_ptr` must end at len(pert) = {pert.numel()}, got {int(pert_ptr[-1])}")
    if pert.numel() > 0:
        low, high = int(pert.min()), int(pert.max())
        if low < 0:
            raise ValueError(f"`pert` has a negative gene id {low}")
        if num_nodes is not None and high >= num_nodes:
            raise ValueError(f"`pert` has gene id {high} outside [0, num_nodes={num_nodes})")
    return pert, pert_ptr


def _check_edge_index(name: str, edge_index, num_src: int, num_dst: int, device: torch.device,
                      src_name: str = "num_nodes", dst_name: Optional[str] = None, values: bool = True) -> Tensor:
    edge_index = _as_index(name, edge_index, device)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"`{name}` must have shape [2, E], got {tuple(edge_index.shape)}")
    if values and edge_index.size(1) > 0:
        if int(edge_index.min()) < 0:
            raise ValueError(f"`{name}` contains a negative id {int(edge_index.min())}")
        for row, bound, bound_name in ((0, num_src, src_name), (1, num_dst, dst_name or src_name)):
            if bound is None:
                continue
            high = int(edge_index[row].max())
            if high >= bound:
                raise ValueError(f"`{name}[{row}]` has id {high} >= {bound_name} = {bound}")
    return edge_index


def _check_keep(name: str, keep, num_samples: int, num_nodes: int, device: torch.device) -> Optional[Tensor]:
    if keep is None:
        return None
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor or None, got {getattr(keep, 'dtype', type(keep).__name__)}")
    if tuple(keep.shape) != (num_samples, num_nodes):
        raise ValueError(f"`{name}` must have shape [B, N] = [{num_samples}, {num_nodes}], got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"`{name}` is on {keep.device} but `edge_index` is on {device}")
    return keep.contiguous()


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return has_compiled_kernels() and torch._C._dispatch_has_kernel_for_dispatch_key(f"stoichconv::{op}", key)


def _resolve(backend: str, device: torch.device, op: str) -> str:
    """resolve_backend plus the per-op availability of compiled/Triton kernels."""
    requested = check_backend_name(backend)
    resolved = resolve_backend(backend, device)
    auto = requested == "auto"
    if resolved in ("cpu", "cuda") and not _has_kernel(op, device):
        if auto:
            return "reference"
        raise BackendUnavailableError(f"backend={resolved!r}: no {device.type} kernel registered for stoichconv::{op}")
    if resolved == "triton" and op != "filter_edges":
        if auto:
            return "reference"
        raise BackendUnavailableError(f"backend='triton': there is no Triton kernel for {op}")
    return resolved


def _triton_filter_edges():
    try:
        from stoichconv.triton.filter_edges import triton_filter_edges
    except ImportError as error:
        raise BackendUnavailableError(
            f"backend='triton': stoichconv.triton.filter_edges.triton_filter_edges is not available ({error})"
        ) from error
    return triton_filter_edges


# --------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------


def filter_edges(edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor, *,
                 relabel: bool = True, backend: str = "auto", validate: bool = True) -> FilteredEdges:
    """Filter one gene-gene relation for a batch of gene deletions (see the
    module docstring); returns a :class:`FilteredEdges`.

    ``validate=False`` skips the Python checks of index values (their host
    syncs; types, shapes and devices are still checked, and the compiled
    kernels check the values anyway) for callers that validated them already."""
    num_nodes = _check_count("num_nodes", num_nodes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_nodes, values=validate)
    edge_index = _check_edge_index("edge_index", edge_index, num_nodes, num_nodes, pert.device, values=validate)
    relabel = bool(relabel)
    resolved = _resolve(backend, pert.device, "filter_edges")
    op = None
    if resolved == "triton":
        try:
            op = _triton_filter_edges()
        except BackendUnavailableError:
            if backend != "auto":
                raise
            resolved = "reference"  # "auto" falls back rather than fail
    if resolved == "reference":
        from stoichconv.reference.perturb import filter_edges_reference

        return filter_edges_reference(edge_index, num_nodes, pert, pert_ptr, relabel=relabel)
    if op is None:
        op = torch.ops.stoichconv.filter_edges
    return FilteredEdges(*op(edge_index, num_nodes, pert, pert_ptr, relabel))


def reaction_keep(gpr_index: Tensor, num_reactions: int, pert: Tensor, pert_ptr: Tensor,
                  backend: str = "auto", *, num_genes: Optional[int] = None, validate: bool = True) -> Tensor:
    """[B, num_reactions] bool reaction keep-mask (see the module docstring).
    ``num_genes``, when given, bounds the gene ids of ``pert`` and ``gpr_index[0]``;
    ``validate`` as in :func:`filter_edges`."""
    num_reactions = _check_count("num_reactions", num_reactions)
    if num_genes is not None:
        num_genes = _check_count("num_genes", num_genes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_genes, values=validate)
    gpr_index = _check_edge_index("gpr_index", gpr_index, num_genes, num_reactions, pert.device,
                                  src_name="num_genes", dst_name="num_reactions", values=validate)
    resolved = _resolve(backend, pert.device, "reaction_keep")
    if resolved == "reference":
        from stoichconv.reference.perturb import reaction_keep_reference

        return reaction_keep_reference(gpr_index, num_reactions, pert, pert_ptr)
    return torch.ops.stoichconv.reaction_keep(gpr_index, num_reactions, pert, pert_ptr)


def filter_bipartite(edge_index: Tensor, num_src: int, num_dst: int, num_samples: int,
                     src_keep: Optional[Tensor] = None, dst_keep: Optional[Tensor] = None, *,
                     relabel: bool = True, backend: str = "auto", validate: bool = True) -> FilteredBipartite:
    """Filter a bipartite relation by per-sample node keep-masks (see the
    module docstring); returns a :class:`FilteredBipartite` (``validate`` as
    in :func:`filter_edges`)."""
    num_src = _check_count("num_src", num_src)
    num_dst = _check_count("num_dst", num_dst)
    num_samples = _check_count("num_samples", num_samples)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"`edge_index` must be a torch.Tensor, got {type(edge_index).__name__}")
    device = edge_index.device
    edge_index = _check_edge_index("edge_index", edge_index, num_src, num_dst, device,
                                   src_name="num_src", dst_name="num_dst", values=validate)
    src_keep = _check_keep("src_keep", src_keep, num_samples, num_src, device)
    dst_keep = _check_keep("dst_keep", dst_keep, num_samples, num_dst, device)
    relabel = bool(relabel)
    resolved = _resolve(backend, device, "filter_bipartite")
    if resolved == "reference":
        from stoichconv.reference.perturb import filter_bipartite_reference

        return filter_bipartite_reference(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                                          relabel=relabel)
    return FilteredBipartite(*torch.ops.stoichconv.filter_bipartite(
        edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel))


# --------------------------------------------------------------------------
# Fake kernels (data-dependent output sizes)
# --------------------------------------------------------------------------


def filter_edges_fake(edge_index, num_nodes, pert, pert_ptr, relabel):
    B = pert_ptr.shape[0] - 1
    E = edge_index.shape[1]
    n_out = torch.library.get_ctx().new_dynamic_size()
    return (
        edge_index.new_empty(2, n_out),
        pert_ptr.new_empty(B + 1),
        edge_index.new_empty(B * E, dtype=torch.bool),
        edge_index.new_empty(B * num_nodes, dtype=torch.bool),
        pert_ptr.new_empty(B + 1),
    )


def reaction_keep_fake(gpr_index, num_reactions, pert, pert_ptr):
    return gpr_index.new_empty(pert_ptr.shape[0] - 1, num_reactions, dtype=torch.bool)


def filter_bipartite_fake(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel):
    E = edge_index.shape[1]
    n_out = torch.library.get_ctx().new_dynamic_size()
    return (
        edge_index.new_empty(2, n_out),
        edge_index.new_empty(num_samples + 1),
        edge_index.new_empty(num_samples * E, dtype=torch.bool),
        edge_index.new_empty(n_out),
    )


if has_compiled_kernels():
    torch.library.register_fake("stoichconv::filter_edges")(filter_edges_fake)
    torch.library.register_fake("stoichconv::reaction_keep")(reaction_keep_fake)
    torch.library.register_fake("stoichconv::filter_bipartite")(filter_bipartite_fake)
