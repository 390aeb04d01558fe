"""Triton batched edge filter against an independent per-sample PyG
``subgraph`` loop (CPU tensors run through the Triton interpreter)."""

import importlib.util

import pytest
import torch
from torch_geometric.utils import subgraph

from stoichconv.ops.pert_mask.triton_kernels import triton_filter_edges


def expected_filter_edges(edge_index, num_nodes, pert, pert_ptr, relabel):
    """Pure-torch/PyG expectation, one sample at a time."""
    B = pert_ptr.numel() - 1
    outs, edge_keep, node_keep, edge_counts, node_starts, kept_counts = [], [], [], [0], [0], [0]
    for b in range(B):
        keep = torch.ones(num_nodes, dtype=torch.bool)
        keep[pert[pert_ptr[b]:pert_ptr[b + 1]]] = False
        sub, _, mask = subgraph(keep, edge_index, relabel_nodes=relabel, num_nodes=num_nodes, return_edge_mask=True)
        outs.append(sub + node_starts[-1])
        edge_keep.append(mask)
        node_keep.append(keep)
        edge_counts.append(edge_counts[-1] + sub.size(1))
        node_starts.append(node_starts[-1] + (int(keep.sum()) if relabel else num_nodes))
        kept_counts.append(kept_counts[-1] + int(keep.sum()))
    return (
        torch.cat(outs, 1) if outs else torch.empty(2, 0, dtype=torch.long),
        torch.tensor(edge_counts),
        torch.cat(edge_keep) if edge_keep else torch.empty(0, dtype=torch.bool),
        torch.cat(node_keep) if node_keep else torch.empty(0, dtype=torch.bool),
        torch.tensor(kept_counts),  # node_ptr: cumulative kept-node counts in both layouts
    )


def random_case(N, E, deletions_per_sample, seed=0):
    """Edges with self-loops and multi-edges; deletions unsorted with duplicates."""
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, N, (2, E), generator=g)
    if E >= 6:
        edge_index[:, 1] = edge_index[0, 1]  # self-loop
        edge_index[:, 3] = edge_index[:, 2]  # multi-edge
        edge_index[:, 4] = torch.tensor([edge_index[1, 2], edge_index[0, 2]])  # reverse edge
    perts = []
    for count in deletions_per_sample:
        p = torch.randint(0, N, (count,), generator=g)
        if count >= 2:
            p[-1] = p[0]  # duplicate deletion
        perts.append(p)
    pert = torch.cat(perts) if perts else torch.empty(0, dtype=torch.long)
    pert_ptr = torch.tensor([0] + [int(c) for c in torch.tensor(deletions_per_sample, dtype=torch.long).cumsum(0)])
    return edge_index, pert, pert_ptr


def check(device, edge_index, N, pert, pert_ptr, relabel):
    got = triton_filter_edges(edge_index.to(device), N, pert.to(device), pert_ptr.to(device), relabel)
    want = expected_filter_edges(edge_index, N, pert, pert_ptr, relabel)
    names = ("edge_index_out", "edge_ptr", "edge_keep", "node_keep", "node_ptr")
    for name, a, b in zip(names, got, want):
        assert a.device.type == device.type, name
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert torch.equal(a.cpu(), b), name
    return got


@pytest.mark.parametrize("relabel", [True, False])
@pytest.mark.parametrize(
    "deletions", [[], [2], [3, 0, 1], [1, 4, 2]], ids=["B0", "B1", "B3-empty-sample", "B3"]
)
def test_matches_subgraph_loop(device, relabel, deletions):
    edge_index, pert, pert_ptr = random_case(12, 40, deletions, seed=len(deletions))
    edge_index_out, edge_ptr, *_ = check(device, edge_index, 12, pert, pert_ptr, relabel)
    assert edge_ptr.numel() == len(deletions) + 1 and edge_index_out.size(1) == int(edge_ptr[-1])


@pytest.mark.parametrize("relabel", [True, False])
def test_multiple_edge_blocks_and_unsorted_duplicate_deletions(device, relabel):
    # E > 2 blocks of 128 edges: block offsets cross block and sample boundaries.
    edge_index, _, _ = random_case(12, 300, [], seed=3)
    pert = torch.tensor([7, 2, 7, 2, 11, 0, 5, 5, 3])  # unsorted, duplicated
    pert_ptr = torch.tensor([0, 4, 4, 9])
    check(device, edge_index, 12, pert, pert_ptr, relabel)


@pytest.mark.parametrize("relabel", [True, False])
def test_no_edges(device, relabel):
    _, edge_ptr, edge_keep, node_keep, node_ptr = check(
        device, torch.empty(2, 0, dtype=torch.long), 5, torch.tensor([1, 3]), torch.tensor([0, 1, 2]), relabel
    )
    assert edge_keep.numel() == 0 and bool((edge_ptr == 0).all())
    assert node_keep.tolist() == [True, False, True, True, True, True, True, True, False, True]


def test_everything_deleted_and_nothing_deleted(device):
    edge_index, _, _ = random_case(6, 20, [], seed=1)
    pert = torch.cat([torch.arange(6), torch.empty(0, dtype=torch.long)])
    out, edge_ptr, *_ = check(device, edge_index, 6, pert, torch.tensor([0, 6, 6]), True)
    # sample 0 loses every edge; sample 1 keeps the wildtype, relabelled from 0
    assert edge_ptr.tolist() == [0, 0, 20] and torch.equal(out.cpu(), edge_index)


def test_int32_inputs(device):
    edge_index, pert, pert_ptr = random_case(10, 30, [2, 1], seed=5)
    got = triton_filter_edges(
        edge_index.int().to(device), 10, pert.int().to(device), pert_ptr.int().to(device), True
    )
    want = expected_filter_edges(edge_index, 10, pert, pert_ptr, True)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("relabel", [True, False])
def test_opcheck(device, relabel):
    edge_index, pert, pert_ptr = random_case(8, 20, [2, 1], seed=2)
    args = (edge_index.to(device), 8, pert.to(device), pert_ptr.to(device), relabel)
    torch.library.opcheck(torch.ops.stoichconv.triton_filter_edges.default, args)


def test_bad_inputs_raise_naming_the_argument(device):
    edge_index, pert, pert_ptr = random_case(8, 20, [2, 1], seed=2)
    edge_index, pert, pert_ptr = edge_index.to(device), pert.to(device), pert_ptr.to(device)
    with pytest.raises(ValueError, match="`pert`"):
        triton_filter_edges(edge_index, 8, pert + 8, pert_ptr, True)
    with pytest.raises(ValueError, match="`pert_ptr`"):
        triton_filter_edges(edge_index, 8, pert, pert_ptr[:-1], True)
    with pytest.raises(ValueError, match=r"`edge_index\[0\]` has id 7 >= num_nodes = 4"):
        triton_filter_edges(edge_index, 4, pert.clamp(max=3), pert_ptr, True)
    with pytest.raises(TypeError, match="`edge_index`"):
        triton_filter_edges(edge_index.float(), 8, pert, pert_ptr, True)
    with pytest.raises(ValueError, match="`num_nodes`"):
        triton_filter_edges(edge_index, -1, pert, pert_ptr, True)


@pytest.mark.skipif(
    importlib.util.find_spec("stoichconv.reference.perturb") is None, reason="stoichconv.reference.perturb not written"
)
@pytest.mark.parametrize("relabel", [True, False])
def test_matches_package_reference(device, relabel):
    from stoichconv.reference.perturb import filter_edges_reference

    edge_index, pert, pert_ptr = random_case(12, 40, [1, 3, 2], seed=9)
    got = triton_filter_edges(edge_index.to(device), 12, pert.to(device), pert_ptr.to(device), relabel)
    want = filter_edges_reference(edge_index, 12, pert, pert_ptr, relabel)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b.cpu())


def _has_compiled_filter_edges() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("stoichconv::filter_edges", "CPU")
    except RuntimeError:  # schema not registered (stoichconv._C missing or older)
        return False


@pytest.mark.skipif(not _has_compiled_filter_edges(), reason="compiled stoichconv::filter_edges not built")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton missing")
@pytest.mark.parametrize("relabel", [True, False])
def test_matches_compiled_cpu_op(relabel):
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    edge_index, pert, pert_ptr = random_case(12, 200, [2, 0, 5], seed=4)
    got = triton_filter_edges(edge_index, 12, pert, pert_ptr, relabel)
    want = torch.ops.stoichconv.filter_edges(edge_index, 12, pert, pert_ptr, relabel)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("relabel", [True, False])
def test_public_wrapper_backend_triton(device, relabel):
    from stoichconv.ops.pert_mask import filter_edges

    edge_index, pert, pert_ptr = random_case(10, 30, [1, 2], seed=6)
    got = filter_edges(edge_index.to(device), 10, pert.to(device), pert_ptr.to(device), relabel=relabel,
                       backend="triton")
    want = expected_filter_edges(edge_index, 10, pert, pert_ptr, relabel)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def test_torch_compile_fullgraph(device):
    # The fake kernel's data-dependent E_out lets dynamo trace around the op.
    edge_index, pert, pert_ptr = random_case(10, 30, [1, 2], seed=6)
    fn = torch.compile(lambda e, p, q: triton_filter_edges(e, 10, p, q, True)[0] * 2, backend="aot_eager",
                       fullgraph=True)
    got = fn(edge_index.to(device), pert.to(device), pert_ptr.to(device))
    assert torch.equal(got.cpu(), expected_filter_edges(edge_index, 10, pert, pert_ptr, True)[0] * 2)
