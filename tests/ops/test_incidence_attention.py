"""The fused incidence attention (stoichconv.ops.incidence_attention) on every kernel backend of
its table entry against its PyTorch reference and against group_softmax of the explicit logits,
in both groupings of a stoich plan, shared and per-sample reaction scores: forward and backward,
masked groups, gradcheck, opcheck in every dtype, determinism, empty inputs, bad input."""

import pytest
import torch
import torch.nn.functional as F

from stoichconv.backends import available_backends
from stoichconv.ops import build_stoich_plan
from stoichconv.ops.incidence_attention import incidence_attention
from stoichconv.reference.group_softmax import group_softmax_reference
from stoichconv.reference.incidence_attention import incidence_attention_reference
from stoichconv.testing import backend_cases, backend_params, is_interpreted, kernel_op, random_hypergraph, random_keep

OP = "incidence_attention"
KERNELS = backend_params(OP)
SLOPE = 0.2

N, M, NNZ = 9, 7, 30


def setup(B=3, H=2, dtype=torch.float64, masked=True, seed=0, mode="node", shared=True, device="cpu"):
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed, device=device)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = torch.Generator().manual_seed(seed + 1)
    score_v = (2 * torch.randn(B, N, H, generator=g, dtype=dtype)).to(device).requires_grad_(True)
    score_e = (2 * torch.randn(1 if shared else B, M, H, generator=g, dtype=dtype)).to(device).requires_grad_(True)
    kept = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, plan.reaction_index[0].cpu()] = False  # a masked reaction with incidences
        kept = keep.to(device)[:, plan.reaction_index]
    if mode == "node":
        grouping = (plan.reaction_index, M, plan.reaction_ptr, plan.reaction_perm)
    else:
        grouping = (plan.metabolite_index, N, plan.metabolite_ptr, plan.metabolite_perm)
    return score_v, score_e, kept, plan, grouping


def run(score_v, score_e, kept, plan, grouping, backend, slope=SLOPE):
    _, _, ptr, perm = grouping
    return incidence_attention(score_v, score_e, plan.metabolite_index, plan.reaction_index, ptr, perm, kept, slope,
                               metabolite_grouping=(plan.metabolite_ptr, plan.metabolite_perm),
                               reaction_grouping=(plan.reaction_ptr, plan.reaction_perm), backend=backend)


def raw_args(score_v, score_e, kept, plan, grouping):
    _, _, ptr, perm = grouping
    return (score_v, score_e, plan.metabolite_index, plan.reaction_index, kept, ptr, perm,
            plan.metabolite_ptr, plan.metabolite_perm, plan.reaction_ptr, plan.reaction_perm, SLOPE)


def test_available_backends():
    assert "cpu" in available_backends(torch.device("cpu"), OP)[OP]


def test_reference_is_group_softmax_of_the_explicit_logits():
    score_v, score_e, kept, plan, (group, G, _, _) = setup(shared=False)
    logits = F.leaky_relu(score_v[:, plan.metabolite_index] + score_e[:, plan.reaction_index], SLOPE)
    want = group_softmax_reference(logits, group, G, kept)
    got = incidence_attention_reference(score_v, score_e, plan.metabolite_index, plan.reaction_index, group, G,
                                        kept, SLOPE)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend,device,H", backend_cases(KERNELS, [(1,), (3,)], [(3,)]))
def test_matches_float64_reference_forward_and_backward(backend, device, H, dtype, tol, mode, masked, shared):
    score_v, score_e, kept, plan, grouping = setup(H=H, dtype=dtype, masked=masked, mode=mode, shared=shared,
                                                   device=device)
    group, G = grouping[:2]
    got = run(score_v, score_e, kept, plan, grouping, backend)
    assert got.dtype == dtype and got.shape == (3, NNZ, H)
    v64 = score_v.detach().double().requires_grad_(True)
    e64 = score_e.detach().double().requires_grad_(True)
    want = incidence_attention_reference(v64, e64, plan.metabolite_index, plan.reaction_index, group, G, kept, SLOPE)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (score_v, score_e), grad.to(dtype))
    g_want = torch.autograd.grad(want, (v64, e64), grad)
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape and a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("B", [4, 6])
@pytest.mark.parametrize("H", [2, 4, 5])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_head_counts_and_batch_sizes_match_float64_reference(backend, device, H, B, mode, shared):
    # The CPU kernels compile H = 1, 2, 4 as constants (5: the run-time loop) and sum the
    # metabolite rows of 4 samples at once (B = 6: one block of 4 and the 2 left over);
    # node mode sums the reactions with the logit gradients.
    score_v, score_e, kept, plan, grouping = setup(B=B, H=H, dtype=torch.float64, mode=mode, shared=shared,
                                                   device=device, seed=3)
    group, G = grouping[:2]
    got = run(score_v, score_e, kept, plan, grouping, backend)
    want = incidence_attention_reference(score_v, score_e, plan.metabolite_index, plan.reaction_index, group, G,
                                         kept, SLOPE)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    for a, b in zip(torch.autograd.grad(got, (score_v, score_e), grad),
                    torch.autograd.grad(want, (score_v, score_e), grad)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_reduced_precision_close_to_float64(backend, device, dtype):
    score_v, score_e, kept, plan, grouping = setup(dtype=dtype, device=device)
    group, G = grouping[:2]
    got = run(score_v, score_e, kept, plan, grouping, backend)
    want = incidence_attention_reference(score_v.detach().double(), score_e.detach().double(), plan.metabolite_index,
                                         plan.reaction_index, group, G, kept, SLOPE)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_masked_incidences_and_all_masked_groups_weigh_zero(backend, device, mode):
    score_v, score_e, kept, plan, grouping = setup(B=4, mode=mode, device=device)
    group, G = grouping[:2]
    kept = kept.clone()
    kept[1] = False  # sample 1: every group fully masked
    alpha = run(score_v, score_e, kept, plan, grouping, backend)
    assert bool((alpha.detach()[~kept] == 0).all())
    assert bool((alpha.detach()[1] == 0).all())
    sums = torch.zeros(4, G, 2, dtype=alpha.dtype, device=device).index_add_(1, group, alpha.detach())
    has_kept = torch.zeros(4, G, dtype=torch.long, device=device).index_add_(1, group, kept.long()) > 0
    torch.testing.assert_close(sums[has_kept], torch.ones_like(sums[has_kept]), rtol=1e-12, atol=1e-12)
    g_v, g_e = torch.autograd.grad(alpha, (score_v, score_e), torch.randn_like(alpha))
    assert bool(torch.isfinite(g_v).all()) and bool(torch.isfinite(g_e).all())
    assert bool((g_v[1] == 0).all())  # a fully masked sample gets no gradient


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck(backend, device, masked, shared):
    score_v, score_e, kept, plan, grouping = setup(B=2, H=2, masked=masked, shared=shared, device=device)
    fn = lambda v, e: run(v, e, kept, plan, grouping, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (score_v, score_e), fast_mode=backend == "triton")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck(backend, device, dtype, masked):
    B = 1 if is_interpreted(backend, device) else 2
    score_v, score_e, kept, plan, grouping = setup(B=B, dtype=dtype, masked=masked, shared=B > 1, device=device)
    forward, backward = kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")
    args = raw_args(score_v, score_e, kept, plan, grouping)
    torch.library.opcheck(forward, args)
    alpha = forward(*args).detach()
    detached = (score_v.detach(), score_e.detach(), *args[2:4])
    torch.library.opcheck(backward, (torch.randn_like(alpha), alpha, *detached, *args[5:]))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_deterministic_across_threads_and_empty_inputs(backend, device):
    score_v, score_e, kept, plan, grouping = setup(B=5, H=2, dtype=torch.float32, device=device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            alpha = run(score_v, score_e, kept, plan, grouping, backend)
            results.append((alpha, *torch.autograd.grad(alpha, (score_v, score_e),
                                                        torch.ones_like(alpha) + alpha.detach())))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    empty = run(score_v.detach()[:0], score_e.detach(), None, plan, grouping, backend)
    assert empty.shape == (0, NNZ, 2)


@pytest.mark.parametrize("backend,device", backend_params(OP, reference=True))
def test_wrapper_rejects_bad_input(backend, device):
    score_v, score_e, kept, plan, grouping = setup(device=device)
    _, _, ptr, perm = grouping
    mg, rg = (plan.metabolite_ptr, plan.metabolite_perm), (plan.reaction_ptr, plan.reaction_perm)
    call = lambda **kw: incidence_attention(  # noqa: E731
        kw.get("v", score_v), kw.get("e", score_e), kw.get("mi", plan.metabolite_index), plan.reaction_index,
        ptr, kw.get("perm", perm), kw.get("kept", kept), metabolite_grouping=kw.get("mg", mg),
        reaction_grouping=rg, backend=backend)
    with pytest.raises(TypeError, match="`group_perm` must be a 1-D int64 tensor"):
        call(perm=perm.int())
    with pytest.raises(TypeError, match="`metabolite_index` must be a 1-D int64 tensor"):
        call(mi=plan.metabolite_index.int())
    with pytest.raises(TypeError, match="`metabolite_perm` must be a 1-D int64 tensor"):
        call(mg=(plan.metabolite_ptr, plan.metabolite_perm.int()))
    with pytest.raises(TypeError, match="`kept` must be a bool tensor"):
        call(kept=kept.long())
    with pytest.raises(ValueError, match=r"`score_v` must be a floating tensor \[B, N, H\]"):
        call(v=score_v[0])
    with pytest.raises(ValueError, match=r"`score_e` must be \[1 or B, M, H\]"):
        call(e=score_e.detach().expand(2, M, 2))
    with pytest.raises(TypeError, match="`score_e` has dtype"):
        call(e=score_e.detach().float())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernel_rejects_bad_values(backend, device):
    score_v, score_e, kept, plan, grouping = setup(device=device)
    args = list(raw_args(score_v.detach(), score_e.detach(), kept, plan, grouping))
    forward, backward = kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")
    errors = (RuntimeError, ValueError)
    bad = list(args)
    bad[2] = plan.metabolite_index.clone()
    bad[2][0] = N
    with pytest.raises(errors, match="`metabolite_index` has .*id .*outside"):
        forward(*bad)
    bad = list(args)
    bad[6] = args[6].clone()
    bad[6][0] = args[6][1]
    with pytest.raises(errors, match="`group_perm` must be a permutation"):
        forward(*bad)
    bad = list(args)
    bad[4] = kept[:, :-1]
    with pytest.raises(errors, match=r"`kept` must be \[B, nnz\]"):
        forward(*bad)
    alpha = forward(*args)
    bargs = [torch.randn_like(alpha), alpha, *args[:4], *args[5:]]
    bad = list(bargs)
    bad[9] = plan.metabolite_perm.clone()
    bad[9][0] = bad[9][1]
    with pytest.raises(errors, match="`metabolite_perm` must be a permutation"):
        backward(*bad)
    bad = list(bargs)
    bad[10] = plan.reaction_ptr[:-1]
    with pytest.raises(errors, match="`reaction_ptr` must have length"):
        backward(*bad)
