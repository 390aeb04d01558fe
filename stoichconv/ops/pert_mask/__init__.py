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
:data:`REACTION_KEEP`, :data:`FILTER_BIPARTITE`): ``cpu`` / ``cuda`` run the
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

Deletion sets of any size: the compiled kernels sort each sample's ids, then drop the repeats;
up to 32 ids (``kSmallSort``) by insertion, beyond that by a bottom-up merge sort (O(n log^2 n);
on CUDA one thread block per such sample), the per-set steps being the same inline functions
of ``csrc/include/stoichconv/pert_mask_math.h`` on the CPU and on CUDA.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from stoichconv.backends import OpSpec, register_op, select
from stoichconv.ops._checks import check_size_product
from stoichconv.ops.pert_mask import registration  # noqa: F401  (fake kernels)
from stoichconv.ops.pert_mask.validation import check_count, check_edge_index, check_keep, check_perturbations
from stoichconv.types import FilteredBipartite, FilteredEdges

__all__ = [
    "FILTER_BIPARTITE",
    "FILTER_EDGES",
    "REACTION_KEEP",
    "FilteredBipartite",
    "FilteredEdges",
    "check_perturbations",
    "filter_bipartite",
    "filter_edges",
    "reaction_keep",
]

FILTER_EDGES = register_op(OpSpec(
    name="filter_edges",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="filter_edges",
    triton="stoichconv.ops.pert_mask.triton_kernels:triton_filter_edges",
    reference="stoichconv.reference.pert_mask:filter_edges_reference",
))
REACTION_KEEP = register_op(OpSpec(
    name="reaction_keep",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="reaction_keep",
    triton="stoichconv.ops.pert_mask.triton_kernels:triton_reaction_keep",
    reference="stoichconv.reference.pert_mask:reaction_keep_reference",
))
FILTER_BIPARTITE = register_op(OpSpec(
    name="filter_bipartite",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="filter_bipartite",
    triton="stoichconv.ops.pert_mask.triton_kernels:triton_filter_bipartite",
    reference="stoichconv.reference.pert_mask:filter_bipartite_reference",
))


# --------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------


def filter_edges(edge_index: Tensor, num_nodes: int, pert: Tensor, pert_ptr: Tensor, *,
                 relabel: bool = True, backend: str = "auto", validate: bool = True) -> FilteredEdges:
    """Filter one gene-gene relation for a batch of gene deletions (see the
    module docstring); returns a :class:`FilteredEdges`.

    ``validate=False`` skips the Python checks of index values (their host
    syncs; types, shapes and devices are still checked, and every kernel checks
    the values on its own, see the module docstring) for callers that validated
    them already."""
    num_nodes = check_count("num_nodes", num_nodes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_nodes, values=validate)
    edge_index = check_edge_index("edge_index", edge_index, num_nodes, num_nodes, pert.device, values=validate)
    B = pert_ptr.numel() - 1
    check_size_product("node_keep", B=B, num_nodes=num_nodes)
    check_size_product("edge_keep", B=B, E=edge_index.size(1))
    selected = select("filter_edges", backend, pert.device)
    if selected.backend == "reference":
        return selected.fn(edge_index, num_nodes, pert, pert_ptr, relabel=bool(relabel))
    if selected.backend == "triton":  # values checked above or not at all in Python: on the device
        return FilteredEdges(*selected.fn(edge_index, num_nodes, pert, pert_ptr, bool(relabel), False))
    return FilteredEdges(*selected.fn(edge_index, num_nodes, pert, pert_ptr, bool(relabel)))


def reaction_keep(gpr_index: Tensor, num_reactions: int, pert: Tensor, pert_ptr: Tensor,
                  backend: str = "auto", *, num_genes: Optional[int] = None, validate: bool = True) -> Tensor:
    """[B, num_reactions] bool reaction keep-mask (see the module docstring).
    ``num_genes``, when given, bounds the gene ids of ``pert`` and ``gpr_index[0]``;
    ``validate`` as in :func:`filter_edges`."""
    num_reactions = check_count("num_reactions", num_reactions)
    if num_genes is not None:
        num_genes = check_count("num_genes", num_genes)
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_genes, values=validate)
    gpr_index = check_edge_index("gpr_index", gpr_index, num_genes, num_reactions, pert.device,
                                 src_name="num_genes", dst_name="num_reactions", values=validate)
    check_size_product("reaction_keep", B=pert_ptr.numel() - 1, num_reactions=num_reactions)
    selected = select("reaction_keep", backend, pert.device)
    if selected.backend == "triton":
        return selected.fn(gpr_index, num_reactions, pert, pert_ptr, False)
    return selected.fn(gpr_index, num_reactions, pert, pert_ptr)


def filter_bipartite(edge_index: Tensor, num_src: int, num_dst: int, num_samples: int,
                     src_keep: Optional[Tensor] = None, dst_keep: Optional[Tensor] = None, *,
                     relabel: bool = True, backend: str = "auto", validate: bool = True) -> FilteredBipartite:
    """Filter a bipartite relation by per-sample node keep-masks (see the
    module docstring); returns a :class:`FilteredBipartite` (``validate`` as
    in :func:`filter_edges`)."""
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
    if selected.backend == "reference":
        return selected.fn(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel=bool(relabel))
    if selected.backend == "triton":
        return FilteredBipartite(*selected.fn(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                                              bool(relabel), False))
    return FilteredBipartite(*selected.fn(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                                          bool(relabel)))
