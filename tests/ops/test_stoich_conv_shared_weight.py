"""The stoich conv with one weight shared by the batch (review finding 6 of issue 13):
``weight`` [1, nnz, H] (or [nnz, H] at the Python API) on every backend, never expanded, and
``grad_weight`` in the weight's own shape, the batch sum reduced inside the kernel in sample
order. Against the float64 reference on the expanded weight (every dtype), gradcheck in
float64, opcheck of the raw operators in every dtype, bit determinism, empty batches and bad
shapes. Also the CUDA kernels' reduction schedule (review finding 7), read from the compiled
extension's ``_stoich_row_splits`` hook: the very header function the GPU kernels run."""

import pytest
import torch

from stoichconv.ops import build_stoich_plan, stoich_conv
from stoichconv.reference import stoich_conv_reference
from stoichconv.testing import (
    backend_cases,
    backend_params,
    is_interpreted,
    kernel_op,
    random_hypergraph,
    random_keep,
    tolerance,
)

OP = "stoich_conv"
KERNELS = backend_params(OP)  # cpu, cuda, triton-cpu, triton-cuda
ALL = backend_params(OP, reference=True)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
N, M, NNZ = 9, 7, 30
TINY = dict(N=5, M=3, nnz=9)


def make_inputs(B=3, H=2, C=5, dtype=torch.float64, device="cpu", seed=0, masked=False, N=N, M=M, nnz=NNZ):
    """``(y, weight, plan, keep)``: weight = stoich * alpha [1, nnz, H], one for the whole batch."""
    edge_index, stoich = random_hypergraph(N, M, nnz, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, N, H, C, generator=gen, dtype=torch.float64)
    weight = stoich.view(1, -1, 1) * torch.rand(1, nnz, H, generator=gen, dtype=torch.float64)
    keep = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        if B:
            keep[0, edge_index[1, 0]] = False
        keep = keep.to(device)
    plan = build_stoich_plan(edge_index.to(device), stoich.to(dtype if dtype in (torch.float32, torch.float64)
                                                              else torch.float32).to(device), N, M)
    return y.to(dtype).to(device), weight.to(dtype).to(device), plan, keep


def run(y, weight, plan, keep, grad, backend, save_hidden=None):
    y, weight = y.detach().requires_grad_(), weight.detach().requires_grad_()
    out = stoich_conv(y, weight, plan, keep, backend=backend, save_hidden=save_hidden)
    return (out.detach(), *torch.autograd.grad(out, (y, weight), grad))


def reference64(y, weight, plan, keep, grad, absolute=False):
    """The float64 reference on the weight expanded to [B, nnz, H] (autograd sums its gradient
    over the batch): ``(out, grad_y, grad_weight [1, nnz, H])``; with ``absolute`` on the
    absolute values (the size of the terms behind each result)."""
    prep = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())  # noqa: E731
    y64, w64 = (prep(t).requires_grad_() for t in (y, weight))
    w_full = w64.reshape(1, plan.nnz, -1).expand(y.shape[0], plan.nnz, -1)
    out = stoich_conv_reference(y64, w_full, plan.metabolite_index, plan.reaction_index, plan.stoich.double(),
                                plan.num_reactions, keep)
    return (out.detach(), *torch.autograd.grad(out, (y64, w64), prep(grad)))


def longest_row(plan) -> int:
    return int(max(plan.reaction_ptr.diff().max(), plan.metabolite_ptr.diff().max(), 1))


def assert_matches_float64(got, y, weight, plan, keep, grad):
    """Element-wise ``|got - want| <= rtol * |terms| + atol`` with ``tolerance(dtype, length)``:
    the longest row for out / grad_y, C x row x B for the batch-summed grad_weight."""
    dtype, L = y.dtype, longest_row(plan)
    B, C = y.shape[0], y.shape[3]
    want = reference64(y, weight, plan, keep, grad)
    scale = reference64(y, weight, plan, keep, grad, absolute=True)
    for name, a, b, s, length in zip(("out", "grad_y", "grad_weight"), got, want, scale, (L, L, C * L * max(B, 1))):
        assert a.dtype == dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        rtol, atol = tolerance(dtype, length)
        err = (a.detach().double().cpu() - b.cpu()).abs()
        bound = rtol * s.cpu() + atol
        assert bool((err <= bound).all()), f"{name}: max error {float(err.max()):.3g} over the bound"


SHAPES = [(1, 2, 5), (3, 2, 5), (4, 1, 16)]


def _with_dtypes(params, dtypes):
    return backend_cases(params, [(*shape, d) for shape in SHAPES for d in dtypes],
                         [(3, 2, 5, d) for d in dtypes])


# the kernels in every dtype; the reference in float32 / float64 (its low-precision runs are
# compared in test_stoich_conv_low_precision)
SHARED_WEIGHT_CASES = (_with_dtypes([p for p in ALL if p.values[0] != "reference"], DTYPES)
                       + _with_dtypes([p for p in ALL if p.values[0] == "reference"], DTYPES[:2]))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,device,B,H,C,dtype", SHARED_WEIGHT_CASES)
def test_shared_weight_matches_float64_reference(backend, device, B, H, C, dtype, masked):
    y, weight, plan, keep = make_inputs(B, H, C, dtype, device, seed=B + 10 * H, masked=masked)
    grad = torch.randn(y.shape, dtype=torch.float64).to(dtype).to(device)
    got = run(y, weight, plan, keep, grad, backend)
    assert got[2].shape == (1, plan.nnz, H)  # the weight's own shape, not [B, nnz, H]
    assert_matches_float64(got, y, weight, plan, keep, grad)


@pytest.mark.parametrize("backend,device", ALL)
def test_two_dimensional_weight_and_expanded_weight_agree(backend, device):
    """[nnz, H] at the API is [1, nnz, H]; both equal the expanded [B, nnz, H] weight (the
    gradient summed over the batch) up to rounding."""
    y, weight, plan, keep = make_inputs(3, 2, 4, torch.float64, device, seed=3, masked=True)
    grad = torch.randn_like(y)
    three = run(y, weight, plan, keep, grad, backend)
    two = run(y, weight[0], plan, keep, grad, backend)
    full = run(y, weight.expand(3, -1, -1).contiguous(), plan, keep, grad, backend)
    assert two[2].shape == (plan.nnz, 2)
    for a, b in zip(three[:2], two[:2]):
        assert torch.equal(a, b)
    assert torch.equal(three[2][0], two[2])
    rtol, atol = tolerance(torch.float64)
    for a, b in zip(three[:2], full[:2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    torch.testing.assert_close(three[2], full[2].sum(0, keepdim=True), rtol=rtol, atol=atol)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck_shared_weight(backend, device, masked, save_hidden):
    small = TINY if backend == "triton" else {}
    y, weight, plan, keep = make_inputs(3, 2, 2 if backend == "triton" else 3, torch.float64, device, seed=11,
                                        masked=masked, **small)
    y, weight = y.requires_grad_(), weight.requires_grad_()
    fn = lambda y, w: stoich_conv(y, w, plan, keep, backend=backend, save_hidden=save_hidden)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, weight), fast_mode=backend == "triton")
    fn2 = lambda y, w: stoich_conv(y, w, plan, keep, backend=backend, save_hidden=save_hidden)  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (y, weight[0].detach().clone().requires_grad_()),
                                    fast_mode=backend == "triton")


def raw_args(y, weight, plan, keep, save_hidden):
    from stoichconv.ops._dtypes import accumulate_dtype

    mi, ri, rptr, rperm, mptr, mperm = plan.structure()
    return (y, weight, keep, mi, ri, plan.abs_stoich.to(accumulate_dtype(y.dtype)), rptr, rperm, mptr, mperm,
            save_hidden)


OPCHECK = [(dtype, masked, save) for dtype in DTYPES for masked, save in ((False, True), (True, False))]


@pytest.mark.parametrize("backend,device,dtype,masked,save_hidden",
                         backend_cases(KERNELS, OPCHECK, [c for c in OPCHECK if c[1]]))
def test_opcheck_shared_weight(backend, device, dtype, masked, save_hidden):
    B, H, C = (2, 1, 2) if is_interpreted(backend, device) else (3, 2, 5)
    small = TINY if backend == "triton" else {}
    y, weight, plan, keep = make_inputs(B, H, C, dtype, device, seed=4, masked=masked, **small)
    forward, backward = kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")
    args = raw_args(y.requires_grad_(), weight.requires_grad_(), plan, keep, save_hidden)
    torch.library.opcheck(forward, args)
    with torch.no_grad():
        out, hidden, node_norm, edge_norm = forward(*args)
    grad_hidden = torch.randn_like(hidden) if save_hidden else None
    bwd = (torch.randn_like(out), grad_hidden, y.detach(), weight.detach(), keep, hidden, node_norm, edge_norm,
           *plan.structure(), True, True)
    torch.library.opcheck(backward, bwd)
    grad_y, grad_weight = backward(*bwd)
    assert grad_weight.shape == weight.shape == (1, plan.nnz, H)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_shared_weight_is_bit_deterministic(backend, device, save_hidden):
    """Run to run and, on the CPU, across thread counts: 1 and 3 threads take whole samples
    per thread (B = 5 >= threads), 8 the row schedule (B < threads); the shared weight's batch
    sum has one order in all of them."""
    small = TINY if backend == "triton" else {}
    y, weight, plan, keep = make_inputs(5, 2, 7, torch.float32, device, seed=8, masked=True, **small)
    grad = torch.randn_like(y)
    first = run(y, weight, plan, keep, grad, backend, save_hidden=save_hidden)
    threads = torch.get_num_threads()
    try:
        for n in ((1, 3, 8) if device.type == "cpu" and backend == "cpu" else (threads,)):
            torch.set_num_threads(n)
            again = run(y, weight, plan, keep, grad, backend, save_hidden=save_hidden)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_shared_weight_saved_and_recomputed_hidden_agree(backend, device, save_hidden):
    """The CPU kernel's two schedules (whole samples per thread, B >= threads; rows otherwise)
    and the saved / recomputed hidden give the same shared-weight gradient."""
    small = TINY if backend == "triton" else {}
    y, weight, plan, keep = make_inputs(6, 2, 3, torch.float64, device, seed=9, masked=True, **small)
    grad = torch.randn_like(y)
    threads = torch.get_num_threads()
    try:
        for n in ((1, 16) if backend == "cpu" else (threads,)):
            torch.set_num_threads(n)
            got = run(y, weight, plan, keep, grad, backend, save_hidden=save_hidden)
            assert_matches_float64(got, y, weight, plan, keep, grad)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", ALL)
def test_empty_batch_gives_a_zero_gradient_of_the_weight_shape(backend, device):
    y, weight, plan, keep = make_inputs(0, 2, 3, torch.float64, device, seed=1, masked=True)
    got = run(y, weight, plan, keep, torch.zeros_like(y), backend)
    assert got[0].shape == y.shape and got[2].shape == weight.shape
    assert bool((got[2] == 0).all())


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("shape", [(2, NNZ, 2), (1, NNZ + 1, 2), (1, NNZ, 3), (NNZ, 3), (NNZ * 2,)],
                         ids=["B2-of-3", "nnz+1", "H+1", "2d-H+1", "1d"])
def test_bad_weight_shapes_name_weight(backend, device, shape):
    y, weight, plan, keep = make_inputs(3, 2, 3, torch.float64, device, seed=2)
    with pytest.raises(ValueError, match="`weight`"):
        stoich_conv(y, torch.zeros(shape, dtype=y.dtype, device=device), plan, keep, backend=backend)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_raw_op_refuses_bad_weight_shape_naming_weight(backend, device):
    y, weight, plan, keep = make_inputs(3, 2, 3, torch.float64, device, seed=2)
    forward = kernel_op(OP, backend, device)
    bad = torch.zeros(2, plan.nnz, 2, dtype=y.dtype, device=device)
    with pytest.raises((ValueError, RuntimeError), match="`weight`"):
        forward(*raw_args(y, bad, plan, keep, True))


# --------------------------------------------------------------------------- CUDA reduction schedule


def test_cuda_row_schedule_properties():
    """The split count of a CSR row (stoichconv/stoich_conv_schedule.h, review finding 7): a
    function of the row length alone (the hook takes nothing else: no vector width, alignment,
    H, C or batch size), 1 for the short rows (sequential, the CPU kernels' order; these rows
    are the ones the packed kernel takes, finding 3), else a power of two in [2, 16] that grows
    with the length and leaves every split at least 4 incidences below the cap."""
    from stoichconv import _C

    assert _C._stoich_row_splits(0) == 1
    previous = 1
    for length in range(0, 3000):
        p = _C._stoich_row_splits(length)
        assert p == _C._stoich_row_splits(length)  # a pure function
        assert 1 <= p <= 16 and (p & (p - 1)) == 0, (length, p)
        assert p >= previous, (length, p, previous)
        previous = p
        if length <= 16:
            assert p == 1, (length, p)
        else:
            assert p >= 2
            if p < 16:
                assert length >= 4 * p, (length, p)
    assert _C._stoich_row_splits(1000) == 16
    with pytest.raises(ValueError, match="row_length"):
        _C._stoich_row_splits(-1)
    with pytest.raises(TypeError):
        _C._stoich_row_splits("8")
