"""The grouped softmax (stoichconv.ops.group_softmax) on every kernel backend of its table entry
against its scatter-based PyTorch reference, in both groupings of a stoich plan: forward and
backward, normalisation, overflow, gradcheck, opcheck in both dtypes, determinism and empty
inputs, bad input."""

import pytest
import torch

from stoichconv.backends import available_backends
from stoichconv.ops import build_stoich_plan
from stoichconv.ops.group_softmax import group_softmax
from stoichconv.reference.group_softmax import group_softmax_reference
from stoichconv.testing import backend_cases, backend_params, is_interpreted, kernel_op, random_hypergraph, random_keep

OP = "group_softmax"
KERNELS = backend_params(OP)

N, M, NNZ = 9, 7, 30


def setup(B=3, H=2, dtype=torch.float64, masked=True, seed=0, mode="node", device="cpu"):
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed, device=device)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = torch.Generator().manual_seed(seed + 1)
    logits = (3 * torch.randn(B, NNZ, H, generator=g, dtype=dtype)).to(device).requires_grad_(True)
    kept = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, plan.reaction_index[0].cpu()] = False  # a masked reaction with incidences
        kept = keep.to(device)[:, plan.reaction_index]
    if mode == "node":
        grouping = (plan.reaction_index, M, plan.reaction_ptr, plan.reaction_perm)
    else:
        grouping = (plan.metabolite_index, N, plan.metabolite_ptr, plan.metabolite_perm)
    return logits, kept, grouping


def test_available_backends():
    assert "cpu" in available_backends(torch.device("cpu"), OP)[OP]
    assert "cpu" not in available_backends(torch.device("meta"), OP)[OP]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("backend,device,H", backend_cases(KERNELS, [(1,), (3,)], [(3,)]))
def test_matches_reference_forward_and_backward(backend, device, H, dtype, tol, mode, masked):
    logits, kept, (group, G, ptr, perm) = setup(H=H, dtype=dtype, masked=masked, mode=mode, device=device)
    got = group_softmax(logits, ptr, perm, kept, backend=backend)
    want = group_softmax_reference(logits, group, G, kept)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, logits, grad)
    (g_want,) = torch.autograd.grad(want, logits, grad)
    torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_rows_sum_to_one_and_masked_incidences_weigh_zero(backend, device, mode):
    logits, kept, (group, G, ptr, perm) = setup(B=4, mode=mode, device=device)
    alpha = group_softmax(logits, ptr, perm, kept, backend=backend).detach()
    assert bool((alpha[~kept] == 0).all())
    sums = torch.zeros(4, G, 2, dtype=alpha.dtype, device=device).index_add_(1, group, alpha)
    has_kept = torch.zeros(4, G, dtype=torch.long, device=device).index_add_(1, group, kept.long()) > 0
    torch.testing.assert_close(sums[has_kept], torch.ones_like(sums[has_kept]), rtol=1e-12, atol=1e-12)
    assert bool((sums[~has_kept] == 0).all())  # empty or fully masked groups


@pytest.mark.parametrize("backend,device", KERNELS)
def test_large_logits_do_not_overflow(backend, device):
    logits, kept, (group, G, ptr, perm) = setup(masked=False, device=device)
    alpha = group_softmax(logits.detach() * 1e4, ptr, perm, kept, backend=backend)
    assert bool(torch.isfinite(alpha).all())
    torch.testing.assert_close(alpha, group_softmax_reference(logits.detach() * 1e4, group, G, kept))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck(backend, device, masked):
    logits, kept, (_, _, ptr, perm) = setup(B=2, H=2, masked=masked, device=device)
    fn = lambda x: group_softmax(x, ptr, perm, kept, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=backend == "triton")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck(backend, device, dtype, masked):
    B = 1 if is_interpreted(backend, device) else 2  # opcheck runs the operators a dozen times
    logits, kept, (_, _, ptr, perm) = setup(B=B, dtype=dtype, masked=masked, device=device)
    forward, backward = kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")
    torch.library.opcheck(forward, (logits, kept, ptr, perm))
    alpha = group_softmax(logits, ptr, perm, kept, backend=backend).detach()
    torch.library.opcheck(backward, (torch.randn_like(alpha), alpha, ptr, perm))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_deterministic_across_threads_and_empty_inputs(backend, device):
    logits, kept, (_, _, ptr, perm) = setup(B=5, H=2, dtype=torch.float32, device=device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            alpha = group_softmax(logits, ptr, perm, kept, backend=backend)
            results.append((alpha, *torch.autograd.grad(alpha, logits, torch.ones_like(alpha) + alpha.detach())))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    empty = group_softmax(torch.empty(0, NNZ, 2, device=device), ptr, perm, None, backend=backend)
    assert empty.shape == (0, NNZ, 2)
    no_incidences = group_softmax(torch.empty(2, 0, 1, device=device), torch.zeros(4, dtype=torch.long, device=device),
                                  torch.empty(0, dtype=torch.long, device=device), None, backend=backend)
    assert no_incidences.shape == (2, 0, 1)


@pytest.mark.parametrize("backend,device", backend_params(OP, reference=True))
def test_wrapper_rejects_bad_input(backend, device):
    logits, kept, (_, _, ptr, perm) = setup(device=device)
    with pytest.raises(TypeError, match="`group_perm` must be a 1-D int64 tensor"):
        group_softmax(logits, ptr, perm.int(), kept, backend=backend)
    with pytest.raises(TypeError, match="`kept` must be a bool tensor"):
        group_softmax(logits, ptr, perm, kept.long(), backend=backend)
    with pytest.raises(ValueError, match=r"`logits` must be a floating tensor \[B, nnz, H\]"):
        group_softmax(logits[0], ptr, perm, kept, backend=backend)


def test_compiled_kernel_rejects_bad_input():
    logits, kept, (_, _, ptr, perm) = setup()
    bad_perm = perm.clone()
    bad_perm[0] = NNZ
    with pytest.raises(RuntimeError, match=r"`group_perm` has id .* outside \[0, "):
        group_softmax(logits, ptr, bad_perm, kept, backend="cpu")
    bad_perm[0] = perm[1]
    with pytest.raises(RuntimeError, match=r"`group_perm` must be a permutation .* repeats"):
        group_softmax(logits, ptr, bad_perm, kept, backend="cpu")
    short_ptr = ptr.clone()
    short_ptr[-1] = NNZ - 1
    with pytest.raises(RuntimeError, match="`group_ptr` must start at 0 and end at nnz"):
        group_softmax(logits, short_ptr, perm, kept, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`kept` must be \[B, nnz\]"):
        group_softmax(logits, ptr, perm, kept[:, :-1], backend="cpu")
    with pytest.raises(RuntimeError, match="`logits` must be float16, bfloat16, float32 or float64"):
        torch.ops.stoichconv.group_softmax(logits.detach().int(), kept, ptr, perm)
