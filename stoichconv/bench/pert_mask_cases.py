"""Pert-mask benchmark cases on the bundled cell graph: ``filter_edges`` on the
physical gene-gene relation and ``perturb_batch`` on the whole cell graph,
1-3 deletions per sample. Rows:

* ``reference``: the per-sample pipeline the seed used (PyG ``subgraph`` per
  sample, then collation; :mod:`stoichconv.reference.pert_mask` and
  :mod:`stoichconv.reference.perturb`, the baselines the tests compare against);
* ``padded-table``: the seed's later vectorised mask from a padded gene ->
  incident-edge table (:mod:`stoichconv.reference.padded_mask`; the table is
  built once per graph, outside the timing);
* ``cpu`` / ``cuda`` / ``triton``: the fused ops (:mod:`stoichconv.perturb`);
* ``<backend> batcher``: ``perturb_batch`` through a :class:`stoichconv.perturb.PerturbBatcher`
  (the same ops writing into a reused ring of buffers sized for the largest B; built, and
  its buffers touched, outside the timing);
* ``<backend> out=``: ``filter_edges`` writing into buffers from
  :func:`stoichconv.perturb.allocate_filter_edges_out` sized for the largest B, allocated once
  outside the timing (the warm-up calls touch them), called as the batcher calls it
  (``validate=False``: the wildtype graph is checked once, when it is set up).

``bytes_moved`` (the same for every row of a group): ``filter_edges`` its inputs read and its
whole result written (:func:`stoichconv.bench.limits.filter_edges_case_bytes`), ``perturb_batch``
the wildtype read and the batch written (:func:`stoichconv.bench.limits.perturb_batch_case_bytes`).
"""

from __future__ import annotations

from functools import partial

import torch

from stoichconv.bench.core import KERNEL_BACKENDS, REFERENCE, BenchCase
from stoichconv.bench.limits import filter_edges_case_bytes, perturb_batch_case_bytes
from stoichconv.data.relations import GPR, METABOLISM, NODE_TYPES, PHYSICAL, REGULATORY
from stoichconv.testing import random_perturbations

RELATIONS = (PHYSICAL, REGULATORY, GPR)


def batch_tensors(batch) -> tuple:
    """The tensors compared between perturb_batch implementations."""
    tensors = tuple(batch[r].edge_index for r in RELATIONS)
    tensors += (batch[METABOLISM].hyperedge_index, batch[METABOLISM].stoichiometry)
    return tensors + tuple(batch[t].n_id for t in NODE_TYPES)


def cases(args) -> list:
    from stoichconv.backends import available_backends
    from stoichconv.data import load_cell_graph
    from stoichconv.perturb import PerturbBatcher, allocate_filter_edges_out, filter_edges, perturb_batch
    from stoichconv.reference.padded_mask import PaddedIncidenceTable, PaddedPerturber, filter_edges_padded
    from stoichconv.reference.pert_mask import filter_edges_reference
    from stoichconv.reference.perturb import perturb_batch_reference

    device = torch.device(args.device)
    graph = load_cell_graph(seed=0)
    num_genes = int(graph["gene"].num_nodes)
    physical = graph[PHYSICAL].edge_index
    physical_table = PaddedIncidenceTable(physical, num_genes)
    padded_perturber = PaddedPerturber(graph)
    runnable = available_backends(device, "filter_edges")["filter_edges"]
    fast_backends = [b for b in args.backends if b in KERNEL_BACKENDS and b in runnable]
    graph_on_device = graph.to(device)
    batchers = {b: PerturbBatcher(graph_on_device, max_batch=max(args.batches), backend=b)
                for b in fast_backends if b != "triton"}
    edge_buffers = {b: allocate_filter_edges_out(max(args.batches), physical.size(1), num_genes, device=device)
                    for b in batchers}
    result = []
    for B in args.batches:
        pert, pert_ptr = random_perturbations(num_genes, B, sizes=(1, 2, 3), seed=B)
        edges = lambda f: f.edge_index  # noqa: E731
        fe_bytes = filter_edges_case_bytes(physical, num_genes, pert, pert_ptr)
        pb_bytes = perturb_batch_case_bytes(graph, pert, pert_ptr)
        result += [
            BenchCase("filter_edges", REFERENCE, "physical", B,
                      lambda p=pert, q=pert_ptr: edges(filter_edges_reference(physical, num_genes, p, q)),
                      bytes_moved=fe_bytes),
            BenchCase("filter_edges", "padded-table", "physical", B,
                      lambda p=pert, q=pert_ptr: edges(filter_edges_padded(physical_table, physical, p, q)),
                      bytes_moved=fe_bytes),
            BenchCase("perturb_batch", REFERENCE, "cell graph", B,
                      lambda p=pert, q=pert_ptr: batch_tensors(perturb_batch_reference(graph, p, q)),
                      bytes_moved=pb_bytes),
            BenchCase("perturb_batch", "padded-table", "cell graph", B,
                      lambda p=pert, q=pert_ptr: batch_tensors(padded_perturber(p, q)), bytes_moved=pb_bytes),
        ]
        pert_d, pert_ptr_d, physical_d = pert.to(device), pert_ptr.to(device), physical.to(device)
        for backend in fast_backends:
            result.append(BenchCase("filter_edges", backend, "physical", B, partial(
                lambda p, q, b: edges(filter_edges(physical_d, num_genes, p, q, backend=b)), pert_d, pert_ptr_d, backend),
                bytes_moved=fe_bytes))
            if backend != "triton":  # the Triton backend covers the edge filter only
                result.append(BenchCase("filter_edges", f"{backend} out=", "physical", B, partial(
                    lambda p, q, b: edges(filter_edges(physical_d, num_genes, p, q, backend=b, validate=False,
                                                       out=edge_buffers[b])), pert_d, pert_ptr_d, backend),
                    bytes_moved=fe_bytes))
                result.append(BenchCase("perturb_batch", backend, "cell graph", B, partial(
                    lambda p, q, b: batch_tensors(perturb_batch(graph_on_device, p, q, backend=b)), pert_d, pert_ptr_d, backend),
                    bytes_moved=pb_bytes))
                result.append(BenchCase("perturb_batch", f"{backend} batcher", "cell graph", B, partial(
                    lambda p, q, b: batch_tensors(batchers[b](p, q)), pert_d, pert_ptr_d, backend),
                    bytes_moved=pb_bytes))
    return result
