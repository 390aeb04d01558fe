"""Operators, one folder per op: ``stoichconv/ops/<op>/`` holds the public function(s) with
the semantics in the docstring, the argument validation, the fake kernels and autograd
registration, the Triton kernels and the op's :class:`~stoichconv.backends.OpSpec`. Schemas
live in ``csrc/stoichconv.cpp``, C++ kernels in ``csrc/cpu`` and ``csrc/cuda``, references in
:mod:`stoichconv.reference`. Importing this package registers every op, the Triton ``stoichconv::triton_*`` custom ops
included (so ``TRITON_INTERPRET=1``, to run them on CPU tensors, must be set before
``import stoichconv``)."""

from stoichconv.backends import load_entries
from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.ops.group_softmax import group_softmax
from stoichconv.ops.incidence_attention import incidence_attention
from stoichconv.ops.pert_mask import filter_bipartite, filter_edges, reaction_keep
from stoichconv.ops.stoich_conv import PlanCache, build_stoich_plan, stoich_conv, stoich_propagate
from stoichconv.types import EdgeSet, FilteredBipartite, FilteredEdges, StoichPlan

load_entries()  # every op's reference and Triton modules: registration independent of import order

__all__ = [
    "EdgeSet",
    "FilteredBipartite",
    "FilteredEdges",
    "PlanCache",
    "StoichPlan",
    "build_stoich_plan",
    "filter_bipartite",
    "filter_edges",
    "gatv2_attention",
    "group_softmax",
    "incidence_attention",
    "reaction_keep",
    "stoich_conv",
    "stoich_propagate",
]
