"""The perturbation-masking operators (stoichconv.ops.pert_mask) against the
per-sample PyG reference, opcheck, determinism, edge cases and bad input."""

import sys

import pytest
import torch

from stoichconv._extension import has_compiled_kernels
from stoichconv.backends import BackendUnavailableError
from stoichconv.ops.pert_mask import filter_bipartite, filter_edges, reaction_keep
from stoichconv.reference.perturb import (
    filter_bipartite_reference,
    filter_edges_reference,
    reaction_keep_reference,
)

needs_c = pytest.mark.skipif(not has_compiled_kernels(), reason="stoichconv._C not built")


# --------------------------------------------------------------------------- inputs


def random_graph(num_nodes: int, num_edges: int, seed: int, isolated: int = 3) -> torch.Tensor:
    """Edges among the first num_nodes - isolated nodes, with self-loops and
    multi-edges forced in."""
    g = torch.Generator().manual_seed(seed)
    active = max(num_nodes - isolated, 1)
    ei = torch.randint(active, (2, num_edges), generator=g)
    if num_edges >= 4:
        ei[1, 0] = ei[0, 0]  # self-loop
        ei[:, 1] = ei[:, 2]  # multi-edge
    return ei


def random_perts(num_nodes: int, batch_size: int, seed: int, max_size: int = 5):
    """Deletion sets of size 0..max_size, drawn with replacement (duplicates
    possible), unsorted; sample 0 deletes one gene twice."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(max_size + 1, (batch_size,), generator=g)
    pert = torch.randint(num_nodes, (int(sizes.sum()),), generator=g)
    if batch_size > 0:
        sizes[0] = 3
        first = torch.randint(num_nodes, (2,), generator=g)
        pert = torch.cat([torch.stack([first[0], first[1], first[0]]), pert[int(sizes[0]) :]])
        pert = pert[: int(sizes.sum())]
        if pert.numel() < int(sizes.sum()):
            pert = torch.cat([pert, torch.randint(num_nodes, (int(sizes.sum()) - pert.numel(),), generator=g)])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return pert, ptr


def assert_same(result, expected):
    assert len(result) == len(expected)
    for name, a, b in zip(type(expected)._fields, result, expected):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- filter_edges


@needs_c
@pytest.mark.parametrize("batch_size", [0, 1, 3, 32])
@pytest.mark.parametrize("relabel", [True, False])
def test_filter_edges_matches_reference(batch_size, relabel):
    N = 50
    ei = random_graph(N, 400, seed=batch_size)
    pert, ptr = random_perts(N, batch_size, seed=batch_size + 1)
    out = filter_edges(ei, N, pert, ptr, relabel=relabel, backend="cpu")
    ref = filter_edges_reference(ei, N, pert, ptr, relabel=relabel)
    assert_same(out, ref)
    B = batch_size
    assert out.edge_ptr.shape == (B + 1,) and out.node_ptr.shape == (B + 1,)
    assert out.edge_keep.shape == (B * 400,) and out.node_keep.shape == (B * N,)
    assert out.edge_index.size(1) == int(out.edge_keep.sum()) == int(out.edge_ptr[-1])


@needs_c
def test_filter_edges_semantics_by_hand():
    # nodes 0..4; edges (0,1) (1,2) (2,2) (3,4) (1,2); sample 0 deletes 2 (twice), sample 1 nothing,
    # sample 2 deletes 0 and 4.
    ei = torch.tensor([[0, 1, 2, 3, 1], [1, 2, 2, 4, 2]])
    pert = torch.tensor([2, 2, 4, 0])
    ptr = torch.tensor([0, 2, 2, 4])
    out = filter_edges(ei, 5, pert, ptr)
    # sample 0 keeps 0,1,3,4 -> ranks 0,1,2,3; edges (0,1) (3,4) -> (0,1) (2,3)
    # sample 1 keeps all (offset 4): all 5 edges + 4
    # sample 2 keeps 1,2,3 (offset 9) -> ranks 0,1,2; edges (1,2) (2,2) (1,2) -> (9,10) (10,10) (9,10)
    expected = torch.tensor([[0, 2, 4, 5, 6, 7, 5, 9, 10, 9], [1, 3, 5, 6, 6, 8, 6, 10, 10, 10]])
    assert torch.equal(out.edge_index, expected)
    assert out.edge_ptr.tolist() == [0, 2, 7, 10]
    assert out.node_ptr.tolist() == [0, 4, 9, 12]
    assert out.node_keep.view(3, 5).tolist() == [
        [True, True, False, True, True],
        [True] * 5,
        [False, True, True, True, False],
    ]
    full = filter_edges(ei, 5, pert, ptr, relabel=False)
    assert full.edge_index[:, :2].tolist() == [[0, 3], [1, 4]]
    assert full.edge_index[:, 7:].tolist() == [[11, 12, 11], [12, 12, 12]]


@needs_c
@pytest.mark.parametrize("relabel", [True, False])
def test_filter_edges_empty_cases(relabel):
    N = 7
    empty_edges = torch.empty(2, 0, dtype=torch.long)
    pert, ptr = torch.tensor([1, 6]), torch.tensor([0, 1, 1, 2])
    out = filter_edges(empty_edges, N, pert, ptr, relabel=relabel)
    assert out.edge_index.shape == (2, 0) and out.edge_ptr.tolist() == [0, 0, 0, 0]
    assert out.edge_keep.numel() == 0 and out.node_ptr.tolist() == [0, 6, 13, 19]
    # B = 0
    out = filter_edges(random_graph(N, 9, 0), N, torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert out.edge_index.shape == (2, 0) and out.edge_ptr.tolist() == [0] and out.node_ptr.tolist() == [0]
    assert out.edge_keep.numel() == 0 and out.node_keep.numel() == 0
    # empty deletion sets keep everything, in wildtype order
    ei = random_graph(N, 9, 1)
    out = filter_edges(ei, N, torch.empty(0, dtype=torch.long), torch.zeros(3, dtype=torch.long), relabel=relabel)
    assert torch.equal(out.edge_index, torch.cat([ei, ei + N], dim=1))
    assert bool(out.edge_keep.all()) and bool(out.node_keep.all())


@needs_c
def test_filter_edges_int32_inputs_accepted():
    N = 20
    ei = random_graph(N, 60, 3)
    pert, ptr = random_perts(N, 4, 3)
    out = filter_edges(ei.int(), N, pert.int(), ptr.int())
    assert_same(out, filter_edges(ei, N, pert, ptr))


# --------------------------------------------------------------------------- reaction_keep


def gpr_graph(num_genes=30, num_reactions=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    genes = torch.randint(num_genes, (45,), generator=g)
    reactions = torch.randint(num_reactions - 2, (45,), generator=g)  # the last two have no gene
    # reaction 0 has exactly genes 3 and 7 (besides random ones elsewhere)
    reactions[reactions == 0] = 1
    gpr = torch.stack([torch.cat([genes, torch.tensor([3, 7])]), torch.cat([reactions, torch.tensor([0, 0])])])
    return gpr


@needs_c
@pytest.mark.parametrize("batch_size", [0, 1, 3, 32])
def test_reaction_keep_matches_reference(batch_size):
    gpr = gpr_graph(seed=batch_size)
    pert, ptr = random_perts(30, batch_size, seed=batch_size + 7)
    if batch_size > 0:  # sample b = last deletes every gene of reaction 0 (3 and 7), 7 twice
        pert = torch.cat([pert, torch.tensor([7, 3, 7])])
        ptr = ptr.clone()
        ptr[-1] += 3
    out = reaction_keep(gpr, 20, pert, ptr, backend="cpu")
    ref = reaction_keep_reference(gpr, 20, pert, ptr)
    assert out.dtype == torch.bool and out.shape == (batch_size, 20)
    assert torch.equal(out, ref)
    if batch_size > 0:
        assert not bool(out[-1, 0])
        assert bool(out[:, 18:].all())  # no GPR gene: never removed
        removed = gpr[1][torch.isin(gpr[0], torch.tensor([3, 7]))].unique()
        assert not bool(out[-1, removed].any())


# --------------------------------------------------------------------------- filter_bipartite


@needs_c
@pytest.mark.parametrize("batch_size", [0, 1, 3, 32])
@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("masks", ["both", "src", "dst", "none"])
def test_filter_bipartite_matches_reference(batch_size, relabel, masks):
    g = torch.Generator().manual_seed(batch_size)
    Ns, Nd = 17, 11
    ei = torch.stack([torch.randint(Ns, (80,), generator=g), torch.randint(Nd, (80,), generator=g)])
    sk = torch.rand(batch_size, Ns, generator=g) > 0.2 if masks in ("both", "src") else None
    dk = torch.rand(batch_size, Nd, generator=g) > 0.3 if masks in ("both", "dst") else None
    out = filter_bipartite(ei, Ns, Nd, batch_size, sk, dk, relabel=relabel, backend="cpu")
    ref = filter_bipartite_reference(ei, Ns, Nd, batch_size, sk, dk, relabel=relabel)
    assert_same(out, ref)
    # edge_id points at the wildtype edge of each survivor
    sample = torch.repeat_interleave(torch.arange(batch_size), out.edge_ptr.diff())
    assert torch.equal(out.edge_keep.view(batch_size, 80)[sample, out.edge_id], torch.ones_like(out.edge_id, dtype=torch.bool))
    if not relabel:
        assert torch.equal(out.edge_index[0], ei[0, out.edge_id] + sample * Ns)
        assert torch.equal(out.edge_index[1], ei[1, out.edge_id] + sample * Nd)


@needs_c
def test_filter_bipartite_empty_edges():
    out = filter_bipartite(torch.empty(2, 0, dtype=torch.long), 4, 5, 3, None, torch.ones(3, 5, dtype=torch.bool))
    assert out.edge_index.shape == (2, 0) and out.edge_ptr.tolist() == [0, 0, 0, 0]
    assert out.edge_keep.numel() == 0 and out.edge_id.numel() == 0


# --------------------------------------------------------------------------- opcheck, determinism


def _opcheck_cases():
    N = 25
    ei = random_graph(N, 120, 5)
    cases = []
    for B in (0, 1, 4):
        pert, ptr = random_perts(N, B, seed=B)
        for relabel in (True, False):
            cases.append(("filter_edges", (ei, N, pert, ptr, relabel)))
        cases.append(("reaction_keep", (gpr_graph(), 20, *random_perts(30, B, seed=B + 1))))
        g = torch.Generator().manual_seed(B)
        bip = torch.stack([torch.randint(N, (60,), generator=g), torch.randint(9, (60,), generator=g)])
        sk = torch.rand(B, N, generator=g) > 0.3
        dk = torch.rand(B, 9, generator=g) > 0.3
        for relabel in (True, False):
            cases.append(("filter_bipartite", (bip, N, 9, B, sk, dk, relabel)))
            cases.append(("filter_bipartite", (bip, N, 9, B, None, dk, relabel)))
    cases.append(("filter_edges", (torch.empty(2, 0, dtype=torch.long), N, torch.tensor([1]), torch.tensor([0, 1]), True)))
    return cases


@needs_c
@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.stoichconv, name).default, args)


@needs_c
def test_deterministic_across_runs_and_threads():
    N = 300
    ei = random_graph(N, 200_000, 11)  # several chunks per sample
    pert, ptr = random_perts(N, 5, 11, max_size=40)
    threads = torch.get_num_threads()
    try:
        first = filter_edges(ei, N, pert, ptr)
        again = filter_edges(ei, N, pert, ptr)
        torch.set_num_threads(1)
        single = filter_edges(ei, N, pert, ptr)
    finally:
        torch.set_num_threads(threads)
    assert_same(again, first)
    assert_same(single, first)
    assert_same(first, filter_edges_reference(ei, N, pert, ptr))


# --------------------------------------------------------------------------- backends


def test_reference_backend_matches_compiled_or_runs():
    N = 30
    ei = random_graph(N, 100, 2)
    pert, ptr = random_perts(N, 3, 2)
    ref = filter_edges(ei, N, pert, ptr, backend="reference")
    assert_same(ref, filter_edges_reference(ei, N, pert, ptr))
    assert torch.equal(reaction_keep(gpr_graph(), 20, pert, ptr, backend="reference"),
                       reaction_keep_reference(gpr_graph(), 20, pert, ptr))
    if has_compiled_kernels():
        assert_same(filter_edges(ei, N, pert, ptr, backend="cpu"), ref)


def test_triton_backend_unavailable(monkeypatch):
    N = 10
    ei = random_graph(N, 20, 0)
    pert, ptr = torch.tensor([1]), torch.tensor([0, 1])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="triton"):
        filter_edges(ei, N, pert, ptr, backend="triton")  # CPU tensors, no TRITON_INTERPRET
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "stoichconv.ops.pert_mask.triton_kernels", None)  # import fails
    with pytest.raises(BackendUnavailableError, match="triton_filter_edges"):
        filter_edges(ei, N, pert, ptr, backend="triton")
    with pytest.raises(BackendUnavailableError, match="reaction_keep has no triton kernel"):
        reaction_keep(gpr_graph(), 20, pert, ptr, backend="triton")


def test_triton_dispatch_compacted_matches_reference(monkeypatch):
    # Wiring of backend="triton" (the kernel itself is tested in tests/triton).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    N = 20
    ei = random_graph(N, 50, 8)
    pert, ptr = random_perts(N, 3, 8)
    out = filter_edges(ei.to(device), N, pert.to(device), ptr.to(device), relabel=True, backend="triton")
    ref = filter_edges_reference(ei, N, pert, ptr, relabel=True)
    assert isinstance(out, type(ref))
    assert_same(tuple(t.cpu() for t in out), ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_matches_cpu_reference():
    N = 60
    ei = random_graph(N, 500, 4)
    pert, ptr = random_perts(N, 8, 4)
    out = filter_edges(ei.cuda(), N, pert.cuda(), ptr.cuda())
    assert_same(tuple(t.cpu() for t in out), filter_edges_reference(ei, N, pert, ptr))
    rk = reaction_keep(gpr_graph().cuda(), 20, pert.cuda() % 30, ptr.cuda())
    assert torch.equal(rk.cpu(), reaction_keep_reference(gpr_graph(), 20, pert % 30, ptr))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(pert=torch.tensor([5])), ValueError, r"`pert` has gene id 5 outside \[0, num_nodes=5\)"),
        (dict(pert=torch.tensor([-1])), ValueError, "`pert` has a negative gene id -1"),
        (dict(pert_ptr=torch.tensor([1, 1])), ValueError, "`pert_ptr` must start at 0"),
        (dict(pert=torch.tensor([1, 2]), pert_ptr=torch.tensor([0, 2, 1, 2])), ValueError, "`pert_ptr` must be non-decreasing"),
        (dict(pert_ptr=torch.tensor([0, 0])), ValueError, r"`pert_ptr` must end at len\(pert\) = 1"),
        (dict(pert_ptr=torch.tensor([], dtype=torch.long)), ValueError, "`pert_ptr` must be 1-D"),
        (dict(edge_index=torch.tensor([[0, 5], [1, 1]])), ValueError, r"`edge_index\[0\]` has id 5 >= num_nodes = 5"),
        (dict(edge_index=torch.tensor([[0, 1], [1, 7]])), ValueError, r"`edge_index\[1\]` has id 7 >= num_nodes = 5"),
        (dict(edge_index=torch.tensor([[0, -1], [1, 1]])), ValueError, "`edge_index` contains a negative id"),
        (dict(edge_index=torch.tensor([0, 1])), ValueError, r"`edge_index` must have shape \[2, E\]"),
        (dict(edge_index=torch.tensor([[0.0, 1.0], [1.0, 2.0]])), TypeError, "`edge_index` must hold integer indices"),
        (dict(pert=torch.tensor([1.0])), TypeError, "`pert` must hold integer indices"),
        (dict(pert_ptr=torch.tensor([0.0, 1.0])), TypeError, "`pert_ptr` must hold integer indices"),
        (dict(pert=[1]), TypeError, "`pert` must be a torch.Tensor"),
        (dict(num_nodes=-1), ValueError, "`num_nodes` must be non-negative"),
        (dict(num_nodes=5.0), TypeError, "`num_nodes` must be an int"),
        (dict(pert_ptr=torch.tensor([0, 1], device="meta")), ValueError, "`pert_ptr` is on meta but `pert` is on cpu"),
        (dict(edge_index=torch.tensor([[0], [1]], device="meta")), ValueError, "`edge_index` is on meta but `pert` is on cpu"),
        (dict(backend="gpu"), ValueError, "`backend` must be one of"),
    ],
)
def test_filter_edges_bad_input(kwargs, error, message):
    args = dict(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=5, pert=torch.tensor([1]),
                pert_ptr=torch.tensor([0, 1]), backend="auto")
    args.update(kwargs)
    with pytest.raises(error, match=message):
        filter_edges(args["edge_index"], args["num_nodes"], args["pert"], args["pert_ptr"], backend=args["backend"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(gpr_index=torch.tensor([[0, 1], [0, 20]])), ValueError, r"`gpr_index\[1\]` has id 20 >= num_reactions = 20"),
        (dict(gpr_index=torch.tensor([[0, -2], [0, 1]])), ValueError, "`gpr_index` contains a negative id"),
        (dict(gpr_index=torch.tensor([[0.5], [1.0]])), TypeError, "`gpr_index` must hold integer indices"),
        (dict(pert=torch.tensor([-3])), ValueError, "`pert` has a negative gene id"),
        (dict(pert=torch.tensor([30]), num_genes=30), ValueError, r"`pert` has gene id 30 outside \[0, num_genes=30\)|num_nodes=30"),
        (dict(gpr_index=torch.tensor([[30], [1]]), num_genes=30), ValueError, r"`gpr_index\[0\]` has id 30 >= num_genes = 30"),
        (dict(num_reactions=-4), ValueError, "`num_reactions` must be non-negative"),
        (dict(pert_ptr=torch.tensor([0, 2])), ValueError, r"`pert_ptr` must end at len\(pert\)"),
    ],
)
def test_reaction_keep_bad_input(kwargs, error, message):
    args = dict(gpr_index=torch.tensor([[0, 1], [0, 1]]), num_reactions=20, pert=torch.tensor([1]),
                pert_ptr=torch.tensor([0, 1]), num_genes=None)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        reaction_keep(args["gpr_index"], args["num_reactions"], args["pert"], args["pert_ptr"],
                      num_genes=args["num_genes"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(src_keep=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"`src_keep` must have shape \[B, N\] = \[3, 4\]"),
        (dict(dst_keep=torch.ones(3, 5)), TypeError, "`dst_keep` must be a bool tensor"),
        (dict(edge_index=torch.tensor([[4], [0]])), ValueError, r"`edge_index\[0\]` has id 4 >= num_src = 4"),
        (dict(edge_index=torch.tensor([[0], [5]])), ValueError, r"`edge_index\[1\]` has id 5 >= num_dst = 5"),
        (dict(num_samples=-1), ValueError, "`num_samples` must be non-negative"),
        (dict(dst_keep=torch.ones(3, 5, dtype=torch.bool, device="meta")), ValueError, "`dst_keep` is on meta"),
    ],
)
def test_filter_bipartite_bad_input(kwargs, error, message):
    args = dict(edge_index=torch.tensor([[0, 3], [1, 4]]), num_src=4, num_dst=5, num_samples=3, src_keep=None,
                dst_keep=None)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        filter_bipartite(**args)


@needs_c
def test_compiled_op_checks_bypassing_python():
    # A direct torch.ops call never reads out of bounds: the kernel checks too.
    with pytest.raises(RuntimeError, match="`pert` has gene id 9"):
        torch.ops.stoichconv.filter_edges(torch.tensor([[0], [1]]), 5, torch.tensor([9]), torch.tensor([0, 1]), True)
    with pytest.raises(RuntimeError, match="`edge_index\\[1\\]` has id 6"):
        torch.ops.stoichconv.filter_edges(torch.tensor([[0], [6]]), 5, torch.tensor([1]), torch.tensor([0, 1]), True)
    with pytest.raises(RuntimeError, match="`pert_ptr` must end at len"):
        torch.ops.stoichconv.reaction_keep(torch.tensor([[0], [1]]), 3, torch.tensor([1]), torch.tensor([0, 0]))


@needs_c
def test_torch_compile_traces_the_ops():
    # The fake kernels (data-dependent output sizes) let dynamo trace a full graph.
    N = 20
    ei = random_graph(N, 100, 9)
    pert, ptr = random_perts(N, 3, 9)

    def pipeline(ei, pert, ptr):
        edges, edge_ptr, edge_keep, node_keep, node_ptr = torch.ops.stoichconv.filter_edges(ei, N, pert, ptr, True)
        rkeep = torch.ops.stoichconv.reaction_keep(ei, N, pert, ptr)
        bip = torch.ops.stoichconv.filter_bipartite(ei, N, N, 3, node_keep.view(3, N), rkeep, True)
        return edges.sum(0), edge_ptr + node_ptr, bip[0].float().mean(), bip[3]

    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(ei, pert, ptr), pipeline(ei, pert, ptr)):
        assert torch.equal(a, b)
