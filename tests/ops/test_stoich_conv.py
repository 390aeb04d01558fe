"""The stoich conv operator (C++ CPU kernel, hand-written backward) against an
independent dense float64 formula and the pure-PyTorch reference."""

import pytest
import torch
from hypergraphs import random_hypergraph, random_keep

import stoichconv
from stoichconv.ops import PlanCache, build_stoich_plan, stoich_propagate
from stoichconv.reference import stoich_propagate_reference

pytestmark = pytest.mark.skipif(not stoichconv.has_compiled_kernels(), reason="stoichconv._C not built")

N, M, NNZ = 9, 7, 30


def dense_propagate(y, weight, edge_index, stoich, num_reactions, keep=None):
    """out[b] = D_b W_bh B_b W_bhᵀ y[b, :, h] with dense [N, M] matrices (float64)."""
    B, n, H, C = y.shape
    out = torch.zeros(B, n, H, C, dtype=torch.float64)
    for b in range(B):
        kept = torch.ones(edge_index.size(1), dtype=torch.bool) if keep is None else keep[b, edge_index[1]]
        abs_s = torch.zeros(n, num_reactions, dtype=torch.float64)
        for k in range(edge_index.size(1)):
            if kept[k]:
                abs_s[edge_index[0, k], edge_index[1, k]] += abs(float(stoich[k]))
        inv = lambda d: torch.where(d > 0, 1 / d.clamp_min(1e-300), torch.zeros_like(d))  # noqa: E731
        D, Bn = torch.diag(inv(abs_s.sum(1))), torch.diag(inv(abs_s.sum(0)))
        for h in range(H):
            W = torch.zeros(n, num_reactions, dtype=torch.float64)
            for k in range(edge_index.size(1)):
                if kept[k]:
                    W[edge_index[0, k], edge_index[1, k]] += weight[b, k, h].double()
            out[b, :, h] = D @ W @ Bn @ W.T @ y[b, :, h].double()
    return out


def make_inputs(B=3, H=2, C=5, seed=0, dtype=torch.float64, requires_grad=False):
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, N, H, C, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    weight = (stoich.view(1, -1, 1) * torch.rand(B, NNZ, H, generator=gen, dtype=dtype)).requires_grad_(requires_grad)
    return edge_index, stoich, y, weight


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("H", [1, 2])
def test_forward_matches_dense_formula(masked, H):
    edge_index, stoich, y, weight = make_inputs(H=H)
    keep = random_keep(3, M) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    out = stoich_propagate(y, weight, plan, keep, backend="cpu")
    torch.testing.assert_close(out, dense_propagate(y, weight, edge_index, stoich, M, keep), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("isa", ["auto", "default"])  # AVX2+FMA kernels where the CPU has them; portable ones
def test_forward_and_backward_match_reference(dtype, tol, masked, isa, monkeypatch):
    monkeypatch.setenv("STOICHCONV_CPU_ISA", isa)
    edge_index, stoich, y, weight = make_inputs(C=37, dtype=dtype, requires_grad=True)
    keep = random_keep(3, M, seed=4) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    out = stoich_propagate(y, weight, plan, keep, backend="cpu")
    expected = stoich_propagate_reference(y, weight, edge_index[0], edge_index[1], stoich, M, keep)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, weight), grad)
    want = torch.autograd.grad(expected, (y, weight), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_spec_test_vector():
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 2], [0, 0, 0]])
    stoich = torch.tensor([-1.0, -2.0, 1.0], dtype=torch.float64)
    plan = build_stoich_plan(edge_index, stoich, 4, 1)
    y, w = x.view(1, 4, 1, 3), stoich.view(1, 3, 1)
    out = stoich_propagate(y, w, plan).view(4, 3)
    expected = torch.tensor([[0.25, 0.5, -0.25], [0.25, 0.5, -0.25], [-0.25, -0.5, 0.25], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_invariants_zero_stoich_isolated_and_permutation():
    edge_index, stoich, y, weight = make_inputs()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    out = stoich_propagate(y, weight, plan)
    assert out[:, N - 1].abs().max() == 0  # isolated metabolite
    zero_plan = build_stoich_plan(edge_index, torch.zeros_like(stoich), N, M)
    assert stoich_propagate(y, torch.zeros_like(weight), zero_plan).abs().max() == 0
    perm = torch.randperm(NNZ, generator=torch.Generator().manual_seed(3))
    permuted = build_stoich_plan(edge_index[:, perm], stoich[perm], N, M)
    torch.testing.assert_close(stoich_propagate(y, weight[:, perm], permuted), out, rtol=1e-12, atol=1e-12)


def test_batch_equals_per_sample_runs_and_compacted_layout():
    edge_index, stoich, y, weight = make_inputs(B=4)
    keep = random_keep(4, M, seed=2)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    batched = stoich_propagate(y, weight, plan, keep)
    for b in range(4):
        single = stoich_propagate(y[b : b + 1], weight[b : b + 1], plan, keep[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=0)
    # compacted block-diagonal graph, B = 1: keep incidences of kept reactions,
    # metabolites offset by b*N, reactions renumbered by kept counts
    inc_keep = keep[:, edge_index[1]]
    sample, k = inc_keep.nonzero(as_tuple=True)
    new_reaction = torch.cumsum(keep.reshape(-1).long(), 0) - 1
    compact = torch.stack([edge_index[0, k] + sample * N, new_reaction[sample * M + edge_index[1, k]]])
    compact_plan = build_stoich_plan(compact, stoich[k], 4 * N, int(keep.sum()))
    compact_out = stoich_propagate(y.reshape(1, 4 * N, *y.shape[2:]), weight[sample, k].unsqueeze(0), compact_plan)
    torch.testing.assert_close(compact_out.view_as(batched), batched, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked, save_hidden):
    edge_index, stoich, y, weight = make_inputs(B=2, H=2, C=3, requires_grad=True)
    keep = random_keep(2, M, seed=5) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    fn = lambda y, w: stoich_propagate(y, w, plan, keep, backend="cpu", save_hidden=save_hidden)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, weight))


def test_gradcheck_raw_op_including_hidden_output():
    edge_index, stoich, y, weight = make_inputs(B=2, H=1, C=3, requires_grad=True)
    keep = random_keep(2, M, seed=6)
    plan = build_stoich_plan(edge_index, stoich, N, M)

    def fn(y, w):
        out, hidden, _, _ = torch.ops.stoichconv.stoich_conv_forward(y, w, keep, plan.metabolite_index, plan.reaction_index, plan.abs_stoich, plan.reaction_ptr, plan.reaction_perm, plan.metabolite_ptr, plan.metabolite_perm)
        return out, hidden

    assert torch.autograd.gradcheck(fn, (y, weight))


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, save_hidden):
    edge_index, stoich, y, weight = make_inputs(B=2, requires_grad=True)
    keep = random_keep(2, M) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    args = (y, weight, keep, plan.metabolite_index, plan.reaction_index, plan.abs_stoich, *plan.structure()[2:],
            save_hidden)
    torch.library.opcheck(torch.ops.stoichconv.stoich_conv_forward.default, args)
    out, hidden, node_norm, edge_norm = torch.ops.stoichconv.stoich_conv_forward(*args)
    assert hidden.shape == ((2, M, 2, 5) if save_hidden else (0,))
    saved = [t.detach() for t in (y, weight, hidden, node_norm, edge_norm)]
    grad_hidden = torch.randn_like(saved[2]) if save_hidden else None
    bwd_args = (torch.randn_like(saved[0]), grad_hidden, saved[0], saved[1], keep, *saved[2:],
                *plan.structure(), True, True)
    torch.library.opcheck(torch.ops.stoichconv.stoich_conv_backward.default, bwd_args)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B", [1, 4])  # rows split over threads / whole samples per thread
def test_unsaved_hidden_is_recomputed_bit_identically(B, masked):
    # save_hidden=False: the forward keeps the stage-1 rows only in scratch and
    # the backward recomputes them with the same code, so every output and
    # gradient equals the saving path's exactly.
    edge_index, stoich, y, weight = make_inputs(B=B, H=2, C=19, dtype=torch.float32, requires_grad=True)
    keep = random_keep(B, M, seed=8) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    results = []
    for save in (True, False):
        out = stoich_propagate(y, weight, plan, keep, backend="cpu", save_hidden=save)
        results.append((out, *torch.autograd.grad(out, (y, weight), torch.ones_like(out))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    weight_only = stoich_propagate(y.detach(), weight, plan, keep, backend="cpu", save_hidden=False)
    (gw,) = torch.autograd.grad(weight_only, weight, torch.ones_like(weight_only))
    assert torch.equal(gw, results[1][2])


def test_backward_rejects_grad_hidden_without_saved_hidden():
    edge_index, stoich, y, weight = make_inputs(B=2)
    keep = random_keep(2, M)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    args = (y, weight, keep, plan.metabolite_index, plan.reaction_index, plan.abs_stoich, *plan.structure()[2:], False)
    out, hidden, node_norm, edge_norm = torch.ops.stoichconv.stoich_conv_forward(*args)
    with pytest.raises(RuntimeError, match="`grad_hidden` given but `hidden` was not saved"):
        torch.ops.stoichconv.stoich_conv_backward(torch.ones_like(y), torch.ones(2, M, 2, 5, dtype=y.dtype), y, weight,
                                                  keep, hidden, node_norm, edge_norm, *plan.structure(), True, True)


def test_torch_compile_smoke():
    edge_index, stoich, y, weight = make_inputs(B=2, requires_grad=True)
    keep = random_keep(2, M)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    fn = lambda y, w: stoich_propagate(y, w, plan, keep, backend="cpu").square().sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(y, weight), fn(y, weight))
    got = torch.autograd.grad(compiled(y, weight), (y, weight))
    want = torch.autograd.grad(fn(y, weight), (y, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("B", [1, 4])  # B = 1: rows split over threads; B = 4: whole samples per thread
def test_cpu_kernel_is_deterministic_across_runs_and_threads(B):
    edge_index, stoich, y, weight = make_inputs(B=B, H=2, C=33, dtype=torch.float32, requires_grad=True)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    keep = random_keep(B, M)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            out = stoich_propagate(y, weight, plan, keep)
            results.append((out, *torch.autograd.grad(out.square().sum(), (y, weight))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_empty_graph_and_empty_batch():
    y = torch.randn(2, 3, 1, 4, dtype=torch.float64)
    plan = build_stoich_plan(torch.empty(2, 0, dtype=torch.long), torch.empty(0, dtype=torch.float64), 3, 0)
    out = stoich_propagate(y, torch.empty(2, 0, 1, dtype=torch.float64), plan)
    assert out.shape == y.shape and out.abs().max() == 0
    no_nodes = build_stoich_plan(torch.empty(2, 0, dtype=torch.long), torch.empty(0, dtype=torch.float64), 0, 2)
    assert stoich_propagate(torch.empty(1, 0, 1, 4, dtype=torch.float64), torch.empty(1, 0, 1, dtype=torch.float64), no_nodes).shape == (1, 0, 1, 4)
    edge_index, stoich, _, _ = make_inputs()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    assert stoich_propagate(torch.empty(0, N, 1, 2, dtype=torch.float64), torch.empty(0, NNZ, 1, dtype=torch.float64), plan).shape == (0, N, 1, 2)


def test_plan_cache_never_serves_a_stale_plan():
    edge_index, stoich, _, _ = make_inputs()
    cache = PlanCache()
    plan = cache.get(edge_index, stoich, N, M)
    assert cache.get(edge_index, stoich, N, M) is plan
    assert cache.get(edge_index.clone(), stoich, N, M) is not plan  # another graph object
    stoich.mul_(2)  # in-place change of the same tensor
    replanned = cache.get(edge_index, stoich, N, M)
    assert replanned is not plan and torch.equal(replanned.stoich, stoich)
    assert cache.get(edge_index, stoich, N, M + 1).num_reactions == M + 1


# ---------------------------------------------------------------- bad input


def _plan_args():
    edge_index, stoich, y, weight = make_inputs()
    return edge_index, stoich, y, weight


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda e, s: (e.float(), s), TypeError, "`edge_index` must hold integer"),
        (lambda e, s: (e[:1], s), ValueError, r"`edge_index` must have shape \[2, nnz\]"),
        (lambda e, s: (e, s[:-1]), ValueError, "`stoich` must have shape"),
        (lambda e, s: (e, s.long()), TypeError, "`stoich` must be a floating"),
        (lambda e, s: (e, torch.where(torch.arange(NNZ) == 3, float("nan"), s)), ValueError, "`stoich` contains NaN or inf"),
        (lambda e, s: (e, torch.where(torch.arange(NNZ) == 3, float("inf"), s)), ValueError, "`stoich` contains NaN or inf"),
        (lambda e, s: (torch.where(torch.arange(NNZ) == 0, -1, e), s), ValueError, "`edge_index` contains negative"),
        (lambda e, s: (torch.stack([e[0].clamp_max(0) + N, e[1]]), s), ValueError, r"`edge_index\[0\]` \(metabolites\) has id"),
        (lambda e, s: (torch.stack([e[0], e[1].clamp_max(0) + M]), s), ValueError, r"`edge_index\[1\]` \(reactions\) has id"),
        (lambda e, s: (e, s.to("meta")), ValueError, "`stoich` is on meta"),
    ],
)
def test_build_plan_rejects_bad_input(mutate, exc, match):
    edge_index, stoich, _, _ = _plan_args()
    edge_index, stoich = mutate(edge_index, stoich)
    with pytest.raises(exc, match=match):
        build_stoich_plan(edge_index, stoich, N, M)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda y, w, k: (y[0], w, k), ValueError, r"`y` must be a tensor of shape \[B, N, H, C\]"),
        (lambda y, w, k: (y.long(), w, k), TypeError, "`y` must be float32 or float64"),
        (lambda y, w, k: (y[:, :-1], w, k), ValueError, "`y` has N = 8 metabolites but the plan has 9"),
        (lambda y, w, k: (y, w[:, :-1], k), ValueError, r"`weight` must have shape \[B, nnz, H\]"),
        (lambda y, w, k: (y, w.float(), k), TypeError, "`weight` has dtype torch.float32"),
        (lambda y, w, k: (y, w.to("meta"), k), ValueError, "`weight` is on meta"),
        (lambda y, w, k: (y, w, k.long()), TypeError, "`reaction_keep` must be a bool tensor"),
        (lambda y, w, k: (y, w, k[:, :-1]), ValueError, r"`reaction_keep` must have shape \[B, M\]"),
        (lambda y, w, k: (y, w, k.to("meta")), ValueError, "`reaction_keep` is on meta"),
    ],
)
def test_propagate_rejects_bad_input(backend, mutate, exc, match):
    edge_index, stoich, y, weight = _plan_args()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    y, weight, keep = mutate(y, weight, random_keep(3, M))
    with pytest.raises(exc, match=match):
        stoich_propagate(y, weight, plan, keep, backend=backend)


def test_propagate_rejects_plan_on_other_device():
    edge_index, stoich, y, weight = _plan_args()
    plan = build_stoich_plan(edge_index, stoich, N, M).to("meta")
    with pytest.raises(ValueError, match="the plan is on meta"):
        stoich_propagate(y, weight, plan)


def test_raw_op_checks_hand_made_structure():
    edge_index, stoich, y, weight = _plan_args()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    bad_ptr = plan.reaction_ptr.clone()
    bad_ptr[-1] += 5
    with pytest.raises(RuntimeError, match="`reaction_ptr` must start at 0 and end at nnz"):
        torch.ops.stoichconv.stoich_conv_forward(y, weight, None, plan.metabolite_index, plan.reaction_index, plan.abs_stoich, bad_ptr, plan.reaction_perm, plan.metabolite_ptr, plan.metabolite_perm)
    bad_index = plan.metabolite_index.clone()
    bad_index[0] = N + 3
    with pytest.raises(RuntimeError, match="`metabolite_index` out of range"):
        torch.ops.stoichconv.stoich_conv_forward(y, weight, None, bad_index, plan.reaction_index, plan.abs_stoich, *plan.structure()[2:])
    with pytest.raises(RuntimeError, match="`weight` must be"):
        torch.ops.stoichconv.stoich_conv_forward(y, weight[:, :3], None, plan.metabolite_index, plan.reaction_index, plan.abs_stoich, *plan.structure()[2:])
