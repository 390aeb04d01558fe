"""Batched gene-deletion perturbations of a cell graph.

:func:`perturb_batch` turns the wildtype cell graph and a CSR batch of gene
deletions (``pert``, ``pert_ptr``) into a model-ready ``HeteroData`` batch in
one of two layouts; :func:`filter_edges`, :func:`reaction_keep` and
:func:`filter_bipartite` are the operators it is made of (semantics in
:mod:`stoichconv.ops.pert_mask`).

Output fields of :func:`perturb_batch`:

* per node type ``t`` in gene / reaction / metabolite: ``num_nodes``, ``n_id``
  (wildtype id of each output node), ``batch`` (sample of each output node),
  ``ptr`` [B + 1], ``node_keep`` [B * N_t] bool (full-layout mask, True = kept);
* gene-gene relations and ``(gene, gpr, reaction)``: ``edge_index``,
  ``edge_ptr`` [B + 1], ``edge_keep`` [B * E] bool;
* ``(metabolite, reaction, metabolite)``: ``hyperedge_index`` [2, nnz_out]
  (row 0 metabolite, row 1 reaction), ``stoichiometry``, ``num_edges`` (total
  reactions of the output layout), ``edge_ptr``, ``edge_keep``;
* batch level: ``pert``, ``pert_ptr``, ``num_samples``, ``reaction_keep``
  [B, N_r] bool, ``layout``.

``layout="compacted"``: removed nodes and edges are gone and nodes are
renumbered as per-sample PyG ``subgraph`` + ``Batch.from_data_list`` would
(the metabolic incidence's reaction row offset by reaction counts).
``layout="full"``: node v of sample b is ``b * N + v``, every node present
(removed ones flagged by ``node_keep``), only surviving edges listed.

:class:`PerturbBatcher` builds the same batches into memory it owns and reuses (a ring of
output slots), and :class:`PerturbationCollate` plugs it into a ``torch.utils.data.DataLoader``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from stoichconv.backends import resolve
from stoichconv.data.relations import GENE_GENE_RELATIONS, GPR, METABOLISM, NODE_TYPES
from stoichconv.ops._checks import check_count
from stoichconv.ops.pert_mask import (
    allocate_bipartite_out,
    allocate_filter_edges_out,
    filter_bipartite,
    filter_edges,
    kept_nodes,
    reaction_keep,
)
from stoichconv.ops.pert_mask.validation import check_edge_index, check_perturbations
from stoichconv.types import FilteredBipartite, FilteredEdges, KeptNodes

__all__ = [
    "FilteredBipartite",
    "FilteredEdges",
    "LAYOUTS",
    "PerturbBatcher",
    "PerturbationBatches",
    "PerturbationCollate",
    "filter_bipartite",
    "filter_edges",
    "perturb_batch",
    "reaction_keep",
]

LAYOUTS = ("compacted", "full")



@dataclass
class _Graph:
    """The wildtype tensors :func:`perturb_batch` reads, checked and on one device."""

    num_genes: int
    num_reactions: int
    num_metabolites: int
    indices: dict  # relation -> int64 contiguous [2, E]
    stoichiometry: Tensor  # [nnz] float, on the device

    @property
    def device(self) -> torch.device:
        return self.stoichiometry.device


def _graph_tensor(cell_graph: HeteroData, relation: tuple, key: str) -> Tensor:
    if relation not in cell_graph.edge_types:
        raise ValueError(f"`cell_graph` lacks the relation {relation!r} (it has {cell_graph.edge_types})")
    value = cell_graph[relation].get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"`cell_graph[{relation!r}]` lacks the tensor `{key}`")
    return value


def _num_nodes(cell_graph: HeteroData, node_type: str) -> int:
    if node_type not in cell_graph.node_types or cell_graph[node_type].num_nodes is None:
        raise ValueError(f"`cell_graph` lacks the node type {node_type!r} (or its num_nodes)")
    return int(cell_graph[node_type].num_nodes)


def _prepare_graph(cell_graph: HeteroData, device: torch.device, validate_graph: bool) -> _Graph:
    if not isinstance(cell_graph, HeteroData):
        raise TypeError(f"`cell_graph` must be a torch_geometric HeteroData, got {type(cell_graph).__name__}")
    num_genes, num_reactions, num_metabolites = (_num_nodes(cell_graph, t) for t in NODE_TYPES)
    indices = {}
    for relation, key, num_src, num_dst in (
        (GENE_GENE_RELATIONS[0], "edge_index", num_genes, num_genes),
        (GENE_GENE_RELATIONS[1], "edge_index", num_genes, num_genes),
        (GPR, "edge_index", num_genes, num_reactions),
        (METABOLISM, "hyperedge_index", num_metabolites, num_reactions),
    ):
        name = f"cell_graph[{relation!r}].{key}"
        indices[relation] = check_edge_index(name, _graph_tensor(cell_graph, relation, key).to(device),
                                             num_src, num_dst, device,
                                             src_name=f"num_{relation[0]}s", dst_name=f"num_{relation[2]}s",
                                             values=validate_graph)
    stoichiometry = _graph_tensor(cell_graph, METABOLISM, "stoichiometry")
    nnz = indices[METABOLISM].size(1)
    if not stoichiometry.is_floating_point() or stoichiometry.dim() != 1 or stoichiometry.numel() != nnz:
        raise ValueError(f"`cell_graph[{METABOLISM!r}].stoichiometry` must be a float tensor [nnz] = [{nnz}] "
                         f"(one coefficient per incidence), got {stoichiometry.dtype} {tuple(stoichiometry.shape)}")
    return _Graph(num_genes, num_reactions, num_metabolites, indices, stoichiometry.to(device).contiguous())


@dataclass
class _NodeSlot:
    """Buffers of one node type's compacted fields (n_id, batch [max_batch * N], ptr [max_batch + 1])."""

    n_id: Tensor
    batch: Tensor
    ptr: Tensor


@dataclass
class _Slot:
    """The output buffers of one batch (one ring entry of :class:`PerturbBatcher`)."""

    edges: dict  # gene-gene relation -> FilteredEdges of buffers
    reaction_keep: Tensor  # [max_batch * R] bool
    gpr: FilteredBipartite
    metabolism: FilteredBipartite
    stoichiometry: Tensor  # [max_batch * nnz]
    nodes: dict  # "gene" / "reaction" -> _NodeSlot (compacted layout only)


@dataclass
class _FullNodes:
    """The fields of a node type whose nodes are all present (the full layout, and the
    metabolites in both), for up to max_batch samples: the first B * N (B + 1) entries are
    those of B samples. Shared by every slot and never written after construction."""

    n_id: Tensor
    batch: Tensor
    ptr: Tensor
    keep: Tensor  # all True [max_batch * N]


def _full_nodes(max_batch: int, N: int, device) -> _FullNodes:
    return _FullNodes(torch.arange(N, device=device).repeat(max_batch),
                      torch.arange(max_batch, device=device).repeat_interleave(N),
                      torch.arange(max_batch + 1, device=device) * N,
                      torch.ones(max_batch * N, dtype=torch.bool, device=device))


def _into(buffer: Tensor) -> Tensor:
    """An empty view at the start of ``buffer`` for an ``out=`` op with a data-dependent size:
    the op resizes it in place within the buffer's storage (sized for the worst case, so never
    reallocated; an empty ``out`` is resized without a warning)."""
    return buffer.view(-1)[:0]


def _set_nodes(store, keep: Tensor, B: int, N: int, compacted: bool, backend: str = "auto",
               all_kept: bool = False, full: Optional[_FullNodes] = None, slot: Optional[_NodeSlot] = None) -> None:
    """Fill num_nodes / n_id / batch / ptr / node_keep of one node type from
    its full-layout keep-mask [B * N] (``all_kept``: the mask is all True, so
    both layouts number the nodes alike and no mask scan is needed). With ``full`` /
    ``slot`` (the batcher) the fields are views of its constant tables / written into its
    buffers."""
    device = keep.device
    if compacted and not all_kept:
        # The kept nodes sample by sample (kept_nodes: nonzero's two columns and the offsets; an
        # op with CPU and reference backends only, so a `backend` it lacks runs its reference).
        buffers = None if slot is None else KeptNodes(slot.batch, slot.n_id, slot.ptr)
        store.batch, store.n_id, store.ptr = kept_nodes(
            keep.view(B, N), backend=resolve("kept_nodes", backend, device, strict=False), out=buffers)
    elif full is not None:
        store.n_id, store.batch, store.ptr = full.n_id[:B * N], full.batch[:B * N], full.ptr[:B + 1]
    else:
        store.n_id = torch.arange(N, device=device).repeat(B)
        store.batch = torch.arange(B, device=device).repeat_interleave(N)
        store.ptr = torch.arange(B + 1, device=device) * N
    store.num_nodes = int(store.n_id.numel())
    store.node_keep = keep


def _assemble(graph: _Graph, pert: Tensor, pert_ptr: Tensor, layout: str, backend: str,
              slot: Optional[_Slot] = None, full: Optional[dict] = None) -> HeteroData:
    """The batch of checked deletions ``pert`` / ``pert_ptr`` (on the graph's device); with
    ``slot`` every output is written into its buffers (the batcher), else allocated."""
    compacted = layout == "compacted"
    num_genes, num_reactions, num_metabolites = graph.num_genes, graph.num_reactions, graph.num_metabolites
    indices = graph.indices
    B = pert_ptr.numel() - 1
    device = pert.device
    full = full or {}
    out = HeteroData()
    gene_keep = None
    # Everything is validated by the caller; the ops below skip their host-syncing value checks.
    for relation in GENE_GENE_RELATIONS:
        filtered = filter_edges(indices[relation], num_genes, pert, pert_ptr, relabel=compacted, backend=backend,
                                validate=False, out=None if slot is None else slot.edges[relation])
        store = out[relation]
        store.edge_index = filtered.edge_index
        store.edge_ptr = filtered.edge_ptr
        store.edge_keep = filtered.edge_keep
        gene_keep = filtered.node_keep
    gpr_index = indices[GPR]
    rkeep = reaction_keep(gpr_index, num_reactions, pert, pert_ptr, backend=backend, validate=False,
                          out=None if slot is None else slot.reaction_keep)

    nodes = {} if slot is None else slot.nodes
    _set_nodes(out["gene"], gene_keep, B, num_genes, compacted, backend, full=full.get("gene"),
               slot=nodes.get("gene"))
    _set_nodes(out["reaction"], rkeep.view(-1), B, num_reactions, compacted, backend, full=full.get("reaction"),
               slot=nodes.get("reaction"))
    metabolites = full.get("metabolite")
    metabolite_keep = (torch.ones(B * num_metabolites, dtype=torch.bool, device=device) if metabolites is None
                       else metabolites.keep[:B * num_metabolites])
    _set_nodes(out["metabolite"], metabolite_keep, B, num_metabolites, compacted, all_kept=True, full=metabolites)

    gpr = filter_bipartite(gpr_index, num_genes, num_reactions, B, gene_keep.view(B, num_genes), rkeep,
                           relabel=compacted, backend=backend, validate=False, out=None if slot is None else slot.gpr)
    out[GPR].edge_index = gpr.edge_index
    out[GPR].edge_ptr = gpr.edge_ptr
    out[GPR].edge_keep = gpr.edge_keep

    inc = filter_bipartite(indices[METABOLISM], num_metabolites, num_reactions, B, None, rkeep,
                           relabel=compacted, backend=backend, validate=False,
                           out=None if slot is None else slot.metabolism)
    store = out[METABOLISM]
    store.hyperedge_index = inc.edge_index
    if slot is None:
        store.stoichiometry = graph.stoichiometry[inc.edge_id]
    else:
        store.stoichiometry = torch.index_select(graph.stoichiometry, 0, inc.edge_id, out=_into(slot.stoichiometry))
    store.num_edges = int(out["reaction"].num_nodes)
    store.edge_ptr = inc.edge_ptr
    store.edge_keep = inc.edge_keep

    out.pert = pert
    out.pert_ptr = pert_ptr
    out.num_samples = B
    out.reaction_keep = rkeep
    out.layout = layout
    return out


def perturb_batch(cell_graph: HeteroData, pert: Tensor, pert_ptr: Tensor, layout: str = "compacted", *,
                  backend: str = "auto", validate_graph: bool = True) -> HeteroData:
    """Apply a batch of gene deletions to the wildtype ``cell_graph``.

    Args:
        cell_graph: the wildtype (``stoichconv.data.load_cell_graph``): node types gene,
            reaction, metabolite; relations ``(gene, physical_interaction, gene)``,
            ``(gene, regulatory_interaction, gene)``, ``(gene, gpr, reaction)`` (``edge_index``)
            and ``(metabolite, reaction, metabolite)`` (``hyperedge_index``, ``stoichiometry``).
        pert, pert_ptr: CSR gene deletions (sample b deletes ``pert[pert_ptr[b]:pert_ptr[b+1]]``).
        layout: ``"compacted"`` (PyG-collate numbering) or ``"full"`` (``b * N + v``).
        backend: see :mod:`stoichconv.backends`; every op of the pass (``filter_edges``,
            ``reaction_keep``, ``filter_bipartite``) runs on it.
        validate_graph: check the wildtype index values (host syncs on GPU); pass False
            for a graph already checked (every backend's kernels still check the bounds, on the device).

    Returns:
        a ``HeteroData`` with the fields listed in the module docstring. Every output is
        allocated by the call; :class:`PerturbBatcher` builds the same batch into reused memory.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(cell_graph, HeteroData):
        raise TypeError(f"`cell_graph` must be a torch_geometric HeteroData, got {type(cell_graph).__name__}")
    num_genes = [_num_nodes(cell_graph, t) for t in NODE_TYPES][0]
    pert, pert_ptr = check_perturbations(pert, pert_ptr, num_genes)
    graph = _prepare_graph(cell_graph, pert.device, validate_graph)
    return _assemble(graph, pert, pert_ptr, layout, backend)


# --------------------------------------------------------------------------
# Reused memory: the batcher and its DataLoader collate
# --------------------------------------------------------------------------


class PerturbBatcher:
    """:func:`perturb_batch` into memory the batcher owns and reuses, batch after batch.

    ``batcher(pert, pert_ptr)`` returns the ``HeteroData`` that ``perturb_batch(cell_graph,
    pert, pert_ptr, layout, backend=backend)`` returns (same fields, equal values), but its
    tensors are views of buffers allocated once: a ring of ``ring`` output slots, each sized
    for ``max_batch`` samples in the worst case (no deletion: every edge of every sample
    survives), so that no call allocates large outputs or pays their first-touch page faults.
    Call ``n`` writes into slot ``n % ring``.

    Validity. A batch returned by a call stays valid until ``ring`` further calls have been
    made: the ``ring``-th next call overwrites its slot (with ``ring=2``, the batch of call n
    can be consumed while call n + 1 is built, as a DataLoader with prefetch does, and is
    overwritten by call n + 2). :meth:`is_valid` tells whether a batch is still intact;
    ``batch.clone()`` keeps one for longer. A call that fails its argument checks (``B >
    max_batch``, bad ``pert``) writes nothing and does not advance the ring; one that fails in
    a kernel (bad ids with ``validate=False``) has started writing: it advances the ring and
    the batch of its slot is no longer valid. The fields that
    do not depend on the deletions (full-layout ``n_id`` / ``batch`` / ``ptr``, the
    metabolites' ``node_keep``) are views of tables shared by all slots: treat every field
    as read-only. On CUDA the buffers are reused in stream order (the current stream): a
    consumer on another stream must synchronise with it first.

    Pickling (DataLoader workers) drops the buffers; they are rebuilt on the first call in
    the new process, so each worker owns its own ring (see :class:`PerturbationCollate`).

    Args:
        cell_graph: the wildtype, as for :func:`perturb_batch` (checked once, here, with
            ``validate_graph``).
        layout: ``"compacted"`` or ``"full"``.
        max_batch: the largest B a call accepts (a larger one raises ``ValueError``).
        backend: the backend of every op (:mod:`stoichconv.backends`).
        ring: the number of output slots (>= 1).
        device: where the buffers and batches live (default: the graph's device);
            ``pert`` / ``pert_ptr`` are moved there.
        validate: check the deletions' values on every call (host syncs on a GPU; the
            kernels check the bounds either way).

    Memory (:attr:`nbytes`): about ``ring * max_batch * (17 E_gene_gene + 25 (E_gpr + nnz) +
    s * nnz + 18 N_gene + 17 N_reaction)`` bytes (``s`` the stoichiometry's element size;
    compacted layout, the full one has no node buffers): 236 MB at max_batch = 32, ring = 2 on
    the bundled graph. The buffers are allocated and touched on the first call.
    """

    def __init__(self, cell_graph: HeteroData, layout: str = "compacted", max_batch: int = 32, *,
                 backend: str = "auto", ring: int = 2, device=None, validate_graph: bool = True,
                 validate: bool = True):
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
        check_count("max_batch", max_batch)
        check_count("ring", ring)
        if ring < 1:
            raise ValueError(f"`ring` must be >= 1, got {ring}")
        if not isinstance(cell_graph, HeteroData):
            raise TypeError(f"`cell_graph` must be a torch_geometric HeteroData, got {type(cell_graph).__name__}")
        if device is None:
            device = _graph_tensor(cell_graph, METABOLISM, "hyperedge_index").device
        self.layout = layout
        self.max_batch = max_batch
        self.backend = backend
        self.ring = ring
        self.validate = bool(validate)
        self._graph = _prepare_graph(cell_graph, torch.device(device), validate_graph)
        self._reset()

    @property
    def device(self) -> torch.device:
        return self._graph.device

    def _reset(self) -> None:
        self._slots: Optional[list] = None  # built on the first call
        self._full: Optional[dict] = None
        self._issued: list = [None] * self.ring  # weak references to the batch of each slot
        self._calls = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_slots", "_full", "_issued", "_calls"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _build(self) -> None:
        g, M, device = self._graph, self.max_batch, self.device
        full = {"metabolite": _full_nodes(M, g.num_metabolites, device)}
        if self.layout == "full":
            full["gene"] = _full_nodes(M, g.num_genes, device)
            full["reaction"] = _full_nodes(M, g.num_reactions, device)
        slots = []
        for _ in range(self.ring):
            nodes = {}
            if self.layout == "compacted":
                for t, N in (("gene", g.num_genes), ("reaction", g.num_reactions)):
                    long = dict(dtype=torch.int64, device=device)
                    nodes[t] = _NodeSlot(torch.empty(M * N, **long), torch.empty(M * N, **long),
                                         torch.empty(M + 1, **long))
            slot = _Slot(
                edges={r: allocate_filter_edges_out(M, g.indices[r].size(1), g.num_genes, device)
                       for r in GENE_GENE_RELATIONS},
                reaction_keep=torch.empty(M * g.num_reactions, dtype=torch.bool, device=device),
                gpr=allocate_bipartite_out(M, g.indices[GPR].size(1), device),
                metabolism=allocate_bipartite_out(M, g.indices[METABOLISM].size(1), device),
                stoichiometry=torch.empty(M * g.stoichiometry.numel(), dtype=g.stoichiometry.dtype, device=device),
                nodes=nodes,
            )
            for tensor in _slot_tensors(slot):  # touch every page once, here, not in the first calls
                tensor.zero_()
            slots.append(slot)
        self._slots, self._full = slots, full

    def __call__(self, pert: Tensor, pert_ptr: Tensor) -> HeteroData:
        """The batch of the CSR deletions ``pert`` / ``pert_ptr`` (see :func:`perturb_batch`),
        valid until ``ring`` further calls (class docstring)."""
        pert, pert_ptr = check_perturbations(pert, pert_ptr, None, values=False)
        B = pert_ptr.numel() - 1
        if B > self.max_batch:
            raise ValueError(f"`pert_ptr` holds B = {B} samples but this PerturbBatcher was built for "
                             f"max_batch = {self.max_batch}; build one with a larger max_batch")
        pert, pert_ptr = pert.to(self.device), pert_ptr.to(self.device)
        if self.validate:
            check_perturbations(pert, pert_ptr, self._graph.num_genes)
        if self._slots is None:
            self._build()
        index = self._calls % self.ring
        self._issued[index] = None  # the batch in this slot is overwritten from here on
        self._calls += 1
        batch = _assemble(self._graph, pert, pert_ptr, self.layout, self.backend, self._slots[index], self._full)
        self._issued[index] = weakref.ref(batch)
        return batch

    def is_valid(self, batch: HeteroData) -> bool:
        """Whether ``batch`` is one of the last ``ring`` batches of this batcher (its buffers
        not overwritten since)."""
        return any(ref is not None and ref() is batch for ref in self._issued)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (0 before the first call)."""
        if self._slots is None:
            return 0
        tensors = [t for slot in self._slots for t in _slot_tensors(slot)]
        tensors += [t for f in self._full.values() for t in (f.n_id, f.batch, f.ptr, f.keep)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        return (f"PerturbBatcher(layout={self.layout!r}, max_batch={self.max_batch}, backend={self.backend!r}, "
                f"ring={self.ring}, device={str(self.device)!r})")


def _slot_tensors(slot: _Slot) -> list:
    tensors = [t for edges in slot.edges.values() for t in edges]
    tensors += [slot.reaction_keep, *slot.gpr, *slot.metabolism, slot.stoichiometry]
    tensors += [t for node in slot.nodes.values() for t in (node.n_id, node.batch, node.ptr)]
    return tensors


def _shared_copy(value):
    """``value`` (a tensor) copied into a fresh shared-memory tensor (CPU) or a fresh tensor
    (other devices); anything else unchanged."""
    if not isinstance(value, Tensor):
        return value
    if value.device.type != "cpu":
        return value.clone()
    storage = value._typed_storage()._new_shared(value.numel(), device=value.device)
    return value.new(storage).view(value.shape).copy_(value)


def _detached_batch(batch: HeteroData) -> HeteroData:
    """A copy of ``batch`` owning its memory (CPU tensors in shared memory)."""
    return HeteroData.from_dict({
        key: {k: _shared_copy(v) for k, v in value.items()} if isinstance(value, dict) else _shared_copy(value)
        for key, value in batch.to_dict().items()})


def _deletions_of(samples: Sequence) -> tuple[Tensor, Tensor]:
    """CSR ``(pert, pert_ptr)`` of a list of deletion sets (each a 1-D integer tensor or a
    sequence of ints)."""
    sets = [s if isinstance(s, Tensor) else torch.as_tensor(list(s), dtype=torch.int64) for s in samples]
    for i, s in enumerate(sets):
        if s.dim() != 1:
            raise ValueError(f"sample {i} must be a 1-D set of gene ids, got shape {tuple(s.shape)}")
    sizes = torch.tensor([s.numel() for s in sets], dtype=torch.int64)
    pert_ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    pert = torch.cat([s.long().reshape(-1) for s in sets]) if sets else torch.zeros(0, dtype=torch.int64)
    return pert, pert_ptr


class PerturbationCollate:
    """A ``torch.utils.data.DataLoader`` ``collate_fn`` built on a :class:`PerturbBatcher`:
    each dataset item is one sample's deletion set (a 1-D tensor of gene ids, or a sequence of
    ints); a list of them becomes ``batcher(pert, pert_ptr)``.

    ``DataLoader(dataset, batch_size=B, collate_fn=PerturbationCollate(batcher))`` with
    ``B <= batcher.max_batch``:

    * ``num_workers=0``: the batches are the batcher's ring views, so the validity rule of
      :class:`PerturbBatcher` applies (a batch is overwritten ``ring`` batches later; the
      loop body that consumes batch n before asking for n + 1 is always safe).
    * ``num_workers>0``: the collate runs in the worker processes, each of which unpickles
      its own batcher (buffers rebuilt there on first use); the batch is then copied out of
      the worker's ring into fresh shared memory (CPU; the DataLoader passes that to the main
      process without a further copy), so the batches the loop receives own their memory and
      stay valid for good. That copy is the price of workers; prefer ``num_workers=0`` (the
      batcher is fast) unless the dataset itself is slow.
    """

    def __init__(self, batcher: PerturbBatcher):
        if not isinstance(batcher, PerturbBatcher):
            raise TypeError(f"`batcher` must be a PerturbBatcher, got {type(batcher).__name__}")
        self.batcher = batcher

    def __call__(self, samples: Sequence) -> HeteroData:
        pert, pert_ptr = _deletions_of(samples)
        batch = self.batcher(pert, pert_ptr)
        if torch.utils.data.get_worker_info() is not None:
            return _detached_batch(batch)
        return batch


class PerturbationBatches(torch.utils.data.IterableDataset):
    """An iterable dataset of ready batches built on a :class:`PerturbBatcher`: batch i is
    ``batcher`` applied to deletion sets ``[i * batch_size, (i + 1) * batch_size)`` of
    ``deletion_sets`` (a sequence of 1-D gene-id tensors or int sequences; the last batch may
    be smaller; ``batch_size <= batcher.max_batch``). Use it with
    ``DataLoader(PerturbationBatches(...), batch_size=None)``.

    Same validity rules as :class:`PerturbationCollate`: iterated in the main process
    (``num_workers=0``) the batches are the batcher's ring views (valid until ``ring``
    further batches); in ``num_workers > 0`` workers, worker w builds batches w, w + k,
    w + 2k, ... (k workers, the DataLoader interleaves them back in order) with its own
    batcher and each batch is copied into fresh shared memory."""

    def __init__(self, batcher: PerturbBatcher, deletion_sets: Sequence, batch_size: int):
        if not isinstance(batcher, PerturbBatcher):
            raise TypeError(f"`batcher` must be a PerturbBatcher, got {type(batcher).__name__}")
        check_count("batch_size", batch_size)
        if not 1 <= batch_size <= batcher.max_batch:
            raise ValueError(f"`batch_size` must be in [1, batcher.max_batch = {batcher.max_batch}], got {batch_size}")
        self.batcher = batcher
        self.deletion_sets = deletion_sets
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.deletion_sets) // self.batch_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(first, len(self), step):
            samples = self.deletion_sets[i * self.batch_size:(i + 1) * self.batch_size]
            batch = self.batcher(*_deletions_of(samples))
            yield batch if info is None else _detached_batch(batch)
