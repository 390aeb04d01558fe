"""The stoich conv operator (stoichconv.ops.stoich_conv) on every backend of its table entry
(cpu, cuda, triton on CPU through the interpreter and on the GPU, the reference where the
property is not a comparison with it), against an independent dense float64 formula, the
hand-computed test vector and the pure-PyTorch reference: forward and hand-written backward,
gradcheck, opcheck of every backend's operators in both dtypes, determinism, empty and
non-contiguous inputs, torch.compile and bad input. CUDA-only checks (device mismatches) at
the end. Triton runs tiny graphs (``TINY``) where a property calls the op many times."""

import pytest
import torch

import stoichconv
from stoichconv.backends import resolve
from stoichconv.ops import PlanCache, build_stoich_plan, stoich_conv, stoich_propagate
from stoichconv.reference import stoich_conv_reference
from stoichconv.testing import (
    backend_cases,
    backend_params,
    compact_metabolic_batch,
    is_interpreted,
    device_params,
    kernel_op,
    random_hypergraph,
    random_keep,
    spec_test_vector,
    tolerance,
)

OP = "stoich_conv"
KERNELS = backend_params(OP)  # cpu, cuda, triton-cpu, triton-cuda
ALL = backend_params(OP, reference=True)  # + reference-cpu, reference-cuda
NOT_CPU = [p for p in KERNELS if p.id != "cpu"]  # compared with the compiled CPU kernel
GPU_SIZED = backend_params(OP, exclude=("triton-cpu",))  # real-size graphs: not through the interpreter
CUDA_KERNELS = backend_params(OP, devices=("cuda",))

N, M, NNZ = 9, 7, 30
TINY = dict(N=5, M=3, nnz=9)  # for properties that call the op many times under the Triton interpreter


def tol(dtype):
    rtol, atol = tolerance(dtype)
    return dict(rtol=rtol, atol=atol)


def make_inputs(B=3, H=2, C=5, dtype=torch.float64, device="cpu", seed=0, masked=False, requires_grad=False,
                N=N, M=M, nnz=NNZ, zero_coefficient=False):
    """``(y, weight, plan, keep)`` on ``device``: weight = stoich * gate; with ``masked`` a
    reaction keep-mask that drops the reaction of incidence 0 in sample 0 (a masked reaction
    with incidences) and keeps the last sample whole."""
    edge_index, stoich = random_hypergraph(N, M, nnz, seed=seed, dtype=dtype, zero_coefficient=zero_coefficient)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, N, H, C, generator=gen, dtype=dtype)
    weight = stoich.view(1, -1, 1) * torch.rand(B, nnz, H, generator=gen, dtype=dtype)
    keep = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, edge_index[1, 0]] = False
        keep = keep.to(device)
    plan = build_stoich_plan(edge_index.to(device), stoich.to(device), N, M)
    return (y.to(device).requires_grad_(requires_grad), weight.to(device).requires_grad_(requires_grad), plan, keep)


def small(backend):
    """Graph size for the properties that call the op many times: tiny for Triton."""
    return TINY if backend == "triton" else {}


def raw_args(y, weight, plan, keep, *save_hidden):
    mi, ri, rptr, rperm, mptr, mperm = plan.structure()
    return (y, weight, keep, mi, ri, plan.abs_stoich.to(y.dtype), rptr, rperm, mptr, mperm, *save_hidden)


def reference(y, weight, plan, keep):
    return stoich_conv_reference(y, weight, plan.metabolite_index, plan.reaction_index, plan.stoich,
                                 plan.num_reactions, keep)


def dense_propagate(y, weight, edge_index, stoich, num_reactions, keep=None):
    """out[b] = D_b W_bh B_b W_bhᵀ y[b, :, h] with dense [N, M] matrices (float64, on the CPU)."""
    y, weight, edge_index, stoich = (t.detach().cpu() for t in (y, weight, edge_index, stoich))
    keep = None if keep is None else keep.cpu()
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


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("backend,device", ALL)
def test_spec_test_vector(backend, device):
    v = spec_test_vector(device=device)
    plan = build_stoich_plan(v.edge_index, v.stoich, v.num_nodes, v.num_edges)
    out = stoich_conv(v.x.view(1, 4, 1, 3), v.stoich.view(1, 3, 1), plan, backend=backend).view(4, 3)
    torch.testing.assert_close(out, v.expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", device_params())
def test_auto_backend_runs_the_device_kernel(device, monkeypatch):
    monkeypatch.delenv("STOICHCONV_BACKEND", raising=False)
    assert resolve(OP, "auto", device) == device.type
    v = spec_test_vector(device=device)
    plan = build_stoich_plan(v.edge_index, v.stoich, v.num_nodes, v.num_edges)
    out = stoich_propagate(v.x.view(1, 4, 1, 3), v.stoich.view(1, 3, 1), plan).view(4, 3)
    torch.testing.assert_close(out, v.expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,device", ALL)
def test_forward_matches_dense_formula(backend, device, masked, H):
    y, weight, plan, keep = make_inputs(H=H, device=device, masked=masked)
    out = stoich_conv(y, weight, plan, keep, backend=backend)
    edge_index = torch.stack([plan.metabolite_index, plan.reaction_index])
    expected = dense_propagate(y, weight, edge_index, plan.stoich, M, keep)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- against the reference


F32_F64 = (torch.float32, torch.float64)
SHAPES = [(3, H, C) for H, C in ((1, 3), (2, 4), (2, 5), (3, 8), (2, 37), (1, 64), (1, 130))]
INTERPRETED_SHAPES = [(2, 1, 3), (2, 2, 4), (2, 2, 5)]  # B, H, C


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", F32_F64)
@pytest.mark.parametrize("backend,device,B,H,C", backend_cases(KERNELS, SHAPES, INTERPRETED_SHAPES))
def test_forward_backward_match_reference(backend, device, B, H, C, dtype, masked):
    y, weight, plan, keep = make_inputs(B=B, H=H, C=C, dtype=dtype, device=device, seed=H * 10 + C, masked=masked,
                                        requires_grad=True, zero_coefficient=True)
    out = stoich_conv(y, weight, plan, keep, backend=backend)
    assert out.device == y.device and out.dtype == dtype
    assert bool((out[:, -1] == 0).all())  # the isolated metabolite outputs exactly 0
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, weight), grad)
    # the reference in the same dtype and in float64 (the ground truth)
    ref = reference(y, weight, plan, keep)
    torch.testing.assert_close(out, ref, **tol(dtype))
    for g, w in zip(got, torch.autograd.grad(ref, (y, weight), grad)):
        torch.testing.assert_close(g, w, **tol(dtype))
    yd, wd = (t.detach().double().requires_grad_() for t in (y, weight))
    ref64 = reference(yd, wd, plan, keep)
    torch.testing.assert_close(out.double(), ref64.detach(), **tol(dtype))
    for g, w in zip(got, torch.autograd.grad(ref64, (yd, wd), grad.double())):
        torch.testing.assert_close(g.double(), w, **tol(dtype))
    if masked:
        masked_cols = ~keep[:, plan.reaction_index]  # [B, nnz]
        assert bool((got[1][masked_cols] == 0).all())  # masked incidences get no weight gradient


@pytest.mark.parametrize("isa", ["auto", "default"])  # AVX2+FMA kernels where the CPU has them; portable ones
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_isa_variants_match_reference(dtype, masked, isa, monkeypatch):
    monkeypatch.setenv("STOICHCONV_CPU_ISA", isa)
    y, weight, plan, keep = make_inputs(C=37, dtype=dtype, masked=masked, requires_grad=True)
    out = stoich_conv(y, weight, plan, keep, backend="cpu")
    expected = reference(y, weight, plan, keep)
    torch.testing.assert_close(out, expected, **tol(dtype))
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (y, weight), grad), torch.autograd.grad(expected, (y, weight), grad)):
        torch.testing.assert_close(g, w, **tol(dtype))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", F32_F64)
@pytest.mark.parametrize("backend,device,B,H,C", backend_cases(NOT_CPU, [(2, 2, 3), (5, 2, 16)], [(2, 2, 3)]))
def test_raw_ops_match_compiled_cpu(backend, device, B, H, C, dtype, masked):
    # Every output of the forward (out, hidden, node_norm, edge_norm) and every gradient request
    # of the backward, fed with the CPU forward's outputs and with the backend's own.
    y, weight, plan, keep = make_inputs(B=B, H=H, C=C, dtype=dtype, seed=7, masked=masked)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    dev_plan = plan.to(device)
    cpu = torch.ops.stoichconv.stoich_conv_forward(*raw_args(y, weight, plan, keep))
    got = kernel_op(OP, backend, device)(*raw_args(to(y), to(weight), dev_plan, to(keep)))
    for a, b in zip(got, cpu):
        assert a.device.type == device.type
        torch.testing.assert_close(a.cpu(), b, **tol(dtype))
    backward = kernel_op(OP, backend, device, name="backward")
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(cpu[0].shape, generator=g, dtype=dtype)
    grad_hidden = torch.randn(cpu[1].shape, generator=g, dtype=dtype)
    for gh, need_y, need_w in ((None, True, True), (grad_hidden, True, True), (grad_hidden, True, False),
                               (grad_hidden, False, True), (None, False, False)):
        want = torch.ops.stoichconv.stoich_conv_backward(grad_out, gh, y, weight, keep, *cpu[1:], *plan.structure(),
                                                         need_y, need_w)
        # the CPU forward's outputs, and the backend's own (the interpreter: for one request)
        own = backend != "triton" or device.type != "cpu" or (gh is not None and need_y and need_w)
        for forward in (tuple(map(to, cpu)), got) if own else (tuple(map(to, cpu)),):
            gy, gw = backward(to(grad_out), to(gh), to(y), to(weight), to(keep), *forward[1:], *dev_plan.structure(),
                              need_y, need_w)
            assert gy.shape == want[0].shape and gw.shape == want[1].shape
            assert (gy.numel() > 0) == need_y and (gw.numel() > 0) == need_w
            torch.testing.assert_close(gy.cpu(), want[0], **tol(dtype))
            torch.testing.assert_close(gw.cpu(), want[1], **tol(dtype))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_long_rows_and_wide_channels(backend, device):
    # A currency metabolite with 3 x 16 incidences, a reaction with 2.5 x 16, and C > 128
    # (two channel blocks of the Triton kernels).
    n, m = 8, 5
    mi = torch.cat([torch.zeros(48, dtype=torch.long), torch.arange(1, 8).repeat(2)])
    ri = torch.cat([torch.arange(48) % 4, torch.full((14,), 4)])
    ri[:40] = torch.where(torch.arange(40) % 2 == 0, 3, ri[:40])
    stoich = torch.linspace(-2.0, 2.0, mi.numel(), dtype=torch.float64)
    plan = build_stoich_plan(torch.stack([mi, ri]).to(device), stoich.to(device), n, m)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, n, 1, 130, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    weight = (stoich[None, :, None] * 1.0).to(device).requires_grad_(True)
    out = stoich_conv(y, weight, plan, backend=backend)
    ref = reference(y, weight, plan, None)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (y, weight), grad), torch.autograd.grad(ref, (y, weight), grad)):
        torch.testing.assert_close(a, b, **tol(torch.float64))


def check_against_float64_reference(backend, edge_index, stoich, y, weight, keep, num_nodes, num_edges, atol):
    plan = build_stoich_plan(edge_index, stoich, num_nodes, num_edges)
    out = stoich_conv(y, weight, plan, keep, backend=backend)
    assert out.device == y.device
    yd, wd = (t.detach().double().requires_grad_() for t in (y, weight))
    expected = stoich_conv_reference(yd, wd, edge_index[0], edge_index[1], stoich.double(), num_edges, keep)
    torch.testing.assert_close(out.double(), expected.detach(), rtol=atol, atol=atol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, weight), grad)
    want = torch.autograd.grad(expected, (yd, wd), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=atol, atol=atol)


@pytest.mark.parametrize("backend,device", GPU_SIZED)
def test_long_rows_and_many_samples(backend, device):
    """A hub metabolite with hundreds of incidences (the long-row path) and a batch that does
    not divide the samples-per-block tile of the CUDA kernel."""
    gen = torch.Generator().manual_seed(11)
    n, m, nnz = 40, 300, 1500
    metabolites = torch.randint(0, n, (nnz,), generator=gen)
    metabolites[:600] = 0  # hub: 600 incidences
    reactions = torch.randint(0, m, (nnz,), generator=gen)
    reactions[600:700] = 5  # a long reaction row too
    stoich = torch.randn(nnz, generator=gen, dtype=torch.float64)
    B = 7
    y = torch.randn(B, n, 1, 64, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(B, nnz, 1, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    keep = random_keep(B, m, seed=3, device=device)
    check_against_float64_reference(backend, torch.stack([metabolites, reactions]).to(device), stoich.to(device), y,
                                    weight, keep, n, m, 1e-11)


@pytest.fixture(scope="module")
def yeast_gem():
    from stoichconv.data import load_yeast_gem

    return load_yeast_gem()


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", GPU_SIZED)
def test_yeast_gem_batch_matches_reference(backend, device, yeast_gem):
    net = yeast_gem
    edge_index, stoich = net.incidence.to(device), net.stoich.double().to(device)
    n, m, nnz = net.num_metabolites, net.num_reactions, edge_index.size(1)
    B, C = 4, 64
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(B, n, 1, C, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = net.stoich.double().view(1, -1, 1) * torch.rand(B, nnz, 1, generator=gen, dtype=torch.float64)
    weight = weight.to(device).requires_grad_()
    keep = torch.rand(B, m, generator=gen) > 0.05
    keep[0] = True
    check_against_float64_reference(backend, edge_index, stoich, y, weight, keep.to(device), n, m, 1e-10)
    # float32 on the same graph, against the float64 reference
    check_against_float64_reference(backend, edge_index, stoich.float(), y.detach().float().requires_grad_(),
                                    weight.detach().float().requires_grad_(), keep.to(device), n, m, 2e-4)


# --------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck(backend, device, masked, save_hidden):
    y, weight, plan, keep = make_inputs(B=2, H=2, C=2 if backend == "triton" else 3, device=device, seed=11,
                                        masked=masked, requires_grad=True, **small(backend))
    fn = lambda y, w: stoich_conv(y, w, plan, keep, backend=backend, save_hidden=save_hidden)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, weight), fast_mode=backend == "triton")


@pytest.mark.parametrize("weight_grad", [True, False])
def test_cpu_saves_hidden_by_default_only_when_the_weight_gradient_needs_it(weight_grad):
    B, H, C = 3, 2, 5
    y, weight, plan, keep = make_inputs(B=B, H=H, C=C, masked=True)
    y.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = stoich_conv(y, weight, plan, keep, backend="cpu")
    assert ((B, plan.num_reactions, H, C) in saved) == weight_grad
    out.sum().backward()  # either way the same gradient as the reference
    want = torch.autograd.grad(stoich_conv(y, weight, plan, keep, backend="reference").sum(), y)[0]
    torch.testing.assert_close(y.grad, want)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck_raw_op_including_hidden_output(backend, device):
    # Differentiating through both `out` and `hidden` exercises grad_hidden in the backward op.
    H, C = (2, 2) if backend == "triton" else (1, 3)
    y, weight, plan, keep = make_inputs(B=2, H=H, C=C, device=device, seed=5, masked=True, requires_grad=True,
                                        **small(backend))
    forward = kernel_op(OP, backend, device)
    fn = lambda y, w: forward(*raw_args(y, w, plan, keep))[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, weight), fast_mode=backend == "triton")


OPCHECK_CASES = [(torch.float64, masked, save) for masked in (False, True) for save in (True, False)]
OPCHECK_CASES += [(torch.float32, True, True), (torch.float32, False, False)]


@pytest.mark.parametrize("backend,device,dtype,masked,save_hidden", backend_cases(KERNELS, OPCHECK_CASES))
def test_opcheck(backend, device, dtype, masked, save_hidden):
    # opcheck runs the operators a dozen times: the interpreter gets one sample, one head
    B, H, C = (1, 1, 2) if is_interpreted(backend, device) else (2, 2, 3) if backend == "triton" else (2, 2, 5)
    y, weight, plan, keep = make_inputs(B=B, H=H, C=C, dtype=dtype, device=device, seed=4, masked=masked,
                                        requires_grad=True, **small(backend))
    forward, backward = kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")
    args = raw_args(y, weight, plan, keep, save_hidden)
    torch.library.opcheck(forward, args)
    with torch.no_grad():
        out, hidden, node_norm, edge_norm = forward(*args)
    assert hidden.shape == ((B, plan.num_reactions, H, C) if save_hidden else (0,))
    saved = [t.detach() for t in (y, weight, hidden, node_norm, edge_norm)]
    grad_hidden = torch.randn_like(hidden) if save_hidden else None
    bwd_args = (torch.randn_like(out), grad_hidden, saved[0], saved[1], keep, *saved[2:], *plan.structure(), True, True)
    torch.library.opcheck(backward, bwd_args)


# --------------------------------------------------------------------------- saved / recomputed hidden


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", F32_F64)
@pytest.mark.parametrize("backend,device,B,C", backend_cases(KERNELS, [(1, 19), (4, 19)], [(2, 5)]))
def test_unsaved_hidden_is_recomputed(backend, device, B, C, dtype, masked):
    # save_hidden=False: the forward returns an empty `hidden` and the backward recomputes the
    # stage-1 rows. The compiled kernels recompute them with the same code, so every output and
    # gradient equals the saving path's bit for bit; the Triton backward folds the saved edge
    # norms into the coefficients (another rounding), so it agrees to the dtype's tolerance.
    # B = 1: the CPU kernel splits rows over threads; B = 4: whole samples per thread
    y, weight, plan, keep = make_inputs(B=B, H=2, C=C, dtype=dtype, device=device, seed=8, masked=masked,
                                        requires_grad=True)
    exact = backend != "triton"
    same = (lambda a, b: torch.equal(a, b)) if exact else (  # noqa: E731
        lambda a, b: torch.testing.assert_close(a, b, **tol(dtype)) or True)
    results = []
    for save in (True, False):
        out = stoich_conv(y, weight, plan, keep, backend=backend, save_hidden=save)
        results.append((out, *torch.autograd.grad(out, (y, weight), torch.ones_like(out))))
    for a, b in zip(*results):
        assert same(a, b)
    weight_only = stoich_conv(y.detach(), weight, plan, keep, backend=backend, save_hidden=False)
    (gw,) = torch.autograd.grad(weight_only, weight, torch.ones_like(weight_only))
    assert same(gw, results[1][2])
    with torch.no_grad():
        _, hidden, _, _ = kernel_op(OP, backend, device)(*raw_args(y, weight, plan, keep, False))
    assert hidden.shape == (0,)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_backward_rejects_grad_hidden_without_saved_hidden(backend, device):
    y, weight, plan, keep = make_inputs(B=2, device=device, masked=True)
    out, hidden, node_norm, edge_norm = kernel_op(OP, backend, device)(*raw_args(y, weight, plan, keep, False))
    error = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(error, match="`grad_hidden` given but `hidden` was not saved"):
        kernel_op(OP, backend, device, name="backward")(
            torch.ones_like(y), torch.ones(2, M, 2, 5, dtype=y.dtype, device=device), y, weight, keep, hidden,
            node_norm, edge_norm, *plan.structure(), True, True)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend,device,B,C", backend_cases(KERNELS, [(1, 33), (4, 33)], [(3, 5)]))
def test_deterministic_across_runs_and_threads(backend, device, B, C):
    # Bit-identical outputs and gradients run to run (CPU: 1 thread, all threads, 1 again); the
    # raw forward's four outputs too.
    # B = 1: the CPU kernel splits rows over threads; B = 4: whole samples per thread
    y, weight, plan, keep = make_inputs(B=B, H=2, C=C, dtype=torch.float32, device=device, masked=True,
                                        requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            out = stoich_conv(y, weight, plan, keep, backend=backend)
            raw = kernel_op(OP, backend, device)(*raw_args(y.detach(), weight.detach(), plan, keep))
            results.append((out, *torch.autograd.grad(out.square().sum(), (y, weight)), *raw))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", GPU_SIZED)
def test_bit_deterministic_on_yeast_gem(backend, device, dtype, yeast_gem):
    net = yeast_gem
    plan = build_stoich_plan(net.incidence.to(device), net.stoich.to(dtype).to(device), net.num_metabolites,
                             net.num_reactions)
    gen = torch.Generator().manual_seed(1)
    B = 3
    y = torch.randn(B, net.num_metabolites, 2, 32, generator=gen, dtype=dtype).to(device).requires_grad_()
    weight = torch.randn(B, plan.nnz, 2, generator=gen, dtype=dtype).to(device).requires_grad_()
    keep = (torch.rand(B, net.num_reactions, generator=gen) > 0.1).to(device)
    runs = []
    for _ in range(3):
        out = stoich_conv(y, weight, plan, keep, backend=backend)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (y, weight))))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- invariants, layouts


@pytest.mark.parametrize("backend,device", ALL)
def test_invariants_zero_stoich_isolated_and_permutation(backend, device):
    y, weight, plan, _ = make_inputs(device=device)
    edge_index = torch.stack([plan.metabolite_index, plan.reaction_index])
    out = stoich_conv(y, weight, plan, backend=backend)
    assert out[:, N - 1].abs().max() == 0  # isolated metabolite
    zero_plan = build_stoich_plan(edge_index, torch.zeros_like(plan.stoich), N, M)
    assert stoich_conv(y, torch.zeros_like(weight), zero_plan, backend=backend).abs().max() == 0
    perm = torch.randperm(NNZ, generator=torch.Generator().manual_seed(3)).to(device)
    permuted = build_stoich_plan(edge_index[:, perm], plan.stoich[perm], N, M)
    torch.testing.assert_close(stoich_conv(y, weight[:, perm], permuted, backend=backend), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL)
def test_batch_equals_per_sample_runs_and_compacted_layout(backend, device):
    y, weight, plan, _ = make_inputs(B=4, device=device)
    keep = random_keep(4, M, seed=2, device=device)
    batched = stoich_conv(y, weight, plan, keep, backend=backend)
    for b in range(4):
        single = stoich_conv(y[b : b + 1], weight[b : b + 1], plan, keep[b : b + 1], backend=backend)
        if device.type == "cpu":  # the same sums in the same order
            torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=0)
        else:  # GPU kernels may tile samples together (and the reference scatters with atomics)
            torch.testing.assert_close(batched[b : b + 1], single, **tol(torch.float64))
    # compacted block-diagonal graph, B = 1: keep incidences of kept reactions, metabolites
    # offset by b*N, reactions renumbered by kept counts
    edge_index = torch.stack([plan.metabolite_index, plan.reaction_index])
    compact, compact_stoich, _ = compact_metabolic_batch(edge_index, plan.stoich, keep, N)
    sample, k = keep[:, edge_index[1]].nonzero(as_tuple=True)
    compact_plan = build_stoich_plan(compact, compact_stoich, 4 * N, int(keep.sum()))
    compact_out = stoich_conv(y.reshape(1, 4 * N, *y.shape[2:]), weight[sample, k].unsqueeze(0), compact_plan,
                              backend=backend)
    torch.testing.assert_close(compact_out.view_as(batched), batched, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL)
def test_empty_graph_and_empty_batch(backend, device):
    f64 = dict(dtype=torch.float64, device=device)
    no_incidences = torch.empty(2, 0, dtype=torch.long, device=device)
    y = torch.randn(2, 3, 1, 4, **f64)
    for num_reactions in (0, 2, 3):  # nnz = 0, with and without reactions
        plan = build_stoich_plan(no_incidences, torch.empty(0, **f64), 3, num_reactions)
        out = stoich_conv(y, torch.empty(2, 0, 1, **f64), plan, backend=backend)
        assert out.shape == y.shape and bool((out == 0).all())
    no_nodes = build_stoich_plan(no_incidences, torch.empty(0, **f64), 0, 2)
    out = stoich_conv(torch.empty(1, 0, 1, 4, **f64), torch.empty(1, 0, 1, **f64), no_nodes, backend=backend)
    assert out.shape == (1, 0, 1, 4)
    _, _, plan, _ = make_inputs(device=device)
    out = stoich_conv(torch.empty(0, N, 1, 2, **f64), torch.empty(0, NNZ, 1, **f64), plan, backend=backend)
    assert out.shape == (0, N, 1, 2)
    if backend != "reference":  # the raw forward at B = 0: every output shaped
        y0, w0, plan, _ = make_inputs(B=2, H=1, C=3, device=device)
        out, hidden, node_norm, edge_norm = kernel_op(OP, backend, device)(*raw_args(y0[:0], w0[:0], plan, None))
        assert out.shape == (0, N, 1, 3) and hidden.shape == (0, M, 1, 3)
        assert node_norm.shape == (1, N) and edge_norm.shape == (1, M)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_non_contiguous_inputs(backend, device):
    y, weight, plan, keep = make_inputs(B=3, H=2, C=8, device=device, seed=8, masked=True)
    # a transposed view: exactly the contiguous run
    y_t = y.transpose(2, 3).contiguous().transpose(2, 3)
    assert not y_t.is_contiguous()
    torch.testing.assert_close(stoich_conv(y_t, weight, plan, keep, backend=backend),
                               stoich_conv(y, weight, plan, keep, backend=backend), rtol=0, atol=0)
    # other strides for y and weight, with gradients, against the reference
    y_nc = y.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    w_nc = weight.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not y_nc.is_contiguous() and not w_nc.is_contiguous()
    out = stoich_conv(y_nc, w_nc, plan, keep, backend=backend)
    y_c, w_c = y.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference(y_c, w_c, plan, keep)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (y_nc, w_nc), grad), torch.autograd.grad(ref, (y_c, w_c), grad)):
        torch.testing.assert_close(a, b, **tol(torch.float64))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_torch_compile_fullgraph(backend, device):
    # Dynamo traces through the op (fake kernel + registered autograd): same values and
    # gradients as eager and as the reference.
    y, weight, plan, keep = make_inputs(B=2, H=2, C=3, device=device, seed=1, masked=True, requires_grad=True,
                                        **small(backend))
    fn = lambda a, b: stoich_conv(a, b, plan, keep, backend=backend).sin()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, eager = compiled(y, weight), fn(y, weight)
    ref = reference(y, weight, plan, keep).sin()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    got = torch.autograd.grad(out.square().sum(), (y, weight))
    for want in (torch.autograd.grad(eager.square().sum(), (y, weight)),
                 torch.autograd.grad(ref.square().sum(), (y, weight))):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tol(torch.float64))


def test_plan_cache_never_serves_a_stale_plan():
    edge_index, stoich = random_hypergraph(N, M, NNZ)
    cache = PlanCache()
    plan = cache.get(edge_index, stoich, N, M)
    assert cache.get(edge_index, stoich, N, M) is plan
    assert cache.get(edge_index.clone(), stoich, N, M) is not plan  # another graph object
    stoich.mul_(2)  # in-place change of the same tensor
    replanned = cache.get(edge_index, stoich, N, M)
    assert replanned is not plan and torch.equal(replanned.stoich, stoich)
    assert cache.get(edge_index, stoich, N, M + 1).num_reactions == M + 1


# --------------------------------------------------------------------------- bad input


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
    edge_index, stoich = mutate(*random_hypergraph(N, M, NNZ))
    with pytest.raises(exc, match=match):
        build_stoich_plan(edge_index, stoich, N, M)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda y, w, k: (y[0], w, k), ValueError, r"`y` must be a tensor of shape \[B, N, H, C\]"),
        (lambda y, w, k: (y.long(), w, k), TypeError, "`y` must be float16, bfloat16, float32 or float64"),
        (lambda y, w, k: (y[:, :-1], w, k), ValueError, "`y` has N = 8 metabolites but the plan has 9"),
        (lambda y, w, k: (y, w[:, :-1], k), ValueError, r"`weight` must have shape \[B, nnz, H\]"),
        (lambda y, w, k: (y, w.float(), k), TypeError, "`weight` has dtype torch.float32"),
        (lambda y, w, k: (y, w.to("meta"), k), ValueError, "`weight` is on meta"),
        (lambda y, w, k: (y, w, k.long()), TypeError, "`reaction_keep` must be a bool tensor"),
        (lambda y, w, k: (y, w, k[:, :-1]), ValueError, r"`reaction_keep` must have shape \[B, M\]"),
        (lambda y, w, k: (y, w, k.to("meta")), ValueError, "`reaction_keep` is on meta"),
    ],
)
@pytest.mark.parametrize("backend,device", ALL)
def test_propagate_rejects_bad_input(backend, device, mutate, exc, match):
    y, weight, plan, _ = make_inputs(device=device)
    y, weight, keep = mutate(y, weight, random_keep(3, M, device=device))
    with pytest.raises(exc, match=match):
        stoich_conv(y, weight, plan, keep, backend=backend)


def test_propagate_rejects_plan_on_other_device():
    y, weight, plan, _ = make_inputs()
    with pytest.raises(ValueError, match="the plan is on meta"):
        stoich_propagate(y, weight, plan.to("meta"))


def _raw_mutations(backend, device):
    """(argument position, mutation, exception, match) of the raw-op bad-input checks of one
    backend: the compiled ops raise RuntimeError from C++, the Triton ops Python errors."""
    triton = backend == "triton"

    def ptr_end(p):
        p = p.clone()
        p[-1] += 5
        return p

    def index_out_of_range(i):
        i = i.clone()
        i[0] = N + 3
        return i

    def perm_out_of_range(p):
        p = p.clone()
        p[0] = NNZ
        return p

    table = [(1, lambda w: w[:, :3], ValueError, "`weight`") if triton else
             (1, lambda w: w[:, :3], RuntimeError, "`weight` must be")]
    if triton:  # Python checks, wherever the tensors are
        table += [
            (2, lambda k: k.long(), TypeError, "`reaction_keep`"),
            (5, lambda a: a.float(), ValueError, "`abs_stoich`"),
            ((0, 1), lambda t: t.to(torch.float8_e5m2), TypeError, "`y` must be float16, bfloat16, float32 or float64"),
        ]
    if device.type == "cpu":  # value checks (a host sync on a GPU)
        table += [
            (6, ptr_end, ValueError if triton else RuntimeError, "`reaction_ptr` must start at 0 and end at nnz"),
            (3, index_out_of_range, ValueError if triton else RuntimeError,
             "`metabolite_index` has values out of range" if triton else "`metabolite_index` out of range"),
            (7, perm_out_of_range, ValueError if triton else RuntimeError, "`reaction_perm`"),
        ]
    if device.type == "cpu" and not triton:
        table += [
            (2, lambda k: k.long(), RuntimeError, "`reaction_keep` must be bool"),
            (5, lambda a: a.float(), RuntimeError, "`abs_stoich` must be 1-D of length nnz with the dtype of `y`"),
            ((0, 1), lambda t: t.to(torch.float8_e5m2), RuntimeError,
             "`y` must be float16, bfloat16, float32 or float64"),
        ]
    return table


@pytest.mark.parametrize("backend,device", KERNELS)
def test_raw_op_rejects_bad_input(backend, device):
    y, weight, plan, keep = make_inputs(device=device, masked=True)
    forward = kernel_op(OP, backend, device)
    for position, mutate, exc, match in _raw_mutations(backend, device):
        positions = position if isinstance(position, tuple) else (position,)
        args = [mutate(a) if i in positions else a for i, a in enumerate(raw_args(y, weight, plan, keep))]
        with pytest.raises(exc, match=match):
            forward(*args)


# --------------------------------------------------------------------------- CUDA only: devices


@pytest.mark.parametrize("device", device_params(("cuda",)))
def test_cpu_backend_rejects_gpu_tensors(device):
    y, weight, plan, _ = make_inputs(device=device)
    with pytest.raises(stoichconv.BackendUnavailableError, match="backend='cpu' runs CPU tensors"):
        stoich_conv(y, weight, plan, backend="cpu")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda y, w, k: (y, w.cpu(), k), ValueError, "`weight` is on cpu"),
        (lambda y, w, k: (y, w, k.cpu()), ValueError, "`reaction_keep` is on cpu"),
        (lambda y, w, k: (y.cpu(), w.cpu(), k.cpu()), ValueError, "the plan is on cuda"),
        (lambda y, w, k: (y, w.float(), k), TypeError, "`weight` has dtype torch.float32"),
    ],
)
@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_propagate_rejects_device_mismatch(backend, device, mutate, exc, match):
    y, weight, plan, _ = make_inputs(device=device)
    y, weight, keep = mutate(y, weight, random_keep(3, M, device=device))
    with pytest.raises(exc, match=match):
        stoich_conv(y, weight, plan, keep, backend=backend)


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_raw_op_rejects_mixed_devices(backend, device):
    y, weight, plan, _ = make_inputs(device=device)
    forward = kernel_op(OP, backend, device)
    error = ValueError if backend == "triton" else RuntimeError
    for position, name in ((3, "metabolite_index"), (5, "abs_stoich")):
        args = list(raw_args(y, weight, plan, None))
        args[position] = args[position].cpu()
        with pytest.raises(error, match=f"`{name}` is on cpu"):
            forward(*args)
    with pytest.raises(error, match="`weight` must" if backend == "triton" else "`weight` must be"):
        forward(*raw_args(y, weight[:, :3], plan, None))
