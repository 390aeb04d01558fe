"""The perturbation-masking operators (stoichconv.ops.pert_mask: filter_edges, reaction_keep,
filter_bipartite) on every backend of their table entries (cpu, cuda, triton for filter_edges
on CPU through the interpreter and on the GPU, and the reference itself), against independent
brute-force expectations written here in plain Python, the per-sample PyG references and the
compiled CPU kernels: exact integer / bool equality, opcheck of every backend's operator,
determinism, edge cases, torch.compile and bad input. CUDA-only checks (the real cell graph,
device mismatches) at the end."""

import dataclasses
import sys

import pytest
import torch

from stoichconv.backends import OPS, BackendUnavailableError, resolve
from stoichconv.ops.pert_mask import filter_bipartite, filter_edges, reaction_keep
from stoichconv.reference.pert_mask import filter_bipartite_reference, filter_edges_reference, reaction_keep_reference
from stoichconv.testing import (
    CudaSyncCounter,
    backend_cases,
    backend_params,
    device_params,
    kernel_op,
    random_deletions,
    random_edge_index,
)

OPS3 = ("filter_edges", "reaction_keep", "filter_bipartite")
FE = backend_params("filter_edges", reference=True)  # cpu, cuda, triton-cpu, triton-cuda, reference-*
FE_KERNELS = backend_params("filter_edges")
RK = backend_params("reaction_keep", reference=True)
RK_KERNELS = backend_params("reaction_keep")
FB = backend_params("filter_bipartite", reference=True)
FB_KERNELS = backend_params("filter_bipartite")
# the backends that run all three ops
ALL3 = [p for p in FE_KERNELS if all(p.id in {q.id for q in backend_params(op)} for op in OPS3)]
COMPILED = [p for p in ALL3 if p.values[0] in ("cpu", "cuda")]
CUDA = device_params(("cuda",))

def index_dtypes(backend, op):
    """The index dtypes a backend's raw operator takes: the compiled ones int64, Triton any width."""
    if backend != "triton":
        return (torch.int64,)
    return (torch.int64, torch.int32)  # the fakes give int64 ids for either, as the operators do


# --------------------------------------------------------------------------- brute force


def brute_filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel):
    """filter_edges by the definition, one sample and one edge at a time (plain Python)."""
    edges, ptr, deleted_ids = edge_index.tolist(), pert_ptr.tolist(), pert.tolist()
    src, dst, edge_ptr, edge_keep, node_keep, node_ptr = [], [], [0], [], [], [0]
    offset = 0
    for b in range(len(ptr) - 1):
        deleted = set(deleted_ids[ptr[b]:ptr[b + 1]])
        keep = [v not in deleted for v in range(num_nodes)]
        rank = [sum(keep[:v]) for v in range(num_nodes)]
        for u, v in zip(*edges):
            kept = keep[u] and keep[v]
            edge_keep.append(kept)
            if kept:
                src.append(offset + rank[u] if relabel else b * num_nodes + u)
                dst.append(offset + rank[v] if relabel else b * num_nodes + v)
        edge_ptr.append(len(src))
        node_keep += keep
        node_ptr.append(node_ptr[-1] + sum(keep))
        offset += sum(keep) if relabel else num_nodes
    return (torch.tensor([src, dst], dtype=torch.long).view(2, -1), torch.tensor(edge_ptr),
            torch.tensor(edge_keep, dtype=torch.bool), torch.tensor(node_keep, dtype=torch.bool), torch.tensor(node_ptr))


def brute_reaction_keep(gpr_index, num_reactions, pert, pert_ptr):
    """Reaction r of sample b is removed iff one of its GPR genes is deleted in b."""
    pairs, ptr, ids = gpr_index.t().tolist(), pert_ptr.tolist(), pert.tolist()
    rows = []
    for b in range(len(ptr) - 1):
        deleted = set(ids[ptr[b]:ptr[b + 1]])
        rows.append([not any(g in deleted for g, r2 in pairs if r2 == r) for r in range(num_reactions)])
    return torch.tensor(rows, dtype=torch.bool).view(len(ptr) - 1, num_reactions)


def brute_filter_bipartite(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel):
    """filter_bipartite by the definition: each side numbered by its own kept counts."""
    edges = edge_index.tolist()
    sk = [[True] * num_src] * num_samples if src_keep is None else src_keep.tolist()
    dk = [[True] * num_dst] * num_samples if dst_keep is None else dst_keep.tolist()
    rows, cols, edge_ptr, edge_keep, edge_id = [], [], [0], [], []
    src_offset = dst_offset = 0
    for b in range(num_samples):
        for e, (u, v) in enumerate(zip(*edges)):
            kept = sk[b][u] and dk[b][v]
            edge_keep.append(kept)
            if kept:
                rows.append(src_offset + sum(sk[b][:u]) if relabel else b * num_src + u)
                cols.append(dst_offset + sum(dk[b][:v]) if relabel else b * num_dst + v)
                edge_id.append(e)
        edge_ptr.append(len(rows))
        src_offset += sum(sk[b]) if relabel else num_src
        dst_offset += sum(dk[b]) if relabel else num_dst
    return (torch.tensor([rows, cols], dtype=torch.long).view(2, -1), torch.tensor(edge_ptr),
            torch.tensor(edge_keep, dtype=torch.bool), torch.tensor(edge_id, dtype=torch.long))


def assert_same(result, expected, device=None):
    """Same length, dtypes and values (compared on the CPU); outputs on ``device`` when given."""
    result, expected = tuple(result), tuple(expected)
    assert len(result) == len(expected)
    for i, (a, b) in enumerate(zip(result, expected)):
        if device is not None:
            assert a.device.type == torch.device(device).type, i
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        assert torch.equal(a.cpu(), b.cpu()), i


def to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def gpr_graph(num_genes=30, num_reactions=20, num_pairs=45, geneless=2, seed=0):
    """GPR pairs [2, E]: the last ``geneless`` reactions have no gene, reaction 0 exactly
    genes 3 and 7."""
    g = torch.Generator().manual_seed(seed)
    genes = torch.randint(num_genes, (num_pairs,), generator=g)
    reactions = torch.randint(num_reactions - geneless, (num_pairs,), generator=g)
    reactions[reactions == 0] = 1
    return torch.stack([torch.cat([genes, torch.tensor([3, 7])]), torch.cat([reactions, torch.tensor([0, 0])])])


# --------------------------------------------------------------------------- filter_edges

# (num_nodes, num_edges, batch size): several samples per block and blocks per sample (the
# Triton kernels work on blocks of 128 edges), empty relations and batches.
FILTER_EDGES_CASES = [(50, 400, 0), (50, 400, 1), (50, 400, 3), (50, 400, 32), (12, 40, 1), (12, 40, 3),
                      (12, 300, 3), (50, 300, 7), (40, 5000, 3), (13, 0, 4), (10, 20, 0), (30, 2048, 2)]
INTERPRETED_FILTER_EDGES_CASES = [(50, 400, 3), (12, 40, 1), (12, 40, 3), (12, 300, 3), (13, 0, 4), (10, 20, 0),
                                  (30, 2048, 2)]


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("backend,device,N,E,B", backend_cases(FE, FILTER_EDGES_CASES, INTERPRETED_FILTER_EDGES_CASES))
def test_filter_edges_matches_brute_force(backend, device, N, E, B, relabel):
    ei = random_edge_index(N, E, seed=E + B, isolated=3)
    pert, ptr = random_deletions(N, B, seed=N + B)
    want = brute_filter_edges(ei, N, pert, ptr, relabel)
    out = filter_edges(*to(device, ei, N, pert, ptr), relabel=relabel, backend=backend)
    assert_same(out, want, device)
    assert_same(out, filter_edges_reference(ei, N, pert, ptr, relabel=relabel))
    assert out.edge_ptr.shape == (B + 1,) and out.node_ptr.shape == (B + 1,)
    assert out.edge_keep.shape == (B * E,) and out.node_keep.shape == (B * N,)
    assert out.edge_index.size(1) == int(out.edge_keep.sum()) == int(out.edge_ptr[-1])
    if backend != "reference":  # the raw operator, and the compiled CPU kernel's answer
        raw = kernel_op("filter_edges", backend, device)(*to(device, ei, N, pert, ptr, relabel))
        assert_same(raw, want, device)
        assert_same(raw, torch.ops.stoichconv.filter_edges(ei, N, pert, ptr, relabel))


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("backend,device", FE)
def test_filter_edges_unsorted_duplicate_deletions_over_several_blocks(backend, device, relabel):
    # E > 2 blocks of 128 edges: block offsets cross block and sample boundaries.
    ei = random_edge_index(12, 300, seed=3)
    pert = torch.tensor([7, 2, 7, 2, 11, 0, 5, 5, 3])  # unsorted, duplicated
    ptr = torch.tensor([0, 4, 4, 9])
    out = filter_edges(*to(device, ei, 12, pert, ptr), relabel=relabel, backend=backend)
    assert_same(out, brute_filter_edges(ei, 12, pert, ptr, relabel), device)


@pytest.mark.parametrize("backend,device", FE)
def test_filter_edges_semantics_by_hand(backend, device):
    # nodes 0..4; edges (0,1) (1,2) (2,2) (3,4) (1,2); sample 0 deletes 2 (twice), sample 1 nothing,
    # sample 2 deletes 0 and 4.
    ei, pert, ptr = to(device, torch.tensor([[0, 1, 2, 3, 1], [1, 2, 2, 4, 2]]), torch.tensor([2, 2, 4, 0]),
                       torch.tensor([0, 2, 2, 4]))
    out = filter_edges(ei, 5, pert, ptr, backend=backend)
    # sample 0 keeps 0,1,3,4 -> ranks 0,1,2,3; edges (0,1) (3,4) -> (0,1) (2,3)
    # sample 1 keeps all (offset 4): all 5 edges + 4
    # sample 2 keeps 1,2,3 (offset 9) -> ranks 0,1,2; edges (1,2) (2,2) (1,2) -> (9,10) (10,10) (9,10)
    expected = torch.tensor([[0, 2, 4, 5, 6, 7, 5, 9, 10, 9], [1, 3, 5, 6, 6, 8, 6, 10, 10, 10]])
    assert torch.equal(out.edge_index.cpu(), expected)
    assert out.edge_ptr.tolist() == [0, 2, 7, 10]
    assert out.node_ptr.tolist() == [0, 4, 9, 12]
    assert out.node_keep.view(3, 5).tolist() == [
        [True, True, False, True, True],
        [True] * 5,
        [False, True, True, True, False],
    ]
    full = filter_edges(ei, 5, pert, ptr, relabel=False, backend=backend)
    assert full.edge_index[:, :2].tolist() == [[0, 3], [1, 4]]
    assert full.edge_index[:, 7:].tolist() == [[11, 12, 11], [12, 12, 12]]


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("backend,device", FE)
def test_filter_edges_empty_cases(backend, device, relabel):
    N = 7
    long = dict(dtype=torch.long, device=device)
    run = lambda ei, n, p, q: filter_edges(*to(device, ei, n, p, q), relabel=relabel, backend=backend)  # noqa: E731
    # no edges
    out = run(torch.empty(2, 0, dtype=torch.long), N, torch.tensor([1, 6]), torch.tensor([0, 1, 1, 2]))
    assert out.edge_index.shape == (2, 0) and out.edge_ptr.tolist() == [0, 0, 0, 0]
    assert out.edge_keep.numel() == 0 and out.node_ptr.tolist() == [0, 6, 13, 19]
    assert out.node_keep.view(3, N).tolist() == [[True, False] + [True] * 5, [True] * 7, [True] * 6 + [False]]
    # B = 0
    out = run(random_edge_index(N, 9, 0), N, torch.empty(0, **long), torch.zeros(1, **long))
    assert out.edge_index.shape == (2, 0) and out.edge_ptr.tolist() == [0] and out.node_ptr.tolist() == [0]
    assert out.edge_keep.numel() == 0 and out.node_keep.numel() == 0
    # empty deletion sets keep everything, in wildtype order
    ei = random_edge_index(N, 9, 1)
    out = run(ei, N, torch.empty(0, **long), torch.zeros(3, **long))
    assert torch.equal(out.edge_index.cpu(), torch.cat([ei, ei + N], dim=1))
    assert bool(out.edge_keep.all()) and bool(out.node_keep.all())
    # a sample deleting every node loses every edge; the next one keeps the wildtype
    ei = random_edge_index(6, 20, seed=1)
    out = run(ei, 6, torch.arange(6), torch.tensor([0, 6, 6]))
    assert out.edge_ptr.tolist() == [0, 0, 20] and out.node_ptr.tolist() == [0, 0, 6]
    assert torch.equal(out.edge_index.cpu(), ei if relabel else ei + 6)


@pytest.mark.parametrize("backend,device", FE)
def test_filter_edges_int32_inputs(backend, device):
    N = 20
    ei = random_edge_index(N, 60, 3)
    pert, ptr = random_deletions(N, 4, 3)
    out = filter_edges(*to(device, ei.int(), N, pert.int(), ptr.int()), backend=backend)
    assert_same(out, filter_edges(*to(device, ei, N, pert, ptr), backend=backend), device)
    assert_same(out, brute_filter_edges(ei, N, pert, ptr, True))
    if backend == "triton":  # the Triton operator takes any integer width itself
        raw = kernel_op("filter_edges", backend, device)(*to(device, ei.int(), N, pert.int(), ptr.int(), True))
        assert_same(raw, brute_filter_edges(ei, N, pert, ptr, True), device)


def _with_index_dtypes(op, params, values, interpreted=None):
    """backend_cases over ``values`` x the backend's index dtypes (last argument)."""
    cases = []
    for param in params:
        dtypes = index_dtypes(param.values[0], op)
        for dtype in dtypes:
            marks = dtype.marks if hasattr(dtype, "marks") else ()
            value = dtype.values[0] if hasattr(dtype, "values") else dtype
            for case in backend_cases([param], [(*v, value) for v in values],
                                      None if interpreted is None else [(*v, value) for v in interpreted]):
                cases.append(pytest.param(*case.values, id=case.id, marks=[*case.marks, *marks]))
    return cases


FE_OPCHECK = _with_index_dtypes("filter_edges", FE_KERNELS, [(B, relabel) for B in (0, 1, 4) for relabel in (True, False)],
                                [(B, relabel) for B in (0, 3) for relabel in (True, False)])


@pytest.mark.parametrize("backend,device,B,relabel,index_dtype", FE_OPCHECK)
def test_filter_edges_opcheck(backend, device, B, relabel, index_dtype):
    N = 25
    ei = random_edge_index(N, 120, 5)
    pert, ptr = random_deletions(N, B, seed=B)
    op = kernel_op("filter_edges", backend, device)
    torch.library.opcheck(op, (*to(device, ei.to(index_dtype), N, pert.to(index_dtype), ptr.to(index_dtype)), relabel))
    no_edges = torch.empty(2, 0, dtype=index_dtype)
    torch.library.opcheck(op, (*to(device, no_edges, N, torch.tensor([1], dtype=index_dtype),
                                   torch.tensor([0, 1], dtype=index_dtype)), relabel))


# (num_nodes, num_edges, batch size, max deletions): the CPU kernel's several chunks per sample,
# the GPU's many samples; the interpreter a small graph.
@pytest.mark.parametrize("backend,device,N,E,B,max_size", backend_cases(
    FE_KERNELS, [(300, 200_000, 5, 40), (200, 20_000, 16, 20)], [(30, 500, 3, 5)]))
def test_filter_edges_deterministic_across_runs_and_threads(backend, device, N, E, B, max_size):
    ei = random_edge_index(N, E, 11)
    pert, ptr = random_deletions(N, B, 11, max_size=max_size)
    args = to(device, ei, N, pert, ptr)
    threads = torch.get_num_threads()
    try:
        first = filter_edges(*args, backend=backend)
        again = [filter_edges(*args, backend=backend) for _ in range(2)]
        torch.set_num_threads(1)
        single = filter_edges(*args, backend=backend)
    finally:
        torch.set_num_threads(threads)
    for other in (*again, single):
        assert_same(other, first, device)
    assert_same(first, filter_edges_reference(ei, N, pert, ptr))


@pytest.mark.parametrize("backend,device", FE_KERNELS)
def test_filter_edges_torch_compile_fullgraph(backend, device):
    # The fake kernel's data-dependent E_out lets dynamo trace around the operator.
    ei = random_edge_index(10, 30, 6)
    pert, ptr = random_deletions(10, 2, 6)
    op = kernel_op("filter_edges", backend, device)
    fn = torch.compile(lambda e, p, q: op(e, 10, p, q, True)[0] * 2, backend="aot_eager", fullgraph=True)
    got = fn(*to(device, ei, pert, ptr))
    assert torch.equal(got.cpu(), brute_filter_edges(ei, 10, pert, ptr, True)[0] * 2)


# --------------------------------------------------------------------------- reaction_keep

# (num_genes, num_reactions, GPR pairs, reactions without genes, batch size)
REACTION_KEEP_CASES = [(30, 20, 45, 2, B) for B in (0, 1, 3, 32)] + [(60, 45, 200, 5, B) for B in (0, 1, 9)]


@pytest.mark.parametrize("G,R,E,geneless,B", REACTION_KEEP_CASES)
@pytest.mark.parametrize("backend,device", RK)
def test_reaction_keep_matches_brute_force(backend, device, G, R, E, geneless, B):
    gpr = gpr_graph(G, R, E, geneless, seed=B)
    pert, ptr = random_deletions(G, B, seed=B + 7)
    if B > 0:  # the last sample deletes every gene of reaction 0 (3 and 7), 7 twice
        pert = torch.cat([pert, torch.tensor([7, 3, 7])])
        ptr = ptr.clone()
        ptr[-1] += 3
    out = reaction_keep(*to(device, gpr, R, pert, ptr), backend=backend)
    assert out.device.type == device.type
    assert out.dtype == torch.bool and out.shape == (B, R)
    assert torch.equal(out.cpu(), brute_reaction_keep(gpr, R, pert, ptr))
    assert torch.equal(out.cpu(), reaction_keep_reference(gpr, R, pert, ptr))
    if backend != "reference":
        raw = kernel_op("reaction_keep", backend, device)(*to(device, gpr, R, pert, ptr))
        assert torch.equal(raw.cpu(), torch.ops.stoichconv.reaction_keep(gpr, R, pert, ptr))
    if B > 0:
        assert not bool(out[-1, 0])
        assert bool(out[:, R - geneless:].all())  # no GPR gene: never removed
        removed = gpr[1][torch.isin(gpr[0], torch.tensor([3, 7]))].unique()
        assert not bool(out[-1, removed.to(device)].any())


@pytest.mark.parametrize("backend,device,B,index_dtype", _with_index_dtypes("reaction_keep", RK_KERNELS, [(0,), (1,), (3,), (4,)]))
def test_reaction_keep_opcheck(backend, device, B, index_dtype):
    gpr, pert, ptr = (t.to(index_dtype) for t in (gpr_graph(), *random_deletions(30, B, seed=B + 1)))
    torch.library.opcheck(kernel_op("reaction_keep", backend, device), tuple(to(device, gpr, 20, pert, ptr)))


# --------------------------------------------------------------------------- filter_bipartite


def bipartite_inputs(B, E, masks, Ns=17, Nd=11, seed=None):
    g = torch.Generator().manual_seed(B if seed is None else seed)
    ei = torch.stack([torch.randint(Ns, (E,), generator=g), torch.randint(Nd, (E,), generator=g)])
    sk = torch.rand(B, Ns, generator=g) > 0.2 if masks in ("both", "src") else None
    dk = torch.rand(B, Nd, generator=g) > 0.3 if masks in ("both", "dst") else None
    return ei, Ns, Nd, sk, dk


@pytest.mark.parametrize("masks", ["both", "src", "dst", "none"])
@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("backend,device,B,E", backend_cases(FB, [(0, 80), (1, 80), (3, 80), (32, 80), (5, 3000)],
                                                             [(0, 80), (1, 80), (3, 80)]))
def test_filter_bipartite_matches_brute_force(backend, device, B, E, relabel, masks):
    ei, Ns, Nd, sk, dk = bipartite_inputs(B, E, masks)
    out = filter_bipartite(*to(device, ei, Ns, Nd, B, sk, dk), relabel=relabel, backend=backend)
    want = brute_filter_bipartite(ei, Ns, Nd, B, sk, dk, relabel)
    assert_same(out, want, device)
    assert_same(out, filter_bipartite_reference(ei, Ns, Nd, B, sk, dk, relabel=relabel))
    if backend != "reference":
        raw = kernel_op("filter_bipartite", backend, device)(*to(device, ei, Ns, Nd, B, sk, dk, relabel))
        assert_same(raw, torch.ops.stoichconv.filter_bipartite(ei, Ns, Nd, B, sk, dk, relabel))
    # edge_id points at the wildtype edge of each survivor
    out = [t.cpu() for t in out]
    sample = torch.repeat_interleave(torch.arange(B), out[1].diff())
    assert torch.equal(out[2].view(B, E)[sample, out[3]], torch.ones_like(out[3], dtype=torch.bool))
    if not relabel:
        assert torch.equal(out[0][0], ei[0, out[3]] + sample * Ns)
        assert torch.equal(out[0][1], ei[1, out[3]] + sample * Nd)


@pytest.mark.parametrize("backend,device", FB)
def test_filter_bipartite_empty_edges(backend, device):
    out = filter_bipartite(*to(device, torch.empty(2, 0, dtype=torch.long), 4, 5, 3, None,
                               torch.ones(3, 5, dtype=torch.bool)), backend=backend)
    assert out.edge_index.shape == (2, 0) and out.edge_ptr.tolist() == [0, 0, 0, 0]
    assert out.edge_keep.numel() == 0 and out.edge_id.numel() == 0


@pytest.mark.parametrize("masks", ["both", "dst"])
@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("backend,device,B,index_dtype", _with_index_dtypes(
    "filter_bipartite", FB_KERNELS, [(0,), (1,), (4,)], [(0,), (3,)]))
def test_filter_bipartite_opcheck(backend, device, B, index_dtype, relabel, masks):
    ei, Ns, Nd, sk, dk = bipartite_inputs(B, 60, masks, Ns=25, Nd=9)
    ei = ei.to(index_dtype)
    torch.library.opcheck(kernel_op("filter_bipartite", backend, device),
                          tuple(to(device, ei, Ns, Nd, B, sk, dk, relabel)))


# --------------------------------------------------------------------------- all three ops


@pytest.mark.parametrize("backend,device", ALL3)
def test_torch_compile_traces_the_ops(backend, device):
    # The fake kernels (data-dependent output sizes) let dynamo trace a full graph.
    N = 20
    ei = random_edge_index(N, 100, 9)
    pert, ptr = random_deletions(N, 3, 9)
    ops = {name: kernel_op(name, backend, device) for name in OPS3}

    def pipeline(ei, pert, ptr):
        edges, edge_ptr, edge_keep, node_keep, node_ptr = ops["filter_edges"](ei, N, pert, ptr, True)
        rkeep = ops["reaction_keep"](ei, N, pert, ptr)
        bip = ops["filter_bipartite"](ei, N, N, 3, node_keep.view(3, N), rkeep, True)
        return edges.sum(0), edge_ptr + node_ptr, bip[0].float().mean(), bip[3]

    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    args = to(device, ei, pert, ptr)
    for a, b in zip(compiled(*args), pipeline(*args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
def test_auto_runs_the_device_kernel(device, monkeypatch):
    monkeypatch.delenv("STOICHCONV_BACKEND", raising=False)
    for op in OPS3:
        assert resolve(op, "auto", device) == device.type
    N = 60
    ei = random_edge_index(N, 500, 4)
    pert, ptr = random_deletions(N, 8, 4)
    assert_same(filter_edges(*to(device, ei, N, pert, ptr)), brute_filter_edges(ei, N, pert, ptr, True), device)
    rk = reaction_keep(*to(device, gpr_graph(), 20, pert % 30, ptr))
    assert torch.equal(rk.cpu(), brute_reaction_keep(gpr_graph(), 20, pert % 30, ptr))


def test_triton_backend_unavailable(monkeypatch):
    N = 10
    ei = random_edge_index(N, 20, 0)
    pert, ptr = torch.tensor([1]), torch.tensor([0, 1])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="triton"):
        filter_edges(ei, N, pert, ptr, backend="triton")  # CPU tensors, no TRITON_INTERPRET
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "stoichconv.ops.pert_mask.triton_kernels", None)  # import fails
    with pytest.raises(BackendUnavailableError, match="triton_filter_edges"):
        filter_edges(ei, N, pert, ptr, backend="triton")
    # an op whose table entry lists no Triton kernel
    monkeypatch.setitem(OPS, "reaction_keep", dataclasses.replace(
        OPS["reaction_keep"], backends=tuple(b for b in OPS["reaction_keep"].backends if b != "triton"), triton=None))
    with pytest.raises(BackendUnavailableError, match="reaction_keep has no triton kernel"):
        reaction_keep(gpr_graph(), 20, pert, ptr, backend="triton")


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


def _filter_edges_raw_mutations(backend, device):
    """(arguments, exception, match) of the raw filter_edges bad-input checks of one backend:
    the compiled operators raise RuntimeError from C++ (on a GPU after the sizing sync), the
    Triton operator the Python checks' errors."""
    ei, pert, ptr = random_edge_index(8, 20, seed=2), torch.tensor([3, 1, 3]), torch.tensor([0, 2, 3])
    if backend == "triton":
        return [
            ((ei, 8, pert + 8, ptr, True), ValueError, "`pert`"),
            ((ei, 8, pert, ptr[:-1], True), ValueError, "`pert_ptr`"),
            ((ei, 4, pert.clamp(max=3), ptr, True), ValueError, r"`edge_index\[0\]` has id 7 >= num_nodes = 4"),
            ((ei.float(), 8, pert, ptr, True), TypeError, "`edge_index`"),
            ((ei, -1, pert, ptr, True), ValueError, "`num_nodes`"),
        ]
    if device.type == "cpu":
        return [
            ((torch.tensor([[0], [1]]), 5, torch.tensor([9]), torch.tensor([0, 1]), True), RuntimeError,
             "`pert` has gene id 9"),
            ((torch.tensor([[0], [6]]), 5, torch.tensor([1]), torch.tensor([0, 1]), True), RuntimeError,
             r"`edge_index\[1\]` has id 6"),
        ]
    ei, pert = random_edge_index(10, 30, seed=0), torch.tensor([1, 2])
    return [  # the CPU kernel's texts (see test_bad_values_give_the_cpu_kernel_error_on_every_backend)
        ((ei, 10, pert, torch.tensor([0, 1, 1]), True), RuntimeError, "`pert_ptr` must start at 0"),
        ((ei, 10, torch.tensor([1, 12]), torch.tensor([0, 2]), True), RuntimeError,
         r"`pert` has gene id 12 outside \[0, num_nodes = 10\)"),
        ((torch.tensor([[0, 7], [1, 2]]), 5, pert, torch.tensor([0, 2]), True), RuntimeError,
         r"`edge_index\[0\]` has id 7 outside \[0, 5\)"),
    ]


@pytest.mark.parametrize("backend,device", FE_KERNELS)
def test_filter_edges_raw_op_rejects_bad_input(backend, device):
    # A direct torch.ops call never reads out of bounds: the operator checks too.
    op = kernel_op("filter_edges", backend, device)
    for args, error, match in _filter_edges_raw_mutations(backend, device):
        with pytest.raises(error, match=match):
            op(*to(device, *args))


@pytest.mark.parametrize("backend,device", COMPILED)
def test_reaction_keep_and_bipartite_raw_ops_reject_bad_input(backend, device):
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="`pert_ptr` must end at len"):
            kernel_op("reaction_keep", backend, device)(torch.tensor([[0], [1]]), 3, torch.tensor([1]),
                                                        torch.tensor([0, 0]))
    else:
        bad_dst = torch.tensor([[0, 1], [0, 3]], device=device)  # 3 >= num_dst = 2
        with pytest.raises(RuntimeError, match=r"filter_bipartite: `edge_index\[1\]` has id 3 outside \[0, 2\)"):
            kernel_op("filter_bipartite", backend, device)(bad_dst, 10, 2, 1, None, None, True)


# --------------------------------------------------------------------------- same error everywhere (finding 2)


def unvalidated_op(op, backend, device):
    """The raw operator of ``backend`` with no Python value check: the compiled one, or the
    Triton one with ``validate=False`` (its device-side checks)."""
    fn = kernel_op(op, backend, device)
    return (lambda *args: fn(*args, False)) if backend == "triton" else fn


def cpu_kernel_error(op, *args):
    """The text of the compiled CPU kernel's error for ``args`` (CPU tensors)."""
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.stoichconv, op)(*args)
    return str(info.value)


def _edges_with(ei, *changes):
    ei = ei.clone()
    for row, col, value in changes:
        ei[row, col] = value
    return ei


_FE_EI = random_edge_index(8, 20, seed=2)
_FE_PERT, _FE_PTR = torch.tensor([3, 1, 3, 5]), torch.tensor([0, 2, 3, 4])
# (id, edge_index, pert, pert_ptr, the argument the error names, its exact CPU text or None)
FILTER_EDGES_BAD = [
    ("ptr-decreasing", _FE_EI, _FE_PERT, torch.tensor([0, 3, 1, 4]), "`pert_ptr`",
     "filter_edges: `pert_ptr` must be non-decreasing"),  # overlapping per-sample ranges
    ("ptr-start", _FE_EI, _FE_PERT, torch.tensor([1, 2, 3, 4]), "`pert_ptr`",
     "filter_edges: `pert_ptr` must start at 0, got 1"),
    ("ptr-end-short", _FE_EI, _FE_PERT, torch.tensor([0, 2, 3, 3]), "`pert_ptr`",
     "filter_edges: `pert_ptr` must end at len(pert) = 4, got 3"),
    ("ptr-end-beyond", _FE_EI, _FE_PERT, torch.tensor([0, 2, 3, 9]), "`pert_ptr`", None),
    ("id-too-large", _FE_EI, torch.tensor([3, 1, 8, 5]), _FE_PTR, "`pert`",
     "filter_edges: `pert` has gene id 8 outside [0, num_nodes = 8)"),
    ("id-negative", _FE_EI, torch.tensor([3, -1, 3, -4]), _FE_PTR, "`pert`",
     "filter_edges: `pert` has gene id -1 outside [0, num_nodes = 8)"),  # the first bad one
    ("src", _edges_with(_FE_EI, (0, 4, 8)), _FE_PERT, _FE_PTR, "`edge_index[0]`",
     "filter_edges: `edge_index[0]` has id 8 outside [0, 8)"),
    ("dst-negative", _edges_with(_FE_EI, (1, 2, -3)), _FE_PERT, _FE_PTR, "`edge_index[1]`",
     "filter_edges: `edge_index[1]` has id -3 outside [0, 8)"),
    ("first-bad-column", _edges_with(_FE_EI, (1, 2, 9), (0, 6, -1)), _FE_PERT, _FE_PTR, "`edge_index[1]`",
     "filter_edges: `edge_index[1]` has id 9 outside [0, 8)"),
    ("edges-before-pert", _edges_with(_FE_EI, (0, 11, 12)), torch.tensor([3, 1, 30, 5]), _FE_PTR,
     "`edge_index[0]`", None),
    ("no-samples", _edges_with(_FE_EI, (0, 0, 8)), torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
     "`edge_index[0]`", None),  # B = 0: the edges are still checked
]


@pytest.mark.parametrize("case", FILTER_EDGES_BAD, ids=[c[0] for c in FILTER_EDGES_BAD])
@pytest.mark.parametrize("backend,device", FE_KERNELS)
def test_filter_edges_bad_values_give_the_cpu_kernel_error_on_every_backend(backend, device, case):
    # A raw operator (or validate=False) never answers bad input: every backend raises the
    # compiled CPU kernel's RuntimeError, word for word, naming the argument.
    _, ei, pert, ptr, argument, text = case
    expected = cpu_kernel_error("filter_edges", ei, 8, pert, ptr, True)
    assert argument in expected and expected.startswith("filter_edges: ")
    if text is not None:
        assert expected == text
    for relabel in (True, False):
        with pytest.raises(RuntimeError) as info:
            unvalidated_op("filter_edges", backend, device)(*to(device, ei, 8, pert, ptr, relabel))
        assert str(info.value) == expected
    with pytest.raises(RuntimeError) as info:
        filter_edges(*to(device, ei, 8, pert, ptr), backend=backend, validate=False)
    assert str(info.value) == expected
    with pytest.raises(ValueError, match="^`(edge_index|pert|pert_ptr)"):  # validated: the Python checks
        filter_edges(*to(device, ei, 8, pert, ptr), backend=backend)


_RK_GPR = gpr_graph()  # 30 genes, 20 reactions
_RK_PERT, _RK_PTR = torch.tensor([3, 7, 2]), torch.tensor([0, 2, 3])
REACTION_KEEP_BAD = [
    ("ptr-decreasing", _RK_GPR, _RK_PERT, torch.tensor([0, 3, 2, 3]), "`pert_ptr`",
     "reaction_keep: `pert_ptr` must be non-decreasing"),
    ("ptr-end", _RK_GPR, _RK_PERT, torch.tensor([0, 2, 2]), "`pert_ptr`",
     "reaction_keep: `pert_ptr` must end at len(pert) = 3, got 2"),
    ("id-negative", _RK_GPR, torch.tensor([3, -2, 2]), _RK_PTR, "`pert`", "reaction_keep: `pert` has gene id -2 < 0"),
    ("gene-negative", _edges_with(_RK_GPR, (0, 5, -1)), _RK_PERT, _RK_PTR, "`gpr_index[0]`",
     "reaction_keep: `gpr_index[0]` has id -1 < 0"),
    ("reaction-too-large", _edges_with(_RK_GPR, (1, 3, 20)), _RK_PERT, _RK_PTR, "`gpr_index[1]`",
     "reaction_keep: `gpr_index[1]` has id 20 outside [0, 20)"),
]


@pytest.mark.parametrize("case", REACTION_KEEP_BAD, ids=[c[0] for c in REACTION_KEEP_BAD])
@pytest.mark.parametrize("backend,device", RK_KERNELS)
def test_reaction_keep_bad_values_give_the_cpu_kernel_error_on_every_backend(backend, device, case):
    _, gpr, pert, ptr, argument, text = case
    expected = cpu_kernel_error("reaction_keep", gpr, 20, pert, ptr)
    assert argument in expected and expected == text
    with pytest.raises(RuntimeError) as info:
        unvalidated_op("reaction_keep", backend, device)(*to(device, gpr, 20, pert, ptr))
    assert str(info.value) == expected
    with pytest.raises(RuntimeError) as info:
        reaction_keep(*to(device, gpr, 20, pert, ptr), backend=backend, validate=False)
    assert str(info.value) == expected


@pytest.mark.parametrize("backend,device", RK_KERNELS)
def test_reaction_keep_gene_ids_have_no_upper_bound(backend, device):
    # reaction_keep has no gene count: huge gene ids are valid on every backend (and match nothing).
    gpr = _edges_with(_RK_GPR, (0, 0, 2**40))
    pert, ptr = torch.tensor([3, 2**40, 7, 2**62]), torch.tensor([0, 3, 4])
    want = brute_reaction_keep(gpr, 20, pert, ptr)
    assert not bool(want.all())
    assert torch.equal(torch.ops.stoichconv.reaction_keep(gpr, 20, pert, ptr), want)
    assert torch.equal(unvalidated_op("reaction_keep", backend, device)(*to(device, gpr, 20, pert, ptr)).cpu(), want)


_FB_EI = bipartite_inputs(3, 40, "both")[0]  # ids in [0, 17) x [0, 11)
FILTER_BIPARTITE_BAD = [
    ("src", _edges_with(_FB_EI, (0, 7, 17)), 3, "filter_bipartite: `edge_index[0]` has id 17 outside [0, 17)"),
    ("dst-negative", _edges_with(_FB_EI, (1, 2, -1), (0, 9, 20)), 3,
     "filter_bipartite: `edge_index[1]` has id -1 outside [0, 11)"),
    ("no-samples", _edges_with(_FB_EI, (1, 30, 11)), 0, "filter_bipartite: `edge_index[1]` has id 11 outside [0, 11)"),
]


@pytest.mark.parametrize("case", FILTER_BIPARTITE_BAD, ids=[c[0] for c in FILTER_BIPARTITE_BAD])
@pytest.mark.parametrize("backend,device", FB_KERNELS)
def test_filter_bipartite_bad_values_give_the_cpu_kernel_error_on_every_backend(backend, device, case):
    _, ei, B, text = case
    sk, dk = torch.ones(B, 17, dtype=torch.bool), torch.ones(B, 11, dtype=torch.bool)
    for masks in ((sk, dk), (None, None)):
        expected = cpu_kernel_error("filter_bipartite", ei, 17, 11, B, *masks, True)
        assert expected == text
        with pytest.raises(RuntimeError) as info:
            unvalidated_op("filter_bipartite", backend, device)(*to(device, ei, 17, 11, B, *masks, True))
        assert str(info.value) == expected


# --------------------------------------------------------------------------- large deletion sets (finding 4)


def large_deletions(N, seed=0):
    """Deletion sets around and beyond the 32 ids the kernels sort by insertion: empty, 32
    distinct (the last small set), 33 ids of 20 distinct (the first large one, with repeats),
    every node twice in descending order, 45 drawn with replacement, 3 ids; shuffled."""
    g = torch.Generator().manual_seed(seed)
    distinct20 = torch.randperm(N, generator=g)[:20]
    sets = [
        torch.empty(0, dtype=torch.long),
        torch.randperm(N, generator=g)[:32],
        torch.cat([distinct20, distinct20[:13]])[torch.randperm(33, generator=g)],
        torch.arange(N - 1, -1, -1).repeat_interleave(2),
        torch.randint(N, (45,), generator=g),
        torch.randperm(N, generator=g)[:3],
    ]
    ptr = torch.tensor([0] + [len(s) for s in sets]).cumsum(0)
    return torch.cat(sets), ptr


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("backend,device", FE)
def test_filter_edges_large_deletion_sets(backend, device, relabel):
    N = 60
    ei = random_edge_index(N, 300, seed=8)
    pert, ptr = large_deletions(N, seed=1)
    want = brute_filter_edges(ei, N, pert, ptr, relabel)
    kept = want[4].diff().tolist()
    assert kept == [60, 28, 40, 0, N - len(set(pert[ptr[4]:ptr[5]].tolist())), 57]
    assert_same(filter_edges(*to(device, ei, N, pert, ptr), relabel=relabel, backend=backend), want, device)
    if backend != "reference":
        raw = unvalidated_op("filter_edges", backend, device)(*to(device, ei, N, pert, ptr, relabel))
        assert_same(raw, want, device)


@pytest.mark.parametrize("isa", ["auto", "default"])  # AVX2 write pass where the CPU has it; portable one
@pytest.mark.parametrize("relabel", [True, False])
def test_filter_edges_cpu_isa_variants_around_the_padded_deletion_sets(relabel, isa, monkeypatch):
    # The CPU write pass ranks a sample of at most 4 distinct deletions by compares against its
    # padded set and any other through a table: sets of 0, 1, 4 and 5 distinct ids (one of them
    # with repeats), the first and last node, in one batch; edges in runs across chunks of 2^14.
    monkeypatch.setenv("STOICHCONV_CPU_ISA", isa)
    N = 40
    ei = random_edge_index(N, 40000, seed=5)
    sets = [[], [17], [0, 39, 12, 5], [3, 3, 8, 21, 30, 8, 1], [9, 9, 9, 9, 9, 2], [39, 38, 37, 36, 35]]
    pert = torch.tensor([v for s in sets for v in s], dtype=torch.long)
    ptr = torch.tensor([0] + [len(s) for s in sets]).cumsum(0)
    want = brute_filter_edges(ei, N, pert, ptr, relabel)
    assert want[4].diff().tolist() == [N, N - 1, N - 4, N - 5, N - 2, N - 5]
    assert_same(filter_edges(ei, N, pert, ptr, relabel=relabel, backend="cpu"), want)


@pytest.mark.parametrize("backend,device", RK)
def test_reaction_keep_large_deletion_sets(backend, device):
    gpr = gpr_graph(60, 45, 200, 5, seed=3)
    pert, ptr = large_deletions(60, seed=2)
    want = brute_reaction_keep(gpr, 45, pert, ptr)
    with_genes = gpr[1].unique()
    assert bool(want[0].all()) and not bool(want[3, with_genes].any())  # nothing / every gene deleted
    assert int(want[3].sum()) == 45 - with_genes.numel()
    got = reaction_keep(*to(device, gpr, 45, pert, ptr), backend=backend)
    assert torch.equal(got.cpu(), want)


# --------------------------------------------------------------------------- validate=False (finding 5)


@pytest.fixture
def value_check_calls(monkeypatch):
    """Records every call of the Python value checks (the ones that host-sync on a GPU)."""
    import stoichconv.ops.pert_mask.validation as validation

    calls = []
    for name in ("check_perturbation_values", "check_edge_index_values"):
        def spy(*args, _real=getattr(validation, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(validation, name, spy)
    return calls


@pytest.mark.parametrize("backend,device", FE_KERNELS)
def test_filter_edges_unvalidated_runs_no_python_value_check(backend, device, value_check_calls):
    N = 12
    ei = random_edge_index(N, 300, seed=3)
    pert, ptr = random_deletions(N, 3, seed=3)
    want = brute_filter_edges(ei, N, pert, ptr, True)
    assert_same(filter_edges(*to(device, ei, N, pert, ptr), backend=backend, validate=False), want, device)
    assert_same(unvalidated_op("filter_edges", backend, device)(*to(device, ei, N, pert, ptr, True)), want, device)
    assert value_check_calls == []
    # validate=True checks once (the public function; the operator does not repeat it) ...
    assert_same(filter_edges(*to(device, ei, N, pert, ptr), backend=backend), want, device)
    assert value_check_calls == ["check_perturbation_values", "check_edge_index_values"]
    # ... and still refuses bad values in Python; unvalidated, the kernel refuses them
    bad = pert.clone()
    bad[0] = N
    with pytest.raises(ValueError, match=r"`pert` has gene id 12 outside \[0, num_nodes=12\)"):
        filter_edges(*to(device, ei, N, bad, ptr), backend=backend)
    del value_check_calls[:]
    with pytest.raises(RuntimeError, match=r"filter_edges: `pert` has gene id 12 outside \[0, num_nodes = 12\)"):
        filter_edges(*to(device, ei, N, bad, ptr), backend=backend, validate=False)
    assert value_check_calls == []


CUDA_KERNELS = [p for p in ALL3 if p.values[1].type == "cuda"]  # cuda and triton on CUDA tensors


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_unvalidated_ops_make_one_host_sync_on_cuda(backend, device):
    # validate=False: no Python value check; the only host sync is the one read of the output
    # size and the device-side checks (reaction_keep: the checks alone).
    N = 40
    ei = random_edge_index(N, 500, seed=4)
    pert, ptr = large_deletions(N, seed=4)
    gpr, ei_d, pert_d, ptr_d = to(device, gpr_graph(N, 20, 60, 2, seed=4), ei, pert, ptr)
    B = ptr.numel() - 1
    keep = torch.rand(B, N, generator=torch.Generator().manual_seed(4)) > 0.3
    calls = {
        "filter_edges": lambda validate: filter_edges(ei_d, N, pert_d, ptr_d, backend=backend, validate=validate),
        "reaction_keep": lambda validate: reaction_keep(gpr, 20, pert_d, ptr_d, backend=backend, validate=validate),
        "filter_bipartite": lambda validate: filter_bipartite(ei_d, N, N, B, keep.to(device), None, backend=backend,
                                                              validate=validate),
    }
    for name, call in calls.items():
        call(False)  # warm-up (Triton compiles)
        torch.cuda.synchronize()
        with CudaSyncCounter() as unvalidated:
            call(False)
        assert unvalidated.count == 1, (name, [str(w.message) for w in unvalidated.caught])
        with CudaSyncCounter() as validated:
            call(True)
        assert validated.count > 1, name  # the Python checks' syncs: what validate=False saves
    with CudaSyncCounter() as unvalidated:
        got = filter_edges(ei_d, N, pert_d, ptr_d, backend=backend, validate=False)
    assert_same(got, brute_filter_edges(ei, N, pert, ptr, True), device)
    assert unvalidated.count == 1


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.slow
@pytest.mark.parametrize("device", CUDA)
def test_cell_graph_batch_matches_cpu(device):
    from stoichconv.data import load_cell_graph, random_perturbations
    from stoichconv.data.relations import GPR, METABOLISM, PHYSICAL, REGULATORY

    g = load_cell_graph()
    num_genes = g["gene"].num_nodes
    pert, pert_ptr = random_perturbations(num_genes, 32, seed=1)
    for rel in (PHYSICAL, REGULATORY):
        ei = g[rel].edge_index
        for relabel in (True, False):
            want = torch.ops.stoichconv.filter_edges(ei, num_genes, pert, pert_ptr, relabel)
            got = torch.ops.stoichconv.filter_edges(*to(device, ei, num_genes, pert, pert_ptr, relabel))
            assert_same(got, want, device)
    gpr = g[GPR].edge_index
    R = g["reaction"].num_nodes
    keep = torch.ops.stoichconv.reaction_keep(*to(device, gpr, R, pert, pert_ptr))
    assert_same((keep,), (torch.ops.stoichconv.reaction_keep(gpr, R, pert, pert_ptr),), device)
    inc = g[METABOLISM].hyperedge_index
    M = g["metabolite"].num_nodes
    want = torch.ops.stoichconv.filter_bipartite(inc, M, R, 32, None, keep.cpu(), True)
    got = torch.ops.stoichconv.filter_bipartite(*to(device, inc, M, R, 32, None, keep, True))
    assert_same(got, want, device)


@pytest.mark.parametrize("device", CUDA)
def test_raw_ops_reject_device_mismatch(device):
    edge_index = random_edge_index(10, 30, seed=0)
    pert, pert_ptr = torch.tensor([1, 2]), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="`edge_index` must be a CUDA tensor, got cpu"):
        torch.ops.stoichconv.filter_edges(edge_index, 10, pert.to(device), pert_ptr.to(device), True)
    with pytest.raises(RuntimeError, match="`pert_ptr` must be a CUDA tensor, got cpu"):
        torch.ops.stoichconv.reaction_keep(edge_index.to(device), 10, pert.to(device), pert_ptr)
    with pytest.raises(RuntimeError, match="`src_keep` is on cpu"):
        torch.ops.stoichconv.filter_bipartite(edge_index.to(device), 10, 10, 1, torch.ones(1, 10, dtype=torch.bool),
                                              None, True)


@pytest.mark.parametrize("device", CUDA)
def test_wrappers_reject_device_mismatch(device):
    edge_index = random_edge_index(10, 30, seed=0)
    pert, pert_ptr = torch.tensor([1, 2], device=device), torch.tensor([0, 2], device=device)
    with pytest.raises(ValueError, match="`edge_index` is on cpu"):
        filter_edges(edge_index, 10, pert, pert_ptr)
    with pytest.raises(ValueError, match="`pert_ptr` is on cpu"):
        reaction_keep(edge_index.to(device), 10, pert, pert_ptr.cpu())
    with pytest.raises(BackendUnavailableError):
        filter_edges(edge_index.to(device), 10, pert, pert_ptr, backend="cpu")
