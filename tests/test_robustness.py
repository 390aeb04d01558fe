"""Bad and unusual inputs through the public Python API: a clear exception naming the argument
(the same on every backend that can run here), or the right answer, never a crash or a silently
wrong result. The compiled kernels' own cases (called through torch.ops) are in
tests/build/test_compiled_robustness.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch_geometric.data import HeteroData

from stoichconv.backends import available_backends
from stoichconv.data.relations import GPR, METABOLISM
from stoichconv.nn import StoichHypergraphConv
from stoichconv.ops import build_stoich_plan, filter_bipartite, filter_edges, reaction_keep, stoich_conv
from stoichconv.perturb import perturb_batch
from stoichconv.train import make_small_cell_graph
from stoichconv.types import StoichPlan

CPU = torch.device("cpu")
N, M, NNZ = 9, 7, 30


def backends(op):
    """The backends of ``op`` that run CPU tensors here (the C++ kernels, Triton through the
    interpreter when it is on, the reference)."""
    return list(available_backends(CPU, op)[op])


def plan_and_inputs(seed=0, B=2, H=2, C=3):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, N, (NNZ,), generator=g), torch.randint(0, M, (NNZ,), generator=g)])
    stoich = torch.randn(NNZ, generator=g, dtype=torch.float64)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    y = torch.randn(B, N, H, C, generator=g, dtype=torch.float64)
    w = torch.randn(B, NNZ, H, generator=g, dtype=torch.float64)
    return plan, y, w


# -- hand-made plans: checked in full once ------------------------------------------------------
def _broken_plans(plan):
    swapped = plan.reaction_perm.clone()
    i = int(torch.nonzero(plan.reaction_index[swapped].diff() > 0)[0])  # swap across a segment boundary
    swapped[[i, i + 1]] = swapped[[i + 1, i]]
    repeated = plan.metabolite_perm.clone()
    repeated[1] = repeated[0]
    shifted_ptr = plan.reaction_ptr.clone()
    shifted_ptr[2] += 1
    return {
        "perm not sorted by its key": (dict(reaction_perm=swapped), "does not sort the incidences"),
        "perm with repeats": (dict(metabolite_perm=repeated), "must be a permutation"),
        "wrong segment boundaries": (dict(reaction_ptr=shifted_ptr), "does not match the segment boundaries"),
        "abs_stoich not |stoich|": (dict(abs_stoich=plan.abs_stoich * 2), "must equal"),
        "index out of range": (dict(metabolite_index=plan.metabolite_index + N), "out of range"),
    }


@pytest.mark.parametrize("case", sorted(_broken_plans(plan_and_inputs()[0])))
def test_inconsistent_hand_made_plan_is_refused_on_every_backend(case):
    plan, y, w = plan_and_inputs()
    change, match = _broken_plans(plan)[case]
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "checked"}
    for backend in backends("stoich_conv"):
        bad = StoichPlan(**{**fields, **change})
        with pytest.raises(ValueError, match=match):
            stoich_conv(y, w, bad, backend=backend)


def test_consistent_hand_made_plan_is_accepted_and_checked_once():
    plan, y, w = plan_and_inputs()
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "checked"}
    hand = StoichPlan(**fields)
    assert not hand.checked
    torch.testing.assert_close(stoich_conv(y, w, hand), stoich_conv(y, w, plan), rtol=0, atol=0)
    assert hand.checked and hand.to("cpu").checked
    assert build_stoich_plan(torch.stack([plan.metabolite_index, plan.reaction_index]), plan.stoich, N, M).checked


@pytest.mark.parametrize("bad", [None, "plan", 3])
def test_plan_of_the_wrong_type(bad):
    _, y, w = plan_and_inputs()
    with pytest.raises(TypeError, match="`plan` must be a StoichPlan"):
        stoich_conv(y, w, bad)


# -- sizes whose products overflow int64 --------------------------------------------------------
def test_overflowing_sizes_are_refused_on_every_backend():
    ei = torch.tensor([[0, 1], [1, 2]])
    pert, ptr = torch.tensor([0]), torch.tensor([0, 1, 1, 1, 1])
    for backend in backends("filter_edges"):
        with pytest.raises(ValueError, match="`node_keep` would have B = 4 \\* num_nodes"):
            filter_edges(ei, 2**62, pert, ptr, backend=backend)
    for backend in backends("filter_bipartite"):
        for relabel in (True, False):
            with pytest.raises(ValueError, match=r"`edge_index\[0\]` would have num_samples = 4 \* num_src"):
                filter_bipartite(ei, 2**62, 3, 4, relabel=relabel, backend=backend)
    for backend in backends("reaction_keep"):
        with pytest.raises(ValueError, match="`reaction_keep` would have B = 4 \\* num_reactions"):
            reaction_keep(ei, 2**62, pert, ptr, backend=backend)


# -- perturb_batch on malformed cell graphs ------------------------------------------------------
def test_perturb_batch_refuses_a_stoichiometry_of_the_wrong_length():
    pert, ptr = torch.tensor([0, 3]), torch.tensor([0, 1, 2])
    for delta in (-1, 1):
        graph = make_small_cell_graph()
        s = graph[METABOLISM].stoichiometry
        graph[METABOLISM].stoichiometry = torch.cat([s, s[:1]]) if delta > 0 else s[:-1]
        with pytest.raises(ValueError, match=r"stoichiometry` must be a float tensor \[nnz\]"):
            perturb_batch(graph, pert, ptr)


def test_perturb_batch_names_a_missing_relation_or_tensor():
    pert, ptr = torch.tensor([0]), torch.tensor([0, 1])
    graph = make_small_cell_graph()
    del graph[GPR]
    with pytest.raises(ValueError, match="`cell_graph` lacks the relation \\('gene', 'gpr', 'reaction'\\)"):
        perturb_batch(graph, pert, ptr)
    graph = make_small_cell_graph()
    del graph[METABOLISM].stoichiometry
    with pytest.raises(ValueError, match="lacks the tensor `stoichiometry`"):
        perturb_batch(graph, pert, ptr)
    with pytest.raises(TypeError, match="`cell_graph` must be a torch_geometric HeteroData"):
        perturb_batch({"gene": None}, pert, ptr)
    empty = HeteroData()
    with pytest.raises(ValueError, match="lacks the node type 'gene'"):
        perturb_batch(empty, pert, ptr)


# -- the layer: errors that name the argument ----------------------------------------------------
def _layer_inputs(B=2, F=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, N, (NNZ,), generator=g), torch.randint(0, M, (NNZ,), generator=g)])
    return (torch.randn(B, N, F, generator=g), edge_index, torch.randn(NNZ, generator=g),
            torch.randn(M, F, generator=g), torch.rand(B, M, generator=g) > 0.3)


LAYER_CASES = {
    "feature size": (lambda x, e, s, a, k: (x[..., :5], e, s, a, k), ValueError,
                     "`x` has 5 features but the layer was built with in_channels = 8"),
    "attr feature size": (lambda x, e, s, a, k: (x, e, s, a[:, :5], k), ValueError,
                          "`hyperedge_attr` has 5 features but `x` has 8"),
    "attr batch size": (lambda x, e, s, a, k: (x, e, s, a.expand(3, M, 8), k), ValueError,
                        "`hyperedge_attr` has batch size 3 but `x` has 2"),
    "attr rows": (lambda x, e, s, a, k: (x, e, s, a[:-1], k), ValueError, "`hyperedge_attr` must be"),
    "keep as a list": (lambda x, e, s, a, k: (x, e, s, a, k.tolist()), TypeError, "`reaction_keep` must be a bool tensor"),
    "keep of the wrong dtype": (lambda x, e, s, a, k: (x, e, s, a, k.long()), TypeError,
                                "`reaction_keep` must be a bool tensor"),
    "keep batch size": (lambda x, e, s, a, k: (x, e, s, a, k[:1]), ValueError, r"`reaction_keep` must have shape \[B, M\]"),
    "edge_index as a list": (lambda x, e, s, a, k: (x, e.tolist(), s, a, k), TypeError, "`edge_index` must be a torch.Tensor"),
    "stoich as a list": (lambda x, e, s, a, k: (x, e, s.tolist(), a, k), TypeError, "`stoich` must be a torch.Tensor"),
    "x of ints": (lambda x, e, s, a, k: (x.long(), e, s, a, k), ValueError, "`x` must be a floating tensor"),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_errors_name_the_argument(case):
    mutate, exc, match = LAYER_CASES[case]
    x, e, s, a, k = mutate(*_layer_inputs())
    for backend in backends("stoich_conv"):
        layer = StoichHypergraphConv(8, 4, is_stoich_gated=True, use_attention=True, heads=2, backend=backend)
        with pytest.raises(exc, match=match):
            layer(x, e, s, hyperedge_attr=a, num_edges=M, reaction_keep=k)


@pytest.mark.parametrize("backend", backends("stoich_conv"))
def test_empty_batch_with_a_keep_mask(backend):
    x, e, s, a, k = _layer_inputs(B=0)
    layer = StoichHypergraphConv(8, 4, is_stoich_gated=True, use_attention=True, heads=2, backend=backend)
    x.requires_grad_(True)
    out = layer(x, e, s, hyperedge_attr=a, num_edges=M, reaction_keep=k)
    assert out.shape == (0, N, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
