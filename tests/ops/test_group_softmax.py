"""The grouped softmax kernel (stoichconv.ops.group_softmax) against its
scatter-based PyTorch reference, in both groupings of a stoich plan."""

import pytest
import torch
from hypergraphs import random_hypergraph, random_keep

import stoichconv
from stoichconv.ops import build_stoich_plan
from stoichconv.backends import available_backends
from stoichconv.ops.group_softmax import group_softmax
from stoichconv.reference.group_softmax import group_softmax_reference

pytestmark = pytest.mark.skipif(not stoichconv.has_compiled_kernels(), reason="stoichconv._C not built")

N, M, NNZ = 9, 7, 30


def setup(B=3, H=2, dtype=torch.float64, masked=True, seed=0, mode="node"):
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = torch.Generator().manual_seed(seed + 1)
    logits = (3 * torch.randn(B, NNZ, H, generator=g, dtype=dtype)).requires_grad_(True)
    kept = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, plan.reaction_index[0]] = False  # a masked reaction with incidences
        kept = keep[:, plan.reaction_index]
    if mode == "node":
        grouping = (plan.reaction_index, M, plan.reaction_ptr, plan.reaction_perm)
    else:
        grouping = (plan.metabolite_index, N, plan.metabolite_ptr, plan.metabolite_perm)
    return logits, kept, grouping


def test_available_on_cpu_only():
    assert "cpu" in available_backends(torch.device("cpu"), "group_softmax")["group_softmax"]
    assert "cpu" not in available_backends(torch.device("meta"), "group_softmax")["group_softmax"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("H", [1, 3])
def test_matches_reference_forward_and_backward(dtype, tol, mode, masked, H):
    logits, kept, (group, G, ptr, perm) = setup(H=H, dtype=dtype, masked=masked, mode=mode)
    got = group_softmax(logits, ptr, perm, kept)
    want = group_softmax_reference(logits, group, G, kept)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, logits, grad)
    (g_want,) = torch.autograd.grad(want, logits, grad)
    torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["node", "edge"])
def test_rows_sum_to_one_and_masked_incidences_weigh_zero(mode):
    logits, kept, (group, G, ptr, perm) = setup(B=4, mode=mode)
    alpha = group_softmax(logits, ptr, perm, kept).detach()
    assert bool((alpha[~kept] == 0).all())
    sums = torch.zeros(4, G, 2, dtype=alpha.dtype).index_add_(1, group, alpha)
    has_kept = torch.zeros(4, G, dtype=torch.long).index_add_(1, group, kept.long()) > 0
    torch.testing.assert_close(sums[has_kept], torch.ones_like(sums[has_kept]), rtol=1e-12, atol=1e-12)
    assert bool((sums[~has_kept] == 0).all())  # empty or fully masked groups


def test_large_logits_do_not_overflow():
    logits, kept, (group, G, ptr, perm) = setup(masked=False)
    alpha = group_softmax(logits.detach() * 1e4, ptr, perm, kept)
    assert bool(torch.isfinite(alpha).all())
    torch.testing.assert_close(alpha, group_softmax_reference(logits.detach() * 1e4, group, G, kept))


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked):
    logits, kept, (_, _, ptr, perm) = setup(B=2, H=2, masked=masked)
    assert torch.autograd.gradcheck(lambda x: group_softmax(x, ptr, perm, kept), (logits,))


def test_opcheck():
    logits, kept, (_, _, ptr, perm) = setup(B=2)
    torch.library.opcheck(torch.ops.stoichconv.group_softmax.default, (logits, kept, ptr, perm))
    alpha = group_softmax(logits, ptr, perm, kept).detach()
    torch.library.opcheck(torch.ops.stoichconv.group_softmax_backward.default,
                          (torch.randn_like(alpha), alpha, ptr, perm))


def test_deterministic_across_threads_and_empty_inputs():
    logits, kept, (_, _, ptr, perm) = setup(B=5, H=2, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            alpha = group_softmax(logits, ptr, perm, kept)
            results.append((alpha, *torch.autograd.grad(alpha, logits, torch.ones_like(alpha) + alpha.detach())))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    empty = group_softmax(torch.empty(0, NNZ, 2), ptr, perm, None)
    assert empty.shape == (0, NNZ, 2)
    no_incidences = group_softmax(torch.empty(2, 0, 1), torch.zeros(4, dtype=torch.long),
                                  torch.empty(0, dtype=torch.long), None)
    assert no_incidences.shape == (2, 0, 1)


def test_bad_input():
    logits, kept, (_, _, ptr, perm) = setup()
    bad_perm = perm.clone()
    bad_perm[0] = NNZ
    with pytest.raises(RuntimeError, match=r"`group_perm` has id .* outside \[0, "):
        group_softmax(logits, ptr, bad_perm, kept)
    bad_perm[0] = perm[1]
    with pytest.raises(RuntimeError, match=r"`group_perm` must be a permutation .* repeats"):
        group_softmax(logits, ptr, bad_perm, kept)
    short_ptr = ptr.clone()
    short_ptr[-1] = NNZ - 1
    with pytest.raises(RuntimeError, match="`group_ptr` must start at 0 and end at nnz"):
        group_softmax(logits, short_ptr, perm, kept)
    with pytest.raises(RuntimeError, match=r"`kept` must be \[B, nnz\]"):
        group_softmax(logits, ptr, perm, kept[:, :-1])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        group_softmax(logits.detach().half(), ptr, perm, kept)
    with pytest.raises(TypeError, match="`group_perm` must be a 1-D int64 tensor"):
        group_softmax(logits, ptr, perm.int(), kept)
    with pytest.raises(TypeError, match="`kept` must be a bool tensor"):
        group_softmax(logits, ptr, perm, kept.long())
    with pytest.raises(ValueError, match=r"`logits` must be a floating tensor \[B, nnz, H\]"):
        group_softmax(logits[0], ptr, perm, kept)
