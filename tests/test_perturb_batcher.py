"""PerturbBatcher (perturb_batch into reused memory), the out= variants of the pert-mask ops
and the DataLoader collate: every result against perturb_batch / the normal ops and the
per-sample PyG reference, on fresh random inputs."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from stoichconv.data.relations import GPR, METABOLISM, NODE_TYPES, PHYSICAL, REGULATORY
from stoichconv.ops.pert_mask import (
    allocate_bipartite_out,
    allocate_filter_edges_out,
    filter_bipartite,
    filter_edges,
    reaction_keep,
)
from stoichconv.perturb import PerturbationBatches, PerturbationCollate, PerturbBatcher, perturb_batch
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.testing import (
    backend_params,
    is_interpreted,
    kernel_op,
    random_cell_graph,
    random_deletions,
    random_edge_index,
)

from test_perturb import assert_batches_equal, assert_full_layout

BACKENDS = backend_params("filter_edges", reference=True)
NUM_GENES, NUM_REACTIONS = 40, 25  # random_cell_graph's defaults


def _deletions(B: int, seed: int):
    """The toolkit's deletions (repeats, empty sets) plus repeated ids in the last sample."""
    pert, ptr = random_deletions(NUM_GENES, B, seed)
    if B > 0:
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randint(0, NUM_GENES, (3,), generator=gen).repeat(2)
        pert = torch.cat([pert, extra])
        ptr = ptr.clone()
        ptr[-1] += extra.numel()
    return pert, ptr


# --------------------------------------------------------------------------- the batcher


@pytest.mark.parametrize("layout", ["compacted", "full"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batcher_equals_perturb_batch_and_reference(backend, device, layout):
    graph = random_cell_graph(7).to(device)
    max_batch = 6
    batcher = PerturbBatcher(graph, layout=layout, max_batch=max_batch, backend=backend, ring=2)
    sizes = [1, 0, max_batch, 3, max_batch, 1] if not is_interpreted(backend, device) else [1, 0, max_batch]
    for call, B in enumerate(sizes):
        pert, ptr = _deletions(B, seed=100 + call)
        out = batcher(pert.to(device), ptr.to(device))
        expected = perturb_batch(graph, pert.to(device), ptr.to(device), layout=layout, backend=backend)
        assert_batches_equal(out, expected)
        assert out[PHYSICAL].edge_index.is_contiguous()
        if B > 0:  # the reference cannot collate an empty batch
            ref = perturb_batch_reference(graph.cpu(), pert, ptr)
            if layout == "compacted":
                assert_batches_equal(out.cpu(), ref)
            else:
                assert_full_layout(out.cpu(), ref, graph.cpu())


@pytest.mark.parametrize("layout", ["compacted", "full"])
def test_batcher_large_deletion_sets(layout):
    """Sets beyond the insertion-sort size (the merge-sort path), with repeats, next to empty ones."""
    graph = random_cell_graph(14)
    gen = torch.Generator().manual_seed(14)
    big = torch.randint(0, NUM_GENES, (45,), generator=gen)  # > 32 ids, many repeats
    pert = torch.cat([big, torch.tensor([3, 3]), torch.randperm(NUM_GENES, generator=gen)])
    ptr = torch.tensor([0, 45, 45, 47, 47 + NUM_GENES])  # the last sample deletes every gene
    batcher = PerturbBatcher(graph, layout=layout, max_batch=4, backend="cpu")
    out = batcher(pert, ptr)
    assert_batches_equal(out, perturb_batch(graph, pert, ptr, layout=layout))
    assert out["gene"].ptr[-1] - out["gene"].ptr[-2] == (NUM_GENES if layout == "full" else 0)
    ref = perturb_batch_reference(graph, pert, ptr)
    if layout == "compacted":
        assert_batches_equal(out, ref)
    else:
        assert_full_layout(out, ref, graph)


def test_batcher_writes_into_its_ring():
    """The outputs are views of the slot buffers, reused every `ring` calls; a batch stays valid
    for exactly ring - 1 further calls and is overwritten by the ring-th."""
    graph = random_cell_graph(8)
    batcher = PerturbBatcher(graph, max_batch=4, ring=2, backend="cpu")
    batches, copies, ptrs = [], [], []
    for call in range(5):
        pert, ptr = _deletions(4, seed=call)
        batch = batcher(pert, ptr)
        batches.append(batch)
        copies.append(batch.clone())
        ptrs.append(batch[PHYSICAL].edge_index.data_ptr())
        assert batcher.is_valid(batch)
        if call >= 1:
            assert batcher.is_valid(batches[call - 1])  # one further call: still valid, intact
            assert_batches_equal(batches[call - 1], copies[call - 1])
        if call >= 2:
            assert not batcher.is_valid(batches[call - 2])  # ring further calls: overwritten
            assert ptrs[call] == ptrs[call - 2]  # same slot, same memory
            assert ptrs[call] != ptrs[call - 1]
    assert not batcher.is_valid(perturb_batch(graph, *_deletions(4, seed=0)))
    # different deletions in the reused slot really changed the memory of the old batch
    assert not all(torch.equal(a, b) for a, b in zip(
        (batches[0][PHYSICAL].edge_keep,), (copies[0][PHYSICAL].edge_keep,)))


def test_batcher_ring_one_and_errors():
    graph = random_cell_graph(9)
    batcher = PerturbBatcher(graph, max_batch=3, ring=1, backend="cpu")
    a = batcher(*_deletions(2, 0))
    with pytest.raises(ValueError, match=r"B = 4 samples but this PerturbBatcher was built for max_batch = 3"):
        batcher(*_deletions(4, 1))
    assert batcher.is_valid(a)  # a refused call writes nothing and does not advance the ring
    with pytest.raises(ValueError, match=r"`pert` has gene id 40 outside \[0, num_nodes=40\)"):
        batcher(torch.tensor([40]), torch.tensor([0, 1]))
    assert batcher.is_valid(a)
    b = batcher(*_deletions(3, 2))
    assert batcher.is_valid(b) and not batcher.is_valid(a)
    # without the Python value checks the kernel refuses, after the call started on the slot
    unchecked = PerturbBatcher(graph, max_batch=3, ring=1, backend="cpu", validate=False)
    c = unchecked(*_deletions(2, 3))
    with pytest.raises(RuntimeError, match=r"`pert` has gene id 40 outside \[0, num_nodes = 40\)"):
        unchecked(torch.tensor([40]), torch.tensor([0, 1]))
    assert not unchecked.is_valid(c)
    with pytest.raises(ValueError, match="`ring` must be >= 1"):
        PerturbBatcher(graph, ring=0)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        PerturbBatcher(graph, layout="dense")
    with pytest.raises(TypeError, match="`max_batch` must be an int"):
        PerturbBatcher(graph, max_batch=2.0)
    with pytest.raises(TypeError, match="`cell_graph` must be a torch_geometric HeteroData"):
        PerturbBatcher({"gene": None})


def test_batcher_max_batch_zero():
    graph = random_cell_graph(10)
    batcher = PerturbBatcher(graph, max_batch=0, backend="cpu")
    out = batcher(torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert out.num_samples == 0 and out[PHYSICAL].edge_index.shape == (2, 0)


@pytest.mark.parametrize("layout", ["compacted", "full"])
def test_batcher_pickle_round_trip(layout):
    graph = random_cell_graph(11)
    batcher = PerturbBatcher(graph, layout=layout, max_batch=5, backend="cpu")
    pert, ptr = _deletions(5, 3)
    first = batcher(pert, ptr)
    assert batcher.nbytes > 0
    blob = pickle.dumps(batcher)
    assert len(blob) < batcher.nbytes  # the buffers are not pickled
    clone = pickle.loads(blob)
    assert clone.nbytes == 0 and not clone.is_valid(first)  # rebuilt lazily
    assert_batches_equal(clone(pert, ptr), perturb_batch(graph, pert, ptr, layout=layout))
    assert clone.nbytes == batcher.nbytes


# --------------------------------------------------------------------------- DataLoader


class _DeletionSets(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.sets = [torch.randint(0, NUM_GENES, (int(k),), generator=gen)
                     for k in torch.randint(0, 4, (n,), generator=gen)]

    def __len__(self):
        return len(self.sets)

    def __getitem__(self, i):
        return self.sets[i]


def _csr(sets):
    sizes = torch.tensor([s.numel() for s in sets], dtype=torch.long)
    return torch.cat(sets), torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader(num_workers):
    graph = random_cell_graph(12)
    dataset = _DeletionSets(11, seed=num_workers)
    batcher = PerturbBatcher(graph, max_batch=4, backend="cpu")
    loader = DataLoader(dataset, batch_size=4, collate_fn=PerturbationCollate(batcher), num_workers=num_workers)
    received = []
    for i, batch in enumerate(loader):
        sets = dataset.sets[4 * i: 4 * i + 4]
        expected = perturb_batch(graph, *_csr(sets))
        assert_batches_equal(batch, expected)
        assert batcher.is_valid(batch) == (num_workers == 0)
        received.append((batch, expected))
    assert len(received) == 3
    if num_workers > 0:  # the workers' batches are copies: all still intact
        for batch, expected in received:
            assert_batches_equal(batch, expected)
            assert batch[PHYSICAL].edge_index.is_shared()
    assert batcher.nbytes > 0 if num_workers == 0 else batcher.nbytes == 0  # workers own their rings


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterable_dataset(num_workers):
    graph = random_cell_graph(15)
    dataset = _DeletionSets(10, seed=20 + num_workers)
    batcher = PerturbBatcher(graph, layout="full", max_batch=3, backend="cpu")
    batches = PerturbationBatches(batcher, dataset.sets, batch_size=3)
    assert len(batches) == 4
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers)
    received = list(loader) if num_workers else None
    for i, batch in enumerate(received if num_workers else loader):
        sets = dataset.sets[3 * i: 3 * i + 3]
        assert_batches_equal(batch, perturb_batch(graph, *_csr(sets), layout="full"))
    assert i == 3
    with pytest.raises(ValueError, match=r"`batch_size` must be in \[1, batcher.max_batch = 3\], got 4"):
        PerturbationBatches(batcher, dataset.sets, batch_size=4)


def test_collate_lists_of_ints():
    graph = random_cell_graph(13)
    collate = PerturbationCollate(PerturbBatcher(graph, max_batch=3, backend="cpu"))
    out = collate([[1, 2], [], [5, 5]])
    assert_batches_equal(out, perturb_batch(graph, torch.tensor([1, 2, 5, 5]), torch.tensor([0, 2, 2, 4])))
    with pytest.raises(TypeError, match="`batcher` must be a PerturbBatcher"):
        PerturbationCollate(graph)


# --------------------------------------------------------------------------- out= variants


OPS = ("filter_edges", "reaction_keep", "filter_bipartite")


def _op_inputs(device, B=5, seed=0, E=60, N=NUM_GENES, R=NUM_REACTIONS):
    edge_index = random_edge_index(N, E, seed=seed).to(device)
    pert, ptr = _deletions(B, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    gpr = torch.stack([torch.randint(0, N, (E,), generator=gen), torch.randint(0, R, (E,), generator=gen)]).to(device)
    src_keep = (torch.rand(B, N, generator=gen) > 0.2).to(device)
    dst_keep = (torch.rand(B, R, generator=gen) > 0.3).to(device)
    return edge_index, gpr, pert.to(device), ptr.to(device), src_keep, dst_keep


def _padded_filter_edges_out(B, E, N, device, pad=7):
    """Buffers larger than needed, holding garbage: the op must not depend on their contents."""
    out = allocate_filter_edges_out(B, E, N, device)
    return type(out)(*(torch.full((t.numel() + pad,), 1, dtype=t.dtype, device=device) for t in out))


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_variants_equal_the_ops(backend, device, B, relabel):
    edge_index, gpr, pert, ptr, src_keep, dst_keep = _op_inputs(device, B=B, seed=B)
    E = edge_index.size(1)
    out = _padded_filter_edges_out(B, E, NUM_GENES, device)
    got = filter_edges(edge_index, NUM_GENES, pert, ptr, relabel=relabel, backend=backend, out=out)
    want = filter_edges(edge_index, NUM_GENES, pert, ptr, relabel=relabel, backend=backend)
    for g, w, buf in zip(got, want, out):
        assert g.shape == w.shape and torch.equal(g, w)
        assert g.numel() == 0 or g.data_ptr() == buf.data_ptr()  # a view of the caller's buffer
    rk_buf = torch.ones(B * NUM_REACTIONS + 3, dtype=torch.bool, device=device)
    got = reaction_keep(gpr, NUM_REACTIONS, pert, ptr, backend=backend, out=rk_buf)
    assert torch.equal(got, reaction_keep(gpr, NUM_REACTIONS, pert, ptr, backend=backend))
    assert got.numel() == 0 or got.data_ptr() == rk_buf.data_ptr()
    for sk, dk in ((src_keep, dst_keep), (None, dst_keep), (src_keep, None)):
        buffers = allocate_bipartite_out(B, gpr.size(1), device)
        got = filter_bipartite(gpr, NUM_GENES, NUM_REACTIONS, B, sk, dk, relabel=relabel, backend=backend,
                               out=buffers)
        want = filter_bipartite(gpr, NUM_GENES, NUM_REACTIONS, B, sk, dk, relabel=relabel, backend=backend)
        for g, w, buf in zip(got, want, buffers):
            assert g.shape == w.shape and torch.equal(g, w)
            assert g.numel() == 0 or g.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_buffer_errors(backend, device):
    edge_index, gpr, pert, ptr, src_keep, dst_keep = _op_inputs(device)
    B, E, N = 5, edge_index.size(1), NUM_GENES
    good = allocate_filter_edges_out(B, E, N, device)

    def call(**changes):
        return filter_edges(edge_index, N, pert, ptr, backend=backend, out=good._replace(**changes))

    with pytest.raises(ValueError, match=r"`out.edge_index` holds 599 elements but needs at least 600 \(2 \* B \* E\)"):
        call(edge_index=torch.empty(599, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="`out.edge_keep` must have dtype torch.bool, got torch.uint8"):
        call(edge_keep=torch.empty(B * E, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="`out.node_ptr` must be contiguous"):
        call(node_ptr=torch.empty(2 * (B + 1), dtype=torch.long, device=device)[::2])
    with pytest.raises(ValueError, match=r"`out.node_keep` holds 199 elements but needs at least 200 \(B \* num_nodes\)"):
        call(node_keep=torch.empty(B * N - 1, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="`out.edge_ptr` is on meta but the inputs are on"):
        call(edge_ptr=torch.empty(B + 1, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match="`out` must be a FilteredEdges of buffers"):
        filter_edges(edge_index, N, pert, ptr, backend=backend, out=list(good))
    with pytest.raises(ValueError, match=r"`out` holds 124 elements but needs at least 125 \(B \* num_reactions\)"):
        reaction_keep(gpr, NUM_REACTIONS, pert, ptr, backend=backend,
                      out=torch.empty(B * NUM_REACTIONS - 1, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="`out` must have dtype torch.bool, got torch.int64"):
        reaction_keep(gpr, NUM_REACTIONS, pert, ptr, backend=backend,
                      out=torch.empty(B * NUM_REACTIONS, dtype=torch.long, device=device))
    bip = allocate_bipartite_out(B, gpr.size(1), device)
    with pytest.raises(ValueError, match=r"`out.edge_id` holds 299 elements but needs at least 300 \(B \* E\)"):
        filter_bipartite(gpr, N, NUM_REACTIONS, B, src_keep, dst_keep, backend=backend,
                         out=bip._replace(edge_id=torch.empty(B * gpr.size(1) - 1, dtype=torch.long, device=device)))


def test_compiled_out_ops_check_their_buffers():
    """The raw torch.ops out variants name the buffer too (callers that skip the wrappers)."""
    edge_index, gpr, pert, ptr, _, dst_keep = _op_inputs("cpu")
    B, E, N = 5, edge_index.size(1), NUM_GENES
    out = list(allocate_filter_edges_out(B, E, N))
    out[0] = torch.empty(2 * B * E - 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"filter_edges_out: `edge_index_out` holds 599 elements but needs at least 600"):
        torch.ops.stoichconv.filter_edges_out(edge_index, N, pert, ptr, True, *out)
    out = list(allocate_filter_edges_out(B, E, N))
    out[2] = torch.empty(B * E, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"filter_edges_out: `edge_keep_out` must be Bool, got Byte"):
        torch.ops.stoichconv.filter_edges_out(edge_index, N, pert, ptr, True, *out)
    with pytest.raises(RuntimeError, match=r"reaction_keep_out: `out` holds 3 elements"):
        torch.ops.stoichconv.reaction_keep_out(gpr, NUM_REACTIONS, pert, ptr, torch.empty(3, dtype=torch.bool))
    bip = list(allocate_bipartite_out(B, E))
    bip[1] = torch.empty(B, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"filter_bipartite_out: `edge_ptr_out` holds 5 elements but needs at least 6"):
        torch.ops.stoichconv.filter_bipartite_out(gpr, N, NUM_REACTIONS, B, None, dst_keep, True, *bip)
    # a bad value raises the normal op's error, word for word
    bad = edge_index.clone()
    bad[1, 0] = N
    with pytest.raises(RuntimeError) as normal:
        torch.ops.stoichconv.filter_edges(bad, N, pert, ptr, True)
    with pytest.raises(RuntimeError) as into:
        torch.ops.stoichconv.filter_edges_out(bad, N, pert, ptr, True, *allocate_filter_edges_out(B, E, N))
    assert str(normal.value).splitlines()[0] == str(into.value).splitlines()[0]


@pytest.mark.parametrize("backend,device", backend_params("filter_edges"))
def test_out_ops_opcheck(backend, device):
    edge_index, gpr, pert, ptr, src_keep, dst_keep = _op_inputs(device)
    B, E, N = 5, edge_index.size(1), NUM_GENES
    extra = (False,) if backend == "triton" else ()
    for relabel in (True, False):
        op = kernel_op("filter_edges", backend, device, name="out")
        torch.library.opcheck(op, (edge_index, N, pert, ptr, relabel, *allocate_filter_edges_out(B, E, N, device),
                                   *extra))
        op = kernel_op("filter_bipartite", backend, device, name="out")
        torch.library.opcheck(op, (gpr, N, NUM_REACTIONS, B, src_keep, dst_keep, relabel,
                                   *allocate_bipartite_out(B, gpr.size(1), device), *extra))
    op = kernel_op("reaction_keep", backend, device, name="out")
    torch.library.opcheck(op, (gpr, NUM_REACTIONS, pert, ptr, torch.empty(B * NUM_REACTIONS, dtype=torch.bool,
                                                                         device=device), *extra))


# --------------------------------------------------------------------------- real cell graph


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["compacted", "full"])
def test_batcher_real_graph(layout):
    from stoichconv.data import load_cell_graph, random_perturbations

    graph = load_cell_graph(seed=0)
    batcher = PerturbBatcher(graph, layout=layout, max_batch=32, backend="cpu")
    for B, seed in ((32, 0), (7, 1), (32, 2)):
        pert, ptr = random_perturbations(int(graph["gene"].num_nodes), B, sizes=(1, 2, 3), seed=seed)
        assert_batches_equal(batcher(pert, ptr), perturb_batch(graph, pert, ptr, layout=layout, backend="cpu"))
