"""CUDA kernels of the stoich conv operator against the CPU kernel and the
pure-PyTorch reference (float64 where possible). Marked ``cuda``: they run
wherever a GPU is visible (``make gpu-check``) and are skipped only when none is."""

import pytest
import torch
from hypergraphs import random_hypergraph, random_keep

import stoichconv
from stoichconv.ops import build_stoich_plan, stoich_propagate
from stoichconv.reference import stoich_propagate_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]

DEV = "cuda"
N, M, NNZ = 9, 7, 30


@pytest.fixture(autouse=True)
def _needs_kernels():
    # A GPU is visible: a missing CUDA build is a failure, not a skip.
    assert stoichconv.has_cuda_kernels(), "stoichconv._C has no CUDA kernels; rebuild with FORCE_CUDA=1"


def make_inputs(B=3, H=2, C=5, seed=0, dtype=torch.float64, device=DEV, requires_grad=False):
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, N, H, C, generator=gen, dtype=dtype)
    weight = stoich.view(1, -1, 1) * torch.rand(B, NNZ, H, generator=gen, dtype=dtype)
    return (edge_index.to(device), stoich.to(device), y.to(device).requires_grad_(requires_grad),
            weight.to(device).requires_grad_(requires_grad))


def raw_args(y, weight, keep, plan):
    abs_s = plan.abs_stoich.to(y.dtype)
    return (y, weight, keep, plan.metabolite_index, plan.reaction_index, abs_s, *plan.structure()[2:])


def check_against_reference(edge_index, stoich, y, weight, keep, num_nodes, num_edges, tol):
    plan = build_stoich_plan(edge_index, stoich, num_nodes, num_edges)
    out = stoich_propagate(y, weight, plan, keep, backend="cuda")
    assert out.device.type == "cuda"
    yd, wd = (t.detach().double().requires_grad_() for t in (y, weight))
    sd = stoich.double()
    expected = stoich_propagate_reference(yd, wd, edge_index[0], edge_index[1], sd, num_edges, keep)
    torch.testing.assert_close(out.double(), expected.detach(), rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, weight), grad)
    want = torch.autograd.grad(expected, (yd, wd), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)
    return out, got


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("H,C", [(1, 64), (2, 5), (3, 8), (1, 130)])
def test_forward_backward_match_reference(dtype, tol, masked, H, C):
    edge_index, stoich, y, weight = make_inputs(B=3, H=H, C=C, dtype=dtype, requires_grad=True)
    keep = random_keep(3, M, seed=4).to(DEV) if masked else None
    check_against_reference(edge_index, stoich, y, weight, keep, N, M, tol)


@pytest.mark.parametrize("masked", [False, True])
def test_matches_cpu_kernel(masked):
    edge_index, stoich, y, weight = make_inputs(B=5, H=2, C=16, dtype=torch.float64)
    keep = random_keep(5, M, seed=7) if masked else None
    plan_cpu = build_stoich_plan(edge_index.cpu(), stoich.cpu(), N, M)
    plan_gpu = plan_cpu.to(DEV)
    args_cpu = raw_args(y.cpu(), weight.cpu(), keep, plan_cpu)
    args_gpu = raw_args(y, weight, keep.to(DEV) if masked else None, plan_gpu)
    got = torch.ops.stoichconv.stoich_conv_forward(*args_gpu)
    want = torch.ops.stoichconv.stoich_conv_forward(*args_cpu)
    for g, w in zip(got, want):  # out, hidden, node_norm, edge_norm
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)
    grad_out, grad_hidden = torch.randn_like(want[0]), torch.randn_like(want[1])
    bwd = lambda args, go, gh, fwd: torch.ops.stoichconv.stoich_conv_backward(  # noqa: E731
        go, gh, args[0], args[1], args[2], fwd[1], fwd[2], fwd[3], *args[3:5], *args[6:], True, True)
    got_b = bwd(args_gpu, grad_out.to(DEV), grad_hidden.to(DEV), got)
    want_b = bwd(args_cpu, grad_out, grad_hidden, want)
    for g, w in zip(got_b, want_b):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)


def test_long_rows_and_many_samples():
    """A hub metabolite with hundreds of incidences (the long-row path) and a
    batch that does not divide the samples-per-block tile."""
    gen = torch.Generator().manual_seed(11)
    n, m, nnz = 40, 300, 1500
    metabolites = torch.randint(0, n, (nnz,), generator=gen)
    metabolites[:600] = 0  # hub: 600 incidences
    reactions = torch.randint(0, m, (nnz,), generator=gen)
    reactions[600:700] = 5  # a long reaction row too
    stoich = torch.randn(nnz, generator=gen, dtype=torch.float64)
    edge_index = torch.stack([metabolites, reactions]).to(DEV)
    B = 7
    y = torch.randn(B, n, 1, 64, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    weight = torch.randn(B, nnz, 1, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    keep = random_keep(B, m, seed=3).to(DEV)
    check_against_reference(edge_index, stoich.to(DEV), y, weight, keep, n, m, 1e-11)


def test_spec_test_vector():
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float64, device=DEV)
    edge_index = torch.tensor([[0, 1, 2], [0, 0, 0]], device=DEV)
    stoich = torch.tensor([-1.0, -2.0, 1.0], dtype=torch.float64, device=DEV)
    plan = build_stoich_plan(edge_index, stoich, 4, 1)
    out = stoich_propagate(x.view(1, 4, 1, 3), stoich.view(1, 3, 1), plan, backend="cuda").view(4, 3)
    expected = torch.tensor([[0.25, 0.5, -0.25], [0.25, 0.5, -0.25], [-0.25, -0.5, 0.25], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-15)


def test_yeast_gem_batch_matches_reference():
    from stoichconv.data import load_yeast_gem

    net = load_yeast_gem()
    edge_index, stoich = net.incidence.to(DEV), net.stoich.double().to(DEV)
    n, m, nnz = net.num_metabolites, net.num_reactions, edge_index.size(1)
    B, C = 4, 64
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(B, n, 1, C, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    weight = (net.stoich.double().view(1, -1, 1) * torch.rand(B, nnz, 1, generator=gen, dtype=torch.float64))
    weight = weight.to(DEV).requires_grad_()
    keep = torch.rand(B, m, generator=gen) > 0.05
    keep[0] = True
    check_against_reference(edge_index, stoich, y, weight, keep.to(DEV), n, m, 1e-10)
    # float32 on the same graph, against the float64 reference
    check_against_reference(edge_index, stoich.float(), y.detach().float().requires_grad_(),
                            weight.detach().float().requires_grad_(), keep.to(DEV), n, m, 2e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked):
    edge_index, stoich, y, weight = make_inputs(B=2, H=2, C=3, requires_grad=True)
    keep = random_keep(2, M, seed=5).to(DEV) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    assert torch.autograd.gradcheck(lambda y, w: stoich_propagate(y, w, plan, keep, backend="cuda"), (y, weight))


def test_gradcheck_raw_op_including_hidden_output():
    edge_index, stoich, y, weight = make_inputs(B=2, H=1, C=4, requires_grad=True)
    keep = random_keep(2, M, seed=6).to(DEV)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    fn = lambda y, w: torch.ops.stoichconv.stoich_conv_forward(*raw_args(y, w, keep, plan))[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, weight))


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, save_hidden):
    edge_index, stoich, y, weight = make_inputs(B=2, requires_grad=True)
    keep = random_keep(2, M).to(DEV) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    args = raw_args(y, weight, keep, plan) + (save_hidden,)
    torch.library.opcheck(torch.ops.stoichconv.stoich_conv_forward.default, args)
    out, hidden, node_norm, edge_norm = torch.ops.stoichconv.stoich_conv_forward(*args)
    assert hidden.shape == ((2, M, 2, 5) if save_hidden else (0,))
    saved = [t.detach() for t in (y, weight, hidden, node_norm, edge_norm)]
    grad_hidden = torch.randn_like(saved[2]) if save_hidden else None
    bwd_args = (torch.randn_like(saved[0]), grad_hidden, saved[0], saved[1], keep, *saved[2:],
                *plan.structure(), True, True)
    torch.library.opcheck(torch.ops.stoichconv.stoich_conv_backward.default, bwd_args)


@pytest.mark.parametrize("masked", [False, True])
def test_unsaved_hidden_is_recomputed_bit_identically(masked):
    edge_index, stoich, y, weight = make_inputs(B=4, H=2, C=19, dtype=torch.float32, requires_grad=True)
    keep = random_keep(4, M, seed=8).to(DEV) if masked else None
    plan = build_stoich_plan(edge_index, stoich, N, M)
    results = []
    for save in (True, False):
        out = stoich_propagate(y, weight, plan, keep, backend="cuda", save_hidden=save)
        results.append((out, *torch.autograd.grad(out, (y, weight), torch.ones_like(out))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_deterministic_across_runs(dtype):
    from stoichconv.data import load_yeast_gem

    net = load_yeast_gem()
    plan = build_stoich_plan(net.incidence.to(DEV), net.stoich.to(dtype).to(DEV), net.num_metabolites, net.num_reactions)
    gen = torch.Generator().manual_seed(1)
    B = 3
    y = torch.randn(B, net.num_metabolites, 2, 32, generator=gen, dtype=dtype).to(DEV).requires_grad_()
    weight = torch.randn(B, plan.nnz, 2, generator=gen, dtype=dtype).to(DEV).requires_grad_()
    keep = (torch.rand(B, net.num_reactions, generator=gen) > 0.1).to(DEV)
    runs = []
    for _ in range(3):
        out = stoich_propagate(y, weight, plan, keep, backend="cuda")
        runs.append((out, *torch.autograd.grad(out.square().sum(), (y, weight))))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_empty_graph_and_empty_batch():
    y = torch.randn(2, 3, 1, 4, dtype=torch.float64, device=DEV)
    empty = torch.empty(2, 0, dtype=torch.long, device=DEV)
    plan = build_stoich_plan(empty, torch.empty(0, dtype=torch.float64, device=DEV), 3, 0)
    out = stoich_propagate(y, torch.empty(2, 0, 1, dtype=torch.float64, device=DEV), plan, backend="cuda")
    assert out.shape == y.shape and out.abs().max() == 0
    plan = build_stoich_plan(empty, torch.empty(0, dtype=torch.float64, device=DEV), 3, 2)
    assert stoich_propagate(y, torch.empty(2, 0, 1, dtype=torch.float64, device=DEV), plan, backend="cuda").abs().max() == 0
    edge_index, stoich, _, _ = make_inputs()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    out = stoich_propagate(torch.empty(0, N, 1, 2, dtype=torch.float64, device=DEV),
                           torch.empty(0, NNZ, 1, dtype=torch.float64, device=DEV), plan, backend="cuda")
    assert out.shape == (0, N, 1, 2)


def test_non_contiguous_inputs():
    edge_index, stoich, y, weight = make_inputs(B=3, H=2, C=8)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    y_nc = y.transpose(2, 3).contiguous().transpose(2, 3)
    assert not y_nc.is_contiguous()
    torch.testing.assert_close(stoich_propagate(y_nc, weight, plan, backend="cuda"),
                               stoich_propagate(y, weight, plan, backend="cuda"), rtol=0, atol=0)


def test_auto_backend_picks_cuda_on_gpu_tensors():
    from stoichconv.backends import resolve

    assert resolve("stoich_conv", "auto", torch.device(DEV)) == "cuda"


# ---------------------------------------------------------------- bad input


def test_cpu_backend_rejects_gpu_tensors():
    edge_index, stoich, y, weight = make_inputs()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    with pytest.raises(stoichconv.BackendUnavailableError, match="backend='cpu' runs CPU tensors"):
        stoich_propagate(y, weight, plan, backend="cpu")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda y, w, k: (y, w.cpu(), k), ValueError, "`weight` is on cpu"),
        (lambda y, w, k: (y, w, k.cpu()), ValueError, "`reaction_keep` is on cpu"),
        (lambda y, w, k: (y.cpu(), w.cpu(), k.cpu()), ValueError, "the plan is on cuda"),
        (lambda y, w, k: (y, w.float(), k), TypeError, "`weight` has dtype torch.float32"),
    ],
)
def test_propagate_rejects_device_mismatch(mutate, exc, match):
    edge_index, stoich, y, weight = make_inputs()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    y, weight, keep = mutate(y, weight, random_keep(3, M).to(DEV))
    with pytest.raises(exc, match=match):
        stoich_propagate(y, weight, plan, keep, backend="cuda")


def test_raw_op_rejects_mixed_devices():
    edge_index, stoich, y, weight = make_inputs()
    plan = build_stoich_plan(edge_index, stoich, N, M)
    args = list(raw_args(y, weight, None, plan))
    args[3] = args[3].cpu()  # metabolite_index on the CPU
    with pytest.raises(RuntimeError, match="`metabolite_index` is on cpu"):
        torch.ops.stoichconv.stoich_conv_forward(*args)
    args = list(raw_args(y, weight, None, plan))
    args[5] = args[5].cpu()  # abs_stoich on the CPU
    with pytest.raises(RuntimeError, match="`abs_stoich` is on cpu"):
        torch.ops.stoichconv.stoich_conv_forward(*args)
    with pytest.raises(RuntimeError, match="`weight` must be"):
        torch.ops.stoichconv.stoich_conv_forward(*raw_args(y, weight[:, :3], None, plan))
