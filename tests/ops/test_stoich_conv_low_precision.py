"""The stoich conv (stoichconv.ops.stoich_conv) in float16 and bfloat16 on every backend of its
table entry: the dtype rules of its docstring ("Dtypes").

Everything is compared with the float64 reference (:mod:`stoichconv.reference`) on the same
inputs upcast to float64, so a difference is only the op's own rounding. The bound is
``(rtol, atol) = tolerance(dtype, reduction_length)`` of :mod:`stoichconv.testing`, with the
longest CSR row as the reduction length (times C for the weight gradient's dot products), held
against the size of the terms behind each result, not the result itself:
``|got - want| <= rtol * scale + atol`` with ``scale`` the float64 reference run on ``|y|``,
``|weight|`` and ``|grad_out|`` (>= ``|want|``). A rounded intermediate (``hidden`` and ``R``
are stored in the 16-bit dtype, as the op's docstring says) carries an error relative to its own
size into every term of the sums that read it, so a result that cancels (a dot product over C
channels) is only accurate relative to its terms. That the sums run in float32 is checked by a
row whose first term dominates (:func:`test_small_terms_after_a_large_one_are_kept`): a 16-bit
running sum drops every later term there. Also: the dtypes of every
output of the raw operators (``out`` / ``hidden`` and the gradients in the input dtype, the
norms in float32), opcheck of both operators, bit-determinism of the CPU kernel across runs and
thread counts, the recomputed ``hidden`` equal to the saved one, refused mixed dtypes outside
autocast and the cast under ``torch.autocast``. Triton on CPU runs through the interpreter on
small graphs; its float32 -> bfloat16 conversion truncates (see the module docstring of
:mod:`stoichconv.ops.stoich_conv.triton_kernels`), which the bounds cover."""

import pytest
import torch

from stoichconv.ops import build_stoich_plan, stoich_conv
from stoichconv.reference import stoich_conv_reference
from stoichconv.testing import (
    assert_close,
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
ALL = backend_params(OP, reference=True)  # + reference-cpu, reference-cuda
NOT_INTERPRETED = backend_params(OP, exclude=("triton-cpu",))
LOW = (torch.bfloat16, torch.float16)
N, M, NNZ = 9, 7, 30


def make_inputs(B=3, H=2, C=5, dtype=torch.bfloat16, device="cpu", seed=0, masked=False, N=N, M=M, nnz=NNZ):
    """``(y, weight, plan, keep)``: ``y`` and ``weight = stoich * gate`` drawn in float64 and
    rounded to ``dtype``; the plan from the float64 stoichiometry; with ``masked`` a keep-mask
    dropping the reaction of incidence 0 in sample 0 and keeping the last sample whole."""
    edge_index, stoich = random_hypergraph(N, M, nnz, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, N, H, C, generator=gen, dtype=torch.float64)
    weight = stoich.view(1, -1, 1) * torch.rand(B, nnz, H, generator=gen, dtype=torch.float64)
    keep = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, edge_index[1, 0]] = False
        keep = keep.to(device)
    plan = build_stoich_plan(edge_index.to(device), stoich.to(device), N, M)
    return y.to(dtype).to(device), weight.to(dtype).to(device), plan, keep


def longest_row(plan) -> int:
    """The most incidences of one reaction or one metabolite: the longest sum of a stage."""
    return int(max(plan.reaction_ptr.diff().max(), plan.metabolite_ptr.diff().max(), 1))


def reference64(y, weight, plan, keep, grad_out, absolute=False):
    """``(out, grad_y, grad_weight)`` of the float64 reference on the upcast inputs; with
    ``absolute`` on their absolute values (the size of the terms behind each result)."""
    prepare = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())  # noqa: E731
    y64, w64 = (prepare(t).requires_grad_() for t in (y, weight))
    out = stoich_conv_reference(y64, w64, plan.metabolite_index, plan.reaction_index, plan.stoich.double(),
                                plan.num_reactions, keep)
    return (out.detach(), *torch.autograd.grad(out, (y64, w64), prepare(grad_out)))


def run(y, weight, plan, keep, grad_out, backend, save_hidden=None):
    """``(out, grad_y, grad_weight)`` of the op on ``backend``."""
    y, weight = y.detach().requires_grad_(), weight.detach().requires_grad_()
    out = stoich_conv(y, weight, plan, keep, backend=backend, save_hidden=save_hidden)
    return (out.detach(), *torch.autograd.grad(out, (y, weight), grad_out))


def assert_within_bound(got, want, scale, dtype, reduction_length, what):
    """``|got - want| <= rtol * scale + atol`` element-wise, ``(rtol, atol) = tolerance(dtype,
    reduction_length)`` (see the module docstring)."""
    rtol, atol = tolerance(dtype, reduction_length)
    got, want, scale = (t.detach().double().cpu() for t in (got, want, scale))
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    err = (got - want).abs()
    bad = err > rtol * scale + atol
    if bool(bad.any()):
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements off by more than {rtol:.3g} x "
                             f"|terms| + {atol:.3g}; first at {i}: got {float(got[i]):.6g}, want {float(want[i]):.6g}, "
                             f"|terms| {float(scale[i]):.3g}")


def assert_matches_reference(got, y, weight, plan, keep, grad_out, C):
    """``got = (out, grad_y, grad_weight)`` in the dtype of ``y`` and within the bound of the
    float64 reference: out and grad_y for the longest row, grad_weight for C times it."""
    dtype, L = y.dtype, longest_row(plan)
    want = reference64(y, weight, plan, keep, grad_out)
    scale = reference64(y, weight, plan, keep, grad_out, absolute=True)
    for name, a, b, size, length in zip(("out", "grad_y", "grad_weight"), got, want, scale, (L, L, C * L)):
        assert a.dtype == dtype, f"{name} is {a.dtype}, expected {dtype}"
        assert_within_bound(a, b, size, dtype, length, name)


def raw_args(y, weight, plan, keep, *save_hidden):
    """The raw forward's arguments, ``abs_stoich`` in the accumulate dtype (float32)."""
    mi, ri, rptr, rperm, mptr, mperm = plan.structure()
    return (y, weight, keep, mi, ri, plan.abs_stoich.float(), rptr, rperm, mptr, mperm, *save_hidden)


# --------------------------------------------------------------------------- against the float64 reference


SHAPES = [(3, 1, 3), (3, 2, 5), (2, 1, 37), (4, 2, 64)]  # B, H, C: C = 64 takes the wide CUDA loads
INTERPRETED_SHAPES = [(2, 2, 3)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device,B,H,C", backend_cases(ALL, SHAPES, INTERPRETED_SHAPES))
def test_forward_backward_match_float64_reference(backend, device, B, H, C, dtype, masked):
    y, weight, plan, keep = make_inputs(B=B, H=H, C=C, dtype=dtype, device=device, seed=H * 10 + C, masked=masked)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    grad_out = grad_out.to(device)
    got = run(y, weight, plan, keep, grad_out, backend)
    assert got[0].device == y.device
    assert bool((got[0][:, -1] == 0).all())  # the isolated metabolite outputs exactly 0
    assert_matches_reference(got, y, weight, plan, keep, grad_out, C)
    if masked:
        masked_cols = ~keep[:, plan.reaction_index]  # [B, nnz]
        assert bool((got[2][masked_cols] == 0).all())  # masked incidences get no weight gradient


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", NOT_INTERPRETED)
def test_long_rows_match_float64_reference(backend, device, dtype):
    # A hub metabolite with 200 incidences and a reaction with 60: sums far longer than the
    # 16-bit mantissa could hold without float32 accumulation.
    gen = torch.Generator().manual_seed(11)
    n, m, nnz = 20, 40, 400
    metabolites = torch.randint(0, n, (nnz,), generator=gen)
    metabolites[:200] = 0
    reactions = torch.randint(0, m, (nnz,), generator=gen)
    reactions[200:260] = 3
    stoich = torch.randn(nnz, generator=gen, dtype=torch.float64)
    plan = build_stoich_plan(torch.stack([metabolites, reactions]).to(device), stoich.to(device), n, m)
    B, C = 3, 16
    y = torch.randn(B, n, 1, C, generator=gen, dtype=torch.float64).to(dtype).to(device)
    weight = (stoich.view(1, -1, 1) * torch.rand(B, nnz, 1, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    keep = random_keep(B, m, seed=3, device=device)
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    got = run(y, weight, plan, keep, grad_out, backend)
    assert longest_row(plan) >= 200
    assert_matches_reference(got, y, weight, plan, keep, grad_out, C)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", ALL)
def test_small_terms_after_a_large_one_are_kept(backend, device, dtype):
    # Reaction 0 gathers metabolites 0..L-1 in that order, y = 1024 on metabolite 0 and 0.5 on
    # the others: a float16 / bfloat16 running sum stays at 1024 (1024 + 0.5 rounds back to
    # 1024), a float32 one reaches 1024 + (L - 1) / 2 (hidden off by 6 % at L = 129). Reactions
    # 1..L join the hub metabolite L with metabolite k - 1, so the hub's stage-2 row starts with
    # the large hidden[1]; grad_out = 1024 on metabolite 1 does the same to the backward's R[0].
    # All terms are positive: every result is within the bound relative to itself.
    L, C = 129, 4
    big = 1024.0
    mi = torch.cat([torch.arange(L), torch.full((L,), L), torch.arange(L)])
    ri = torch.cat([torch.zeros(L, dtype=torch.long), torch.arange(1, L + 1), torch.arange(1, L + 1)])
    stoich = torch.ones(mi.numel(), dtype=torch.float64)
    plan = build_stoich_plan(torch.stack([mi, ri]).to(device), stoich.to(device), L + 1, L + 1)
    y = torch.full((1, L + 1, 1, C), 0.5, dtype=torch.float64)
    grad_out = y.clone()
    y[:, 0] = big
    grad_out[:, 1] = big
    weight = torch.ones(1, mi.numel(), 1, dtype=torch.float64)
    y, weight, grad_out = (t.to(dtype).to(device) for t in (y, weight, grad_out))
    got = run(y, weight, plan, None, grad_out, backend)
    want = reference64(y, weight, plan, None, grad_out)
    hidden_0 = (big + (L - 1) / 2) / L  # a 16-bit running sum gives big / L
    assert float(want[0][0, 1, 0, 0]) == pytest.approx((hidden_0 + 0.5) / 2)  # out_1 = (hidden_0 + hidden_2) / 2
    for name, a, b, length in zip(("out", "grad_y", "grad_weight"), got, want, (2 * L, 2 * L, 2 * L * C)):
        assert a.dtype == dtype
        assert_close(a.double().cpu(), b.cpu(), dtype=dtype, reduction_length=length, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("isa", ["auto", "default"])  # AVX2+FMA kernels where the CPU has them; portable ones
@pytest.mark.parametrize("dtype", LOW)
def test_cpu_isa_variants_match_float64_reference(dtype, isa, monkeypatch):
    monkeypatch.setenv("STOICHCONV_CPU_ISA", isa)
    y, weight, plan, keep = make_inputs(C=37, dtype=dtype, masked=True)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    got = run(y, weight, plan, keep, grad_out, "cpu")
    assert_matches_reference(got, y, weight, plan, keep, grad_out, 37)


# --------------------------------------------------------------------------- raw operators: dtypes


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_raw_ops_output_dtypes_and_norms(backend, device, dtype, save_hidden):
    y, weight, plan, keep = make_inputs(B=2, H=2, C=3, dtype=dtype, device=device, masked=True)
    out, hidden, node_norm, edge_norm = kernel_op(OP, backend, device)(*raw_args(y, weight, plan, keep, save_hidden))
    assert out.dtype == dtype and hidden.dtype == dtype
    assert node_norm.dtype == torch.float32 and edge_norm.dtype == torch.float32
    assert hidden.shape == ((2, M, 2, 3) if save_hidden else (0,))
    # the norms are the float32 reciprocals of the kept degree sums (to float32 rounding)
    kept = keep[:, plan.reaction_index].double()
    abs_s = plan.stoich.abs().double() * kept
    deg_v = torch.zeros(2, N, dtype=torch.float64, device=device).index_add_(1, plan.metabolite_index, abs_s)
    deg_e = torch.zeros(2, M, dtype=torch.float64, device=device).index_add_(1, plan.reaction_index, abs_s)
    for norm, deg in ((node_norm, deg_v), (edge_norm, deg_e)):
        want = torch.where(deg > 0, 1 / deg.clamp_min(1e-300), torch.zeros_like(deg))
        assert_close(norm.double(), want, dtype=torch.float32, reduction_length=NNZ)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    grad_hidden = None
    if save_hidden:
        grad_hidden = torch.randn(hidden.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    backward = kernel_op(OP, backend, device, name="backward")
    for need_y, need_w in ((True, True), (True, False), (False, True)):
        grad_y, grad_w = backward(grad_out, grad_hidden, y, weight, keep, hidden, node_norm, edge_norm,
                                  *plan.structure(), need_y, need_w)
        assert grad_y.dtype == dtype and grad_w.dtype == dtype
        assert grad_y.shape == (y.shape if need_y else (0,)) and grad_w.shape == (weight.shape if need_w else (0,))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_raw_ops_refuse_statistics_in_the_input_dtype(backend, device, dtype):
    # abs_stoich and the norms are float32 for 16-bit features: the input dtype is refused,
    # naming the argument.
    y, weight, plan, keep = make_inputs(B=2, H=1, C=2, dtype=dtype, device=device, masked=True)
    forward = kernel_op(OP, backend, device)
    args = list(raw_args(y, weight, plan, keep))
    args[5] = args[5].to(dtype)
    error = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(error, match="`abs_stoich`"):
        forward(*args)
    out, hidden, node_norm, edge_norm = forward(*raw_args(y, weight, plan, keep))
    backward = kernel_op(OP, backend, device, name="backward")
    error = TypeError if backend == "triton" else RuntimeError
    for position, name in ((6, "node_norm"), (7, "edge_norm")):
        bwd_args = [torch.ones_like(out), None, y, weight, keep, hidden, node_norm, edge_norm, *plan.structure(),
                    True, True]
        bwd_args[position] = bwd_args[position].to(dtype)
        with pytest.raises(error, match=f"`{name}`"):
            backward(*bwd_args)


OPCHECK_CASES = [(dtype, masked, save) for dtype in LOW for masked, save in ((False, True), (True, False))]


@pytest.mark.parametrize("backend,device,dtype,masked,save_hidden", backend_cases(KERNELS, OPCHECK_CASES))
def test_opcheck(backend, device, dtype, masked, save_hidden):
    # opcheck runs the operators a dozen times: the interpreter gets one sample, one head
    B, H, C = (1, 1, 2) if is_interpreted(backend, device) else (2, 2, 5)
    small = dict(N=5, M=3, nnz=9) if backend == "triton" else {}
    y, weight, plan, keep = make_inputs(B=B, H=H, C=C, dtype=dtype, device=device, seed=4, masked=masked, **small)
    y, weight = y.requires_grad_(), weight.requires_grad_()
    forward, backward = kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")
    args = raw_args(y, weight, plan, keep, save_hidden)
    torch.library.opcheck(forward, args)
    with torch.no_grad():
        out, hidden, node_norm, edge_norm = forward(*args)
    assert out.dtype == dtype and node_norm.dtype == torch.float32
    saved = [t.detach() for t in (y, weight, hidden, node_norm, edge_norm)]
    grad_hidden = torch.randn_like(hidden) if save_hidden else None
    bwd_args = (torch.randn_like(out), grad_hidden, saved[0], saved[1], keep, *saved[2:], *plan.structure(), True, True)
    torch.library.opcheck(backward, bwd_args)


# --------------------------------------------------------------------------- determinism, recomputed hidden


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("B", [1, 4])  # B = 1: the CPU kernel splits rows over threads; B = 4: whole samples
def test_cpu_bit_deterministic_across_runs_and_threads(dtype, B):
    y, weight, plan, keep = make_inputs(B=B, H=2, C=33, dtype=dtype, masked=True)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2, 1):  # two runs with 2 threads, two with 1
            torch.set_num_threads(n)
            raw = kernel_op(OP, "cpu", "cpu")(*raw_args(y, weight, plan, keep))
            results.append((*run(y, weight, plan, keep, grad_out, "cpu"), *raw))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device,B", backend_cases(KERNELS, [(1,), (4,)], [(2,)]))
def test_unsaved_hidden_is_recomputed(backend, device, B, dtype):
    # save_hidden=False: the backward recomputes the stage-1 rows. The compiled kernels round
    # them to the input dtype exactly as the forward did, so every gradient equals the saving
    # path's bit for bit; the Triton backward folds the saved norms into the coefficients
    # (another float32 rounding before the same rounding to the input dtype): within the bound.
    y, weight, plan, keep = make_inputs(B=B, H=2, C=9, dtype=dtype, device=device, seed=8, masked=True)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grad_out = grad_out.to(device)
    saved = run(y, weight, plan, keep, grad_out, backend, save_hidden=True)
    recomputed = run(y, weight, plan, keep, grad_out, backend, save_hidden=False)
    for a, b in zip(saved, recomputed):
        if backend == "triton":
            assert_close(b, a, reduction_length=9 * longest_row(plan))
        else:
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- mixed dtypes, autocast


@pytest.mark.parametrize("y_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                             (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("backend,device", ALL)
def test_mixed_dtypes_are_refused_outside_autocast(backend, device, y_dtype, w_dtype):
    y, weight, plan, keep = make_inputs(dtype=torch.float64, device=device, masked=True)
    with pytest.raises(TypeError, match=rf"`weight` has dtype {w_dtype} but `y` has {y_dtype}"):
        stoich_conv(y.to(y_dtype), weight.to(w_dtype), plan, keep, backend=backend)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", ALL)
def test_autocast_casts_to_the_autocast_dtype(backend, device, dtype):
    # float32 leaves under torch.autocast: the op runs in the autocast dtype (output in it), the
    # answer is the float64 reference's on the cast inputs, and float32 gradients reach the leaves.
    y32, w32, plan, keep = make_inputs(dtype=torch.float32, device=device, masked=True, C=4)
    y32, w32 = y32.requires_grad_(), w32.requires_grad_()
    grad_out = torch.randn(y32.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    grad_out = grad_out.to(device)
    with torch.autocast(device.type, dtype=dtype):
        out = stoich_conv(y32, w32, plan, keep, backend=backend)
        mixed = stoich_conv(y32.to(dtype), w32, plan, keep, backend=backend)  # mixed inputs are cast too
    assert out.dtype == dtype and mixed.dtype == dtype
    assert torch.equal(out, mixed)
    grad_y, grad_w = torch.autograd.grad(out, (y32, w32), grad_out)
    assert grad_y.dtype == torch.float32 and grad_w.dtype == torch.float32
    # against the float64 reference on the inputs as autocast cast them
    got = (out.detach(), grad_y.to(dtype), grad_w.to(dtype))
    assert_matches_reference(got, y32.detach().to(dtype), w32.detach().to(dtype), plan, keep, grad_out, 4)
    # outside autocast the same float32 call stays float32
    assert stoich_conv(y32, w32, plan, keep, backend=backend).dtype == torch.float32


@pytest.mark.parametrize("backend,device", backend_params(OP, devices=("cuda",)))
def test_cuda_misaligned_low_precision_inputs(backend, device):
    # A contiguous view one element into its buffer (2-byte offset): the CUDA kernels fall back
    # from the 8-byte loads of four 16-bit channels to scalar loads; the answer stays within the bound.
    y, weight, plan, keep = make_inputs(B=2, H=2, C=64, dtype=torch.bfloat16, device=device, masked=True)
    buf = torch.empty(y.numel() + 1, dtype=y.dtype, device=device)
    misaligned = buf[1:].view_as(y).copy_(y)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_out = grad_out.to(torch.bfloat16).to(device)
    got = run(misaligned, weight, plan, keep, grad_out, backend)
    assert_matches_reference(got, y, weight, plan, keep, grad_out, 64)
