"""Property-based tests (hypothesis): random hypergraphs, GATv2 edge sets, gene graphs,
perturbation batches and bad variants of each, every backend that runs here against the
reference, or against the expected error. One fixed profile (derandomized, bounded example
counts, no deadline) keeps the CI time fixed and the runs reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoichconv.backends import available_backends
from stoichconv.ops import (
    build_stoich_plan,
    filter_bipartite,
    filter_edges,
    gatv2_attention,
    group_softmax,
    reaction_keep,
    stoich_conv,
)
from stoichconv.perturb import perturb_batch
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.train import make_small_cell_graph
from stoichconv.types import EdgeSet

settings.register_profile(
    "stoichconv", max_examples=20, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("stoichconv")
CPU = torch.device("cpu")


def runnable(op):
    return list(available_backends(CPU, op)[op])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- strategies -----------------------------------------------------------------------------------
@st.composite
def hypergraphs(draw):
    """(edge_index [2, nnz], stoich, N, M): repeats, isolated nodes, empty reactions, both signs."""
    N = draw(st.integers(1, 8))
    M = draw(st.integers(1, 8))
    nnz = draw(st.integers(0, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    g = _gen(seed)
    edge_index = torch.stack([torch.randint(0, N, (nnz,), generator=g), torch.randint(0, M, (nnz,), generator=g)])
    stoich = torch.randn(nnz, generator=g, dtype=torch.float64) * 3
    return edge_index, stoich, N, M, seed


@st.composite
def deletions(draw, num_genes, max_batch=4):
    """CSR deletion batch: duplicates, empty sets, any order, B = 0 allowed."""
    sets = draw(st.lists(st.lists(st.integers(0, num_genes - 1), max_size=4), max_size=max_batch))
    pert = torch.tensor([g for s in sets for g in s], dtype=torch.long)
    ptr = torch.tensor([0] + [len(s) for s in sets], dtype=torch.long).cumsum(0)
    return pert, ptr


# -- stoich conv ----------------------------------------------------------------------------------
@PROFILE
@given(graph=hypergraphs(), B=st.integers(0, 3), H=st.integers(1, 2), C=st.integers(1, 5), masked=st.booleans())
def test_stoich_conv_every_backend_matches_the_reference(graph, B, H, C, masked):
    edge_index, stoich, N, M, seed = graph
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = _gen(seed + 1)
    y = torch.randn(B, N, H, C, generator=g, dtype=torch.float64)
    w = torch.randn(B, plan.nnz, H, generator=g, dtype=torch.float64)
    keep = (torch.rand(B, M, generator=g) > 0.4) if masked else None
    grad = torch.randn(B, N, H, C, generator=g, dtype=torch.float64)
    results = {}
    for backend in runnable("stoich_conv"):
        yy, ww = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = stoich_conv(yy, ww, plan, keep, backend=backend)
        gy, gw = torch.autograd.grad(out, (yy, ww), grad, allow_unused=True)
        results[backend] = (out, gy if gy is not None else torch.zeros_like(y), gw if gw is not None else torch.zeros_like(w))
    want = results.pop("reference")
    for backend, got in results.items():
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend}: {m}")


@PROFILE
@given(graph=hypergraphs(), mutation=st.sampled_from(["negative", "metabolite", "reaction", "nan"]))
def test_bad_incidences_are_refused(graph, mutation):
    edge_index, stoich, N, M, _ = graph
    if edge_index.size(1) == 0:
        edge_index, stoich = torch.zeros(2, 1, dtype=torch.long), torch.ones(1, dtype=torch.float64)
    edge_index, stoich = edge_index.clone(), stoich.clone()
    if mutation == "negative":
        edge_index[1, 0] = -1
    elif mutation == "metabolite":
        edge_index[0, 0] = N
    elif mutation == "reaction":
        edge_index[1, 0] = M + 2
    else:
        stoich[0] = float("nan")
    with pytest.raises(ValueError, match="`edge_index|`stoich`"):
        build_stoich_plan(edge_index, stoich, N, M)


# -- group softmax ----------------------------------------------------------------------------------
@PROFILE
@given(graph=hypergraphs(), B=st.integers(1, 3), H=st.integers(1, 3), neginf=st.floats(0, 1), masked=st.booleans(),
       mode=st.sampled_from(["reaction", "metabolite"]))
def test_group_softmax_every_backend_matches_the_reference(graph, B, H, neginf, masked, mode):
    edge_index, stoich, N, M, seed = graph
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = _gen(seed + 2)
    logits = torch.randn(B, plan.nnz, H, generator=g, dtype=torch.float64) * 5
    logits[torch.rand(logits.shape, generator=g) < neginf] = float("-inf")  # whole groups of -inf included
    kept = (torch.rand(B, plan.nnz, generator=g) > 0.3) if masked else None
    ptr, perm = (plan.reaction_ptr, plan.reaction_perm) if mode == "reaction" else (plan.metabolite_ptr, plan.metabolite_perm)
    want = group_softmax(logits, ptr, perm, kept, backend="reference")
    assert not torch.isnan(want).any()
    for backend in runnable("group_softmax"):
        got = group_softmax(logits, ptr, perm, kept, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{backend}: {m}")


# -- GATv2 -------------------------------------------------------------------------------------------
@st.composite
def edge_sets(draw):
    num_src, num_dst, rows = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    E = draw(st.integers(0, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    g = _gen(seed)
    row = torch.sort(torch.randint(0, rows, (E,), generator=g)).values
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(row, minlength=rows).cumsum(0)])
    edges = EdgeSet(torch.randint(0, num_src, (E,), generator=g), torch.randint(0, num_dst, (E,), generator=g),
                    row, crow, rows)
    return edges, num_src, num_dst, seed


@PROFILE
@given(es=edge_sets(), H=st.integers(1, 2), C=st.integers(1, 4))
def test_gatv2_every_backend_matches_the_reference(es, H, C):
    edges, num_src, num_dst, seed = es
    g = _gen(seed + 3)
    x_l = torch.randn(num_src, H, C, generator=g, dtype=torch.float64)
    x_r = torch.randn(num_dst, H, C, generator=g, dtype=torch.float64)
    att = torch.randn(H, C, generator=g, dtype=torch.float64)
    grad = torch.randn(edges.num_rows, H, C, generator=g, dtype=torch.float64)

    def run(backend):
        inputs = [t.clone().requires_grad_(True) for t in (x_l, x_r, att)]
        out = gatv2_attention(*inputs, edges, 0.2, backend=backend)
        return (out,) + torch.autograd.grad(out, inputs, grad, allow_unused=True)

    want = run("reference")
    for backend in runnable("gatv2"):
        for a, b in zip(run(backend), want):
            if a is None or b is None:
                assert edges.num_edges == 0 or a is b
                continue
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend}: {m}")


# -- pert mask ---------------------------------------------------------------------------------------
@st.composite
def gene_graphs(draw):
    N = draw(st.integers(1, 10))
    E = draw(st.integers(0, 30))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(0, N, (2, E), generator=g), N


@PROFILE
@given(data=st.data(), graph=gene_graphs(), relabel=st.booleans())
def test_filter_edges_every_backend_matches_the_reference(data, graph, relabel):
    edge_index, N = graph
    pert, ptr = data.draw(deletions(N))
    want = filter_edges(edge_index, N, pert, ptr, relabel=relabel, backend="reference")
    B = ptr.numel() - 1
    # an independent expectation of the keep-masks: brute force over samples
    for b in range(B):
        deleted = set(pert[ptr[b]:ptr[b + 1]].tolist())
        node_keep = [v not in deleted for v in range(N)]
        assert want.node_keep[b * N:(b + 1) * N].tolist() == node_keep
        edge_keep = [node_keep[s] and node_keep[d] for s, d in edge_index.t().tolist()]
        assert want.edge_keep[b * edge_index.size(1):(b + 1) * edge_index.size(1)].tolist() == edge_keep
    for backend in runnable("filter_edges"):
        got = filter_edges(edge_index, N, pert, ptr, relabel=relabel, backend=backend)
        for a, b in zip(got, want):
            assert torch.equal(a, b), backend


@PROFILE
@given(data=st.data(), graph=gene_graphs(), num_reactions=st.integers(1, 6))
def test_reaction_keep_and_filter_bipartite_match_the_reference(data, graph, num_reactions):
    edge_index, N = graph
    gpr = torch.stack([edge_index[0], edge_index[1] % num_reactions])
    pert, ptr = data.draw(deletions(N))
    B = ptr.numel() - 1
    want_keep = reaction_keep(gpr, num_reactions, pert, ptr, backend="reference")
    src_keep = torch.rand(B, N, generator=_gen(B)) > 0.3
    want_bip = filter_bipartite(gpr, N, num_reactions, B, src_keep, want_keep, backend="reference")
    for backend in runnable("reaction_keep"):
        assert torch.equal(reaction_keep(gpr, num_reactions, pert, ptr, backend=backend), want_keep), backend
    for backend in runnable("filter_bipartite"):
        for relabel in (True, False):
            got = filter_bipartite(gpr, N, num_reactions, B, src_keep, want_keep, relabel=relabel, backend=backend)
            ref = filter_bipartite(gpr, N, num_reactions, B, src_keep, want_keep, relabel=relabel, backend="reference")
            for a, b in zip(got, ref):
                assert torch.equal(a, b), backend


@PROFILE
@given(data=st.data(), graph=gene_graphs(),
       mutation=st.sampled_from(["id too large", "negative id", "ptr not starting at 0", "ptr decreasing",
                                 "ptr not ending at len", "float pert"]))
def test_bad_deletion_batches_give_the_same_error_on_every_backend(data, graph, mutation):
    edge_index, N = graph
    pert, ptr = data.draw(deletions(N, max_batch=3))
    pert, ptr = torch.cat([pert, torch.tensor([0])]), torch.cat([ptr, ptr[-1:] + 1])
    if mutation == "id too large":
        pert[-1] = N
    elif mutation == "negative id":
        pert[-1] = -1
    elif mutation == "ptr not starting at 0":
        ptr = ptr + 1
    elif mutation == "ptr decreasing":
        ptr = torch.cat([ptr[:1], ptr[-1:] + 5, ptr[1:]])
    elif mutation == "ptr not ending at len":
        ptr[-1] += 1
    else:
        pert = pert.float()
    messages = set()
    for backend in runnable("filter_edges"):
        with pytest.raises((ValueError, TypeError)) as info:
            filter_edges(edge_index, N, pert, ptr, backend=backend)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


# -- the batch builder on a cell graph -----------------------------------------------------------------
@settings(PROFILE, max_examples=8)
@given(data=st.data())
def test_perturb_batch_matches_the_reference(data):
    graph = make_small_cell_graph()
    num_genes = int(graph["gene"].num_nodes)
    pert, ptr = data.draw(deletions(num_genes, max_batch=3).filter(lambda p: p[1].numel() > 1))
    got = perturb_batch(graph, pert, ptr, layout="compacted")
    want = perturb_batch_reference(graph, pert, ptr)
    for relation in want.edge_types:
        key = "hyperedge_index" if "hyperedge_index" in want[relation] else "edge_index"
        assert torch.equal(got[relation][key], want[relation][key]), relation
    for node_type in want.node_types:
        assert torch.equal(got[node_type].n_id, want[node_type].n_id), node_type
