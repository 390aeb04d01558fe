"""float16 and bfloat16 in the grouped softmax (stoichconv.ops.group_softmax) and the fused GATv2
attention (stoichconv.ops.gatv2), on every backend of their table entries (the dtype rules: the
two op docstrings): forward and backward against float64 on the same inputs upcast, within
``stoichconv.testing.tolerance`` of the dtype and the longest sum; result dtypes; bit-identical
C++ CPU results across runs and thread counts; opcheck of the four operators; the compiled
kernels' dtype errors; mixed dtypes refused outside autocast, cast under it.

The backward is compared at the inputs it receives. The kernel backends' backward reads the
``alpha`` their forward stored, rounded to the dtype; sums over many edges with cancellation
(``grad_att`` sums over every edge) amplify that rounding beyond any bound of the dtype, so
their gradients are compared with the float64 backward formula of the op docstring
(:func:`softmax_backward64`, :func:`gatv2_backward64`) at that stored ``alpha``, upcast. The
reference keeps ``alpha`` in float32 inside, so its gradients are compared with the float64
reference's. :func:`test_float64_formulas_match_the_reference` holds the formulas to the
reference in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from stoichconv.ops import build_stoich_plan
from stoichconv.ops.gatv2 import gatv2_attention, gatv2_backward, gatv2_forward
from stoichconv.ops.group_softmax import group_softmax
from stoichconv.reference.gatv2 import gatv2_attention_reference
from stoichconv.reference.group_softmax import group_softmax_reference
from stoichconv.testing import (
    assert_close,
    backend_cases,
    backend_params,
    is_interpreted,
    kernel_op,
    random_edge_set,
    random_hypergraph,
    random_keep,
)
from stoichconv.types import EdgeSet

LOW = [torch.bfloat16, torch.float16]
OPS = torch.ops.stoichconv

N, M, NNZ = 9, 7, 30


# --------------------------------------------------------------------------- inputs


def softmax_setup(B=3, H=2, dtype=torch.bfloat16, mode="node", masked=True, seed=0, device="cpu"):
    """(logits [B, nnz, H] of ``dtype``, kept, (group, G, ptr, perm)) on a stoich plan's grouping,
    with a masked reaction that has incidences."""
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = torch.Generator().manual_seed(seed + 1)
    logits = (3 * torch.randn(B, NNZ, H, generator=g)).to(dtype)
    kept = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, plan.reaction_index[0]] = False
        kept = keep[:, plan.reaction_index].to(device)
    if mode == "node":
        grouping = (plan.reaction_index, M, plan.reaction_ptr, plan.reaction_perm)
    else:
        grouping = (plan.metabolite_index, N, plan.metabolite_ptr, plan.metabolite_perm)
    return logits.to(device).requires_grad_(True), kept, tuple(t.to(device) if torch.is_tensor(t) else t
                                                              for t in grouping)


SMALL = dict(num_src=12, num_dst=10, num_rows=10, num_edges=40)  # for the Triton interpreter


def on(device, edges):
    return EdgeSet(*(t.to(device) for t in (edges.src, edges.dst, edges.row, edges.crow)), edges.num_rows)


def gat_features(edges, H=2, C=5, dtype=torch.bfloat16, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((int(edges.src.max()) + 3, H, C), (int(edges.dst.max()) + 2, H, C), (H, C))
    return tuple(torch.randn(*s, generator=g).to(dtype).to(device).requires_grad_(True) for s in shapes)


def gat_reduction_length(edges, C):
    """The longest sum behind one GATv2 result: the most edges of one output row, source or
    destination, times the C channels of a logit."""
    counts = [edges.crow.diff(), torch.bincount(edges.src), torch.bincount(edges.dst)]
    return max(int(c.max()) for c in counts) * C


def upcast(*tensors):
    """float64 leaves with the values of ``tensors`` (the reference's inputs)."""
    return tuple(t.detach().double().requires_grad_(True) for t in tensors)


# --------------------------------------------------------------------------- float64 formulas


def softmax_backward64(grad, alpha, group, num_groups):
    """``dL/dl = alpha (g - sum_group alpha g)`` in float64 at the given ``alpha``."""
    a, g = alpha.detach().double(), grad.detach().double()
    dot = a.new_zeros(a.shape[0], num_groups, a.shape[2]).index_add_(1, group, a * g)
    return a * (g - dot.index_select(1, group))


def gatv2_alpha64(x_l, x_r, att, edges, slope=0.2):
    """``alpha`` [E, H] of the op docstring in float64 (PyG's softmax, its 1e-16 included)."""
    x_l, x_r, att = (t.detach().double() for t in (x_l, x_r, att))
    logits = (att * F.leaky_relu(x_l[edges.src] + x_r[edges.dst], slope)).sum(-1)
    index = edges.row.view(-1, 1).expand_as(logits)
    row_max = logits.new_full((edges.num_rows, logits.shape[1]), float("-inf"))
    row_max = row_max.scatter_reduce(0, index, logits, reduce="amax")
    exp = (logits - row_max[edges.row]).exp()
    denom = exp.new_zeros(row_max.shape).index_add_(0, edges.row, exp) + 1e-16
    return exp / denom[edges.row]


def gatv2_backward64(grad_out, x_l, x_r, att, alpha, edges, slope=0.2):
    """``(grad_x_l, grad_x_r, grad_att)`` of the op docstring in float64 at the given inputs,
    ``alpha`` included."""
    g, x_l, x_r, att, alpha = (t.detach().double() for t in (grad_out, x_l, x_r, att, alpha))
    src, dst, row = edges.src, edges.dst, edges.row
    pre = x_l[src] + x_r[dst]  # [E, H, C]
    g_row = g[row]
    ga = (g_row * x_l[src]).sum(-1)  # <g_row, x_l[src]> [E, H]
    dot = alpha.new_zeros(edges.num_rows, alpha.shape[1]).index_add_(0, row, alpha * ga)
    gl = alpha * (ga - dot[row])  # the logit gradient
    grad_pre = gl[..., None] * att * torch.where(pre > 0, 1.0, torch.full_like(pre, slope))
    grad_x_l = torch.zeros_like(x_l).index_add_(0, src, alpha[..., None] * g_row + grad_pre)
    grad_x_r = torch.zeros_like(x_r).index_add_(0, dst, grad_pre)
    grad_att = (gl[..., None] * F.leaky_relu(pre, slope)).sum(0)
    return grad_x_l, grad_x_r, grad_att


def test_float64_formulas_match_the_reference():
    logits, kept, (group, G, _, _) = softmax_setup(dtype=torch.float64)
    alpha = group_softmax_reference(logits, group, G, kept)
    grad = torch.randn_like(alpha)
    (want,) = torch.autograd.grad(alpha, logits, grad)
    torch.testing.assert_close(softmax_backward64(grad, alpha, group, G), want, rtol=1e-12, atol=1e-12)
    edges = random_edge_set(seed=16)
    x_l, x_r, att = gat_features(edges, H=2, C=5, dtype=torch.float64)
    with torch.no_grad():
        x_l[:3] = 0  # zero pre-activations: the derivative takes the slope
        x_r[:3] = 0
    out = gatv2_attention_reference(x_l, x_r, att, edges, 0.2)
    alpha = gatv2_alpha64(x_l, x_r, att, edges)
    aggregated = torch.zeros_like(out).index_add_(0, edges.row, alpha[..., None] * x_l[edges.src])
    torch.testing.assert_close(aggregated, out, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (x_l, x_r, att), grad)
    for a, b in zip(gatv2_backward64(grad, x_l, x_r, att, alpha, edges), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- against float64


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("group_softmax", reference=True))
def test_group_softmax_matches_float64(backend, device, dtype, mode, masked):
    logits, kept, (group, G, ptr, perm) = softmax_setup(dtype=dtype, mode=mode, masked=masked, device=device)
    alpha = group_softmax(logits, ptr, perm, kept, backend=backend)
    assert alpha.dtype == dtype
    (logits64,) = upcast(logits)
    want = group_softmax_reference(logits64, group, G, kept)
    length = int(ptr.diff().max())
    assert_close(alpha.double(), want, dtype=dtype, reduction_length=length)
    if kept is not None:
        assert bool((alpha[~kept] == 0).all())
    grad = torch.randn(alpha.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    (g_got,) = torch.autograd.grad(alpha, logits, grad)
    assert g_got.dtype == dtype
    if backend == "reference":
        (g_want,) = torch.autograd.grad(want, logits64, grad.double())
    else:  # at the alpha the backward reads (see the module docstring)
        g_want = softmax_backward64(grad, alpha, group, G)
    assert_close(g_got.double(), g_want, dtype=dtype, reduction_length=length)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("group_softmax", reference=True))
def test_group_softmax_low_precision_stays_finite_on_large_logits(backend, device, dtype):
    # float16 overflows beyond 65504: the max shift must happen in the accumulate dtype
    logits, kept, (group, G, ptr, perm) = softmax_setup(dtype=dtype, masked=False, device=device)
    big = (logits.detach().float() * 2e3).clamp(-6e4, 6e4).to(dtype)
    alpha = group_softmax(big, ptr, perm, kept, backend=backend)
    assert bool(torch.isfinite(alpha).all())
    assert_close(alpha.double(), group_softmax_reference(big.double(), group, G, kept), dtype=dtype,
                 reduction_length=int(ptr.diff().max()))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device,H,C", backend_cases(backend_params("gatv2", reference=True),
                                                            [(1, 7), (2, 5), (2, 32)], [(2, 5)]))
def test_gatv2_matches_float64(backend, device, H, C, dtype):
    edges = random_edge_set(seed=H * C, **(SMALL if is_interpreted(backend, device) else {}))
    x_l, x_r, att = gat_features(edges, H, C, dtype, device=device)
    edges = on(device, edges)
    out = gatv2_attention(x_l, x_r, att, edges, 0.2, backend=backend)
    assert out.dtype == dtype
    inputs64 = upcast(x_l, x_r, att)
    want = gatv2_attention_reference(*inputs64, edges, 0.2)
    length = gat_reduction_length(edges, C)
    assert_close(out.double(), want, dtype=dtype, reduction_length=length)
    assert torch.all(out[3] == 0) and torch.all(out[7] == 0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
    got_grads = torch.autograd.grad(out, (x_l, x_r, att), grad)
    if backend == "reference":
        want_grads = torch.autograd.grad(want, inputs64, grad.double())
    else:  # at the alpha the backward reads (see the module docstring): the forward op's
        x_l, x_r, att = x_l.detach(), x_r.detach(), att.detach()
        out_op, alpha = kernel_op("gatv2", backend, device)(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
        assert alpha.dtype == dtype and torch.equal(out_op, out)
        assert_close(alpha.double(), gatv2_alpha64(x_l, x_r, att, edges), dtype=dtype, reduction_length=length)
        want_grads = gatv2_backward64(grad, x_l, x_r, att, alpha, edges)
    for name, a, b in zip(("x_l", "x_r", "att"), got_grads, want_grads):
        assert a.dtype == dtype, name
        assert_close(a.double(), b, dtype=dtype, reduction_length=length, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("gatv2"))
def test_gatv2_backward_kernel_with_per_row_destinations_and_zero_preactivations(backend, device, dtype):
    # dst == output row (the CPU kernel then groups by the rows) and zero rows, so that some
    # pre-activations are exactly 0 (where the derivative is the slope)
    edges = random_edge_set(seed=21, **(SMALL if is_interpreted(backend, device) else {}))
    edges = EdgeSet(edges.src, edges.row.clone(), edges.row, edges.crow, edges.num_rows)
    x_l, x_r, att = (t.detach() for t in gat_features(edges, H=2, C=6, dtype=dtype))
    x_l[:4] = 0
    x_r[:4] = 0
    x_l, x_r, att, edges = x_l.to(device), x_r.to(device), att.to(device), on(device, edges)
    forward, backward = kernel_op("gatv2", backend, device), kernel_op("gatv2", backend, device, name="backward")
    out, alpha = forward(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    got = backward(grad, x_l, x_r, att, alpha, edges.src, edges.dst, edges.crow, 0.2)
    length = gat_reduction_length(edges, 6)
    for name, a, b in zip(("x_l", "x_r", "att"), got, gatv2_backward64(grad, x_l, x_r, att, alpha, edges)):
        assert a.dtype == dtype, name
        assert_close(a.double(), b, dtype=dtype, reduction_length=length, msg=lambda m, n=name: f"grad {n}: {m}")


# --------------------------------------------------------------------------- rounded once


def truncated(t, dtype):
    """float32 ``t`` converted to bfloat16 rounding toward zero (the Triton interpreter's
    conversion, see :mod:`stoichconv.ops.group_softmax.triton_kernels`)."""
    assert dtype == torch.bfloat16
    return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)


def assert_rounded_once(low, float32_result, backend, device):
    """``low`` is the float32 result converted once to its dtype: rounded to nearest (the
    interpreter's bfloat16 entries may instead be rounded toward zero)."""
    rounded = float32_result.to(low.dtype)
    if is_interpreted(backend, device) and low.dtype == torch.bfloat16:
        assert bool(((low == rounded) | (low == truncated(float32_result, low.dtype))).all())
    else:
        assert torch.equal(low, rounded)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("group_softmax"))
def test_group_softmax_low_precision_is_the_float32_kernel_rounded_once(backend, device, dtype):
    # load -> convert -> accumulate in float32 -> round on store: the float32 kernel on the
    # upcast inputs, rounded, to the bit
    logits, kept, (_, _, ptr, perm) = softmax_setup(dtype=dtype, device=device)
    logits = logits.detach()
    forward = kernel_op("group_softmax", backend, device)
    backward = kernel_op("group_softmax", backend, device, name="backward")
    alpha = forward(logits, kept, ptr, perm)
    assert_rounded_once(alpha, forward(logits.float(), kept, ptr, perm), backend, device)
    grad = torch.randn(alpha.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    assert_rounded_once(backward(grad, alpha, ptr, perm), backward(grad.float(), alpha.float(), ptr, perm),
                        backend, device)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("gatv2"))
def test_gatv2_low_precision_is_the_float32_kernel_rounded_once(backend, device, dtype):
    edges = on(device, random_edge_set(seed=17, **(SMALL if is_interpreted(backend, device) else {})))
    x_l, x_r, att = (t.detach() for t in gat_features(edges, H=2, C=9, dtype=dtype, device=device))
    e = (edges.src, edges.dst, edges.crow, 0.2)
    forward, backward = kernel_op("gatv2", backend, device), kernel_op("gatv2", backend, device, name="backward")
    out, alpha = forward(x_l, x_r, att, *e)
    out32, alpha32 = forward(x_l.float(), x_r.float(), att.float(), *e)
    assert_rounded_once(out, out32, backend, device)
    assert_rounded_once(alpha, alpha32, backend, device)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    low = backward(grad, x_l, x_r, att, alpha, *e)
    high = backward(*(t.float() for t in (grad, x_l, x_r, att, alpha)), *e)
    for a, b in zip(low, high):
        assert_rounded_once(a, b, backend, device)


# --------------------------------------------------------------------------- determinism (C++ CPU)


def _with_threads(n, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", LOW)
def test_cpu_group_softmax_is_bit_identical_across_runs_and_threads(dtype):
    # B * G = 40 * 7 (sample, group) rows: several tasks of 64 rows
    logits, kept, (_, _, ptr, perm) = softmax_setup(B=40, H=3, dtype=dtype)
    logits = logits.detach()
    grad = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(dtype)

    def run():
        alpha = OPS.group_softmax(logits, kept, ptr, perm)
        return alpha, OPS.group_softmax_backward(grad, alpha, ptr, perm)

    results = [_with_threads(n, run) for n in (2, 1, 2)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW)
def test_cpu_gatv2_is_bit_identical_across_runs_and_threads(dtype):
    # 600 rows and 300 sources: several tasks of 64 rows and 5 blocks of 64 sources
    edges = random_edge_set(num_rows=600, num_edges=5000, num_src=300, num_dst=200, seed=9)
    x_l, x_r, att = (t.detach() for t in gat_features(edges, H=2, C=12, dtype=dtype))
    args = (x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    grad = torch.randn(edges.num_rows, 2, 12, generator=torch.Generator().manual_seed(0)).to(dtype)

    def run():
        out, alpha = OPS.gatv2_forward(*args)
        return (out, alpha, *OPS.gatv2_backward(grad, x_l, x_r, att, alpha, *args[3:]))

    results = [_with_threads(n, run) for n in (2, 1, 2)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == dtype and torch.equal(a, b)


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("group_softmax"))
def test_group_softmax_opcheck(backend, device, dtype, masked):
    B = 1 if is_interpreted(backend, device) else 2  # opcheck runs the operators a dozen times
    logits, kept, (_, _, ptr, perm) = softmax_setup(B=B, dtype=dtype, masked=masked, device=device)
    forward = kernel_op("group_softmax", backend, device)
    backward = kernel_op("group_softmax", backend, device, name="backward")
    torch.library.opcheck(forward, (logits, kept, ptr, perm))
    alpha = group_softmax(logits, ptr, perm, kept, backend=backend).detach()
    torch.library.opcheck(backward, (torch.randn_like(alpha), alpha, ptr, perm))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend,device", backend_params("gatv2"))
def test_gatv2_opcheck(backend, device, dtype):
    forward, backward = kernel_op("gatv2", backend, device), kernel_op("gatv2", backend, device, name="backward")
    tiny = dict(num_src=5, num_dst=4, num_rows=4, num_edges=10, empty_rows=(2,))
    interpreted = is_interpreted(backend, device)
    edges = on(device, random_edge_set(seed=11, **(tiny if interpreted else {})))
    x_l, x_r, att = (t.detach() for t in gat_features(edges, C=3 if interpreted else 5, dtype=dtype, device=device))
    torch.library.opcheck(forward, (x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2))
    out, alpha = forward(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    torch.library.opcheck(backward, (torch.randn_like(out), x_l, x_r, att, alpha, edges.src, edges.dst,
                                     edges.crow, 0.2))


# --------------------------------------------------------------------------- dtype errors


def test_compiled_kernels_name_the_argument_of_a_bad_dtype():
    logits, kept, (_, _, ptr, perm) = softmax_setup(dtype=torch.float32)
    logits = logits.detach()
    with pytest.raises(RuntimeError, match="`logits` must be float16, bfloat16, float32 or float64, got Int"):
        OPS.group_softmax(logits.int(), kept, ptr, perm)
    with pytest.raises(RuntimeError, match="`alpha` must be float16, bfloat16, float32 or float64, got Long"):
        OPS.group_softmax_backward(logits.long(), logits.long(), ptr, perm)
    with pytest.raises(RuntimeError, match="`grad` must match `alpha` in shape, dtype and device"):
        OPS.group_softmax_backward(logits.bfloat16(), logits, ptr, perm)
    edges = random_edge_set(seed=12)
    x_l, x_r, att = (t.detach() for t in gat_features(edges, dtype=torch.float32))
    e = (edges.src, edges.dst, edges.crow, 0.2)
    with pytest.raises(RuntimeError, match="`x_l` must be float16, bfloat16, float32 or float64, got Int"):
        OPS.gatv2_forward(x_l.int(), x_r.int(), att.int(), *e)
    with pytest.raises(RuntimeError, match="`x_l`, `x_r` and `att` must share one dtype, got BFloat16, Float and"):
        OPS.gatv2_forward(x_l.bfloat16(), x_r, att, *e)
    out, alpha = OPS.gatv2_forward(x_l.half(), x_r.half(), att.half(), *e)
    with pytest.raises(RuntimeError, match=r"`alpha` must be a CPU tensor \[E, H\] .* of the dtype of `x_l`"):
        OPS.gatv2_backward(out, x_l.half(), x_r.half(), att.half(), alpha.float(), *e)


@pytest.mark.parametrize("backend,device", backend_params("gatv2", reference=True))
def test_gatv2_refuses_mixed_dtypes_outside_autocast(backend, device):
    edges = random_edge_set(seed=13, **SMALL)
    x_l, x_r, att = (t.detach() for t in gat_features(edges, dtype=torch.bfloat16, device=device))
    edges = on(device, edges)
    with pytest.raises(TypeError, match="`x_r` has dtype torch.float32 but `x_l` has torch.bfloat16"):
        gatv2_attention(x_l, x_r.float(), att, edges, backend=backend)
    with pytest.raises(TypeError, match="`att` has dtype torch.float16 but `x_l` has torch.bfloat16"):
        gatv2_attention(x_l, x_r, att.half(), edges, backend=backend)


def test_public_gatv2_ops_refuse_mixed_dtypes_outside_autocast():
    edges = random_edge_set(seed=14)
    x_l, x_r, att = (t.detach() for t in gat_features(edges, dtype=torch.float16))
    e = (edges.src, edges.dst, edges.crow)
    with pytest.raises(TypeError, match="`att` has dtype torch.float32 but `x_l` has torch.float16"):
        gatv2_forward(x_l, x_r, att.float(), *e)
    out, alpha = gatv2_forward(x_l, x_r, att, *e)
    with pytest.raises(TypeError, match="`alpha` has dtype torch.bfloat16 but `grad_out` has torch.float16"):
        gatv2_backward(out, x_l, x_r, att, alpha.bfloat16(), *e)
    with pytest.raises(TypeError, match="`x_l` has dtype torch.float32 but `grad_out` has torch.float16"):
        gatv2_backward(out, x_l.float(), x_r, att, alpha, *e)


@pytest.mark.parametrize("backend,device", backend_params("group_softmax", reference=True))
def test_group_softmax_refuses_a_floating_dtype_outside_the_four(backend, device):
    logits, kept, (_, _, ptr, perm) = softmax_setup(dtype=torch.float32, device=device)
    with pytest.raises(TypeError, match="`logits` must be float16, bfloat16, float32 or float64"):
        group_softmax(logits.detach().to(torch.float8_e4m3fn), ptr, perm, kept, backend=backend)


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend,device", backend_params("group_softmax", reference=True))
def test_group_softmax_under_autocast_runs_in_the_autocast_dtype(backend, device):
    logits, kept, (group, G, ptr, perm) = softmax_setup(dtype=torch.float32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        alpha = group_softmax(logits, ptr, perm, kept, backend=backend)
    assert alpha.dtype == torch.bfloat16
    (rounded,) = upcast(logits.detach().bfloat16())
    want = group_softmax_reference(rounded, group, G, kept)
    length = int(ptr.diff().max())
    assert_close(alpha.double(), want, dtype=torch.bfloat16, reduction_length=length)
    grad = torch.randn(alpha.shape, generator=torch.Generator().manual_seed(8)).to(device)
    (g_got,) = torch.autograd.grad(alpha, logits, grad)  # through the cast: back to float32
    assert g_got.dtype == torch.float32
    if backend == "reference":
        (g_want,) = torch.autograd.grad(want, rounded, grad.bfloat16().double())
    else:
        g_want = softmax_backward64(grad.bfloat16(), alpha, group, G)
    assert_close(g_got.double(), g_want, dtype=torch.bfloat16, reduction_length=length)


@pytest.mark.parametrize("backend,device", backend_params("gatv2", reference=True))
def test_gatv2_under_autocast_runs_in_the_autocast_dtype(backend, device):
    edges = random_edge_set(seed=15, **(SMALL if is_interpreted(backend, device) else {}))
    x_l, x_r, att = gat_features(edges, H=2, C=5, dtype=torch.float32, device=device)
    edges = on(device, edges)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = gatv2_attention(x_l, x_r, att, edges, 0.2, backend=backend)
        # float64 is left alone, as torch.autocast leaves it: mixed with the cast ones, refused
        with pytest.raises(TypeError, match="x_l"):
            gatv2_attention(x_l.double(), x_r, att, edges, 0.2, backend=backend)
    assert out.dtype == torch.bfloat16
    low = tuple(t.detach().bfloat16() for t in (x_l, x_r, att))
    rounded = upcast(*low)
    want = gatv2_attention_reference(*rounded, edges, 0.2)
    length = gat_reduction_length(edges, 5)
    assert_close(out.double(), want, dtype=torch.bfloat16, reduction_length=length)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device)
    got_grads = torch.autograd.grad(out, (x_l, x_r, att), grad)  # through the casts: float32
    if backend == "reference":
        want_grads = torch.autograd.grad(want, rounded, grad.bfloat16().double())
    else:
        _, alpha = kernel_op("gatv2", backend, device)(*low, edges.src, edges.dst, edges.crow, 0.2)
        want_grads = gatv2_backward64(grad.bfloat16(), *low, alpha, edges)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.float32
        assert_close(a.double(), b, dtype=torch.bfloat16, reduction_length=length)
