"""stoichconv.ops.pert_mask.kept_nodes (the kept nodes of a keep-mask: nonzero's two columns and
the per-sample offsets) on every backend of its table entry (cpu, reference), against a
brute-force expectation written here in plain Python: exact equality, the out= variant,
opcheck, torch.compile and bad input."""

import pytest
import torch

from stoichconv.ops.pert_mask import KeptNodes, kept_nodes
from stoichconv.reference.pert_mask import kept_nodes_reference
from stoichconv.testing import backend_params, kernel_op

KN = backend_params("kept_nodes", reference=True)
KN_KERNELS = backend_params("kept_nodes")


def brute_kept_nodes(keep):
    batch, n_id, ptr = [], [], [0]
    for b, row in enumerate(keep.tolist()):
        for v, kept in enumerate(row):
            if kept:
                batch.append(b)
                n_id.append(v)
        ptr.append(len(n_id))
    long = dict(dtype=torch.int64)
    return torch.tensor(batch, **long), torch.tensor(n_id, **long), torch.tensor(ptr, **long)


def random_keep(B, N, removed_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g) >= removed_fraction


# (B, N, fraction removed): a deletion batch (nearly all kept), a dense mix, the all-kept and
# all-removed extremes, and the empty shapes.
CASES = [(32, 500, 0.01, 0), (5, 300, 0.5, 1), (3, 70, 0.0, 2), (4, 33, 1.0, 3), (0, 10, 0.3, 4),
         (3, 0, 0.3, 5), (1, 1, 0.0, 6)]


def assert_kept_nodes(got, keep):
    assert isinstance(got, KeptNodes)
    for t in got:
        assert t.dtype == torch.int64 and t.device == keep.device
    for a, b in zip(got, brute_kept_nodes(keep.cpu())):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("B,N,removed,seed", CASES)
@pytest.mark.parametrize("backend,device", KN)
def test_kept_nodes_matches_brute_force(backend, device, B, N, removed, seed):
    keep = random_keep(B, N, removed, seed)
    if B and N:  # a removed node at both ends of a row
        keep[0, 0] = keep[-1, -1] = False
    keep = keep.to(device)
    assert_kept_nodes(kept_nodes(keep, backend=backend), keep)
    assert_kept_nodes(KeptNodes(*kept_nodes_reference(keep)), keep)


@pytest.mark.parametrize("backend,device", KN)
def test_kept_nodes_out_writes_into_the_buffers(backend, device):
    keep = random_keep(6, 40, 0.2, 7).to(device)
    long = dict(dtype=torch.int64, device=device)
    out = KeptNodes(torch.full((8 * 40,), -1, **long), torch.full((8 * 40,), -1, **long), torch.full((9,), -1, **long))
    got = kept_nodes(keep, backend=backend, out=out)
    assert_kept_nodes(got, keep)
    for view, buffer in zip(got, out):
        assert view.data_ptr() == buffer.data_ptr()
    # a second mask into the same buffers: the views follow its (smaller) result
    assert_kept_nodes(kept_nodes(keep[:2], backend=backend, out=out), keep[:2])


@pytest.mark.parametrize("B", [0, 1, 4])
@pytest.mark.parametrize("backend,device", KN_KERNELS)
def test_kept_nodes_opcheck(backend, device, B):
    keep = random_keep(B, 25, 0.3, B).to(device)
    torch.library.opcheck(kernel_op("kept_nodes", backend, device), (keep,))


@pytest.mark.parametrize("backend,device", KN_KERNELS)
def test_kept_nodes_torch_compile_fullgraph(backend, device):
    keep = random_keep(3, 20, 0.3, 9).to(device)
    compiled = torch.compile(lambda k: kept_nodes(k, backend=backend), fullgraph=True, backend="eager")
    assert_kept_nodes(KeptNodes(*compiled(keep)), keep)


@pytest.mark.parametrize(
    "keep, out, error, message",
    [
        (torch.ones(2, 3), None, TypeError, "`keep` must be a bool tensor"),
        ([[True]], None, TypeError, "`keep` must be a bool tensor"),
        (torch.ones(6, dtype=torch.bool), None, ValueError, r"`keep` must be \[B, N\]"),
        (torch.ones(2, 3, dtype=torch.bool), KeptNodes(torch.empty(5, dtype=torch.int64), torch.empty(6, dtype=torch.int64),
                                                       torch.empty(3, dtype=torch.int64)),
         ValueError, r"`out.batch` holds 5 elements but needs at least 6"),
        (torch.ones(2, 3, dtype=torch.bool), KeptNodes(torch.empty(6, dtype=torch.int64), torch.empty(6, dtype=torch.int32),
                                                       torch.empty(3, dtype=torch.int64)),
         TypeError, "`out.n_id` must have dtype torch.int64"),
        (torch.ones(2, 3, dtype=torch.bool), (1, 2, 3), TypeError, "`out` must be a KeptNodes"),
    ],
)
@pytest.mark.parametrize("backend,device", [p for p in KN if p.values[1].type == "cpu"])
def test_kept_nodes_bad_input(backend, device, keep, out, error, message):
    with pytest.raises(error, match=message):
        kept_nodes(keep, backend=backend, out=out)


def test_kept_nodes_raw_ops_reject_bad_input():
    ops = torch.ops.stoichconv
    with pytest.raises(RuntimeError, match="kept_nodes: `keep` must be bool"):
        ops.kept_nodes(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"kept_nodes: `keep` must be \[B, N\]"):
        ops.kept_nodes(torch.ones(3, dtype=torch.bool))
    long = dict(dtype=torch.int64)
    with pytest.raises(RuntimeError, match="kept_nodes_out: `ptr_out`"):
        ops.kept_nodes_out(torch.ones(2, 3, dtype=torch.bool), torch.empty(6, **long), torch.empty(6, **long),
                           torch.empty(2, **long))
