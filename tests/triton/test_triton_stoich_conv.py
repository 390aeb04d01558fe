"""Triton stoich conv forward/backward against the pure-torch reference and the
compiled CPU op (CPU tensors run through the Triton interpreter)."""

import os

import pytest
import torch

from stoichconv._extension import has_compiled_kernels
from stoichconv.ops.stoich_conv import build_stoich_plan, stoich_propagate
from stoichconv.reference.stoich_conv import stoich_propagate_reference
from stoichconv.ops.stoich_conv.triton_kernels import triton_stoich_conv_backward, triton_stoich_conv_forward

needs_compiled = pytest.mark.skipif(not has_compiled_kernels(), reason="stoichconv._C not built")
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1", reason="CPU tensors need TRITON_INTERPRET=1"
)


TINY = dict(N=5, M=3, nnz=9)  # for gradcheck/opcheck, which call the op many times


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def random_graph(N=11, M=6, nnz=30, seed=0, dtype=torch.float64, device="cpu"):
    """Incidence list with an isolated metabolite (N - 1), an empty reaction
    (M - 1), repeated (v, e) columns, negative/fractional stoich and one
    zero coefficient."""
    g = torch.Generator().manual_seed(seed)
    base = nnz - 4
    mi = torch.randint(0, N - 1, (base,), generator=g)
    ri = torch.randint(0, M - 1, (base,), generator=g)
    mi = torch.cat([mi, mi[:3], torch.tensor([0])])  # repeated incidences
    ri = torch.cat([ri, ri[:3], torch.tensor([0])])
    stoich = torch.randn(nnz, generator=g, dtype=torch.float64) * 1.5
    stoich[5] = 0.0
    stoich[6] = -0.5
    edge_index = torch.stack([mi, ri]).to(device)
    return edge_index, stoich.to(device=device, dtype=dtype), N, M


def make_inputs(B, H, C, dtype, device, seed=0, masked=False, **graph_kw):
    edge_index, stoich, N, M = random_graph(seed=seed, dtype=dtype, device=device, **graph_kw)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, N, H, C, generator=g, dtype=dtype).to(device)
    gate = torch.rand(B, plan.nnz, H, generator=g, dtype=dtype).to(device)
    weight = stoich[None, :, None] * gate
    keep = None
    if masked:
        keep = (torch.rand(B, M, generator=g) > 0.4).to(device)
        keep[0, 0] = False  # at least one masked reaction with incidences
    return y, weight, plan, keep


def raw_args(y, weight, plan, keep):
    mi, ri, rptr, rperm, mptr, mperm = plan.structure()
    return (y, weight, keep, mi, ri, plan.abs_stoich.to(y.dtype), rptr, rperm, mptr, mperm)


def reference(y, weight, plan, keep):
    return stoich_propagate_reference(
        y, weight, plan.metabolite_index, plan.reaction_index, plan.stoich, plan.num_reactions, keep
    )


def test_spec_test_vector(device):
    # spec/stoich_conv.md: Theta = I, one reaction {0: -1, 1: -2, 2: +1}, metabolite 3 isolated.
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float64, device=device)
    edge_index = torch.tensor([[0, 1, 2], [0, 0, 0]], device=device)
    stoich = torch.tensor([-1.0, -2.0, 1.0], dtype=torch.float64, device=device)
    plan = build_stoich_plan(edge_index, stoich, 4, 1)
    out = stoich_propagate(x.view(1, 4, 1, 3), stoich.view(1, 3, 1), plan, backend="triton").view(4, 3)
    expected = torch.tensor(
        [[0.25, 0.5, -0.25], [0.25, 0.5, -0.25], [-0.25, -0.5, 0.25], [0, 0, 0]], dtype=torch.float64, device=device
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,C", [(1, 3), (2, 4), (2, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_backward_matches_reference(device, dtype, H, C, masked):
    y, weight, plan, keep = make_inputs(2, H, C, dtype, device, seed=H * 10 + C, masked=masked)
    y.requires_grad_(True)
    weight.requires_grad_(True)
    out = stoich_propagate(y, weight, plan, keep, backend="triton")
    ref = reference(y, weight, plan, keep)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    # isolated metabolite N-1 outputs exactly 0
    assert bool((out[:, -1] == 0).all())
    grad = torch.randn_like(out)
    gy, gw = torch.autograd.grad(out, (y, weight), grad)
    ry, rw = torch.autograd.grad(ref, (y, weight), grad)
    torch.testing.assert_close(gy, ry, **_tol(dtype))
    torch.testing.assert_close(gw, rw, **_tol(dtype))
    if masked:
        masked_cols = ~keep[:, plan.reaction_index]  # [B, nnz]
        assert bool((gw[masked_cols] == 0).all())


@needs_compiled
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_raw_ops_match_compiled_cpu(dtype, masked):
    y, weight, plan, keep = make_inputs(2, 2, 3, dtype, "cpu", seed=7, masked=masked)
    args = raw_args(y, weight, plan, keep)
    tri = triton_stoich_conv_forward(*args)
    cpu = torch.ops.stoichconv.stoich_conv_forward(*args)
    for a, b in zip(tri, cpu):
        torch.testing.assert_close(a, b, **_tol(dtype))
    out, hidden, node_norm, edge_norm = cpu
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_hidden = torch.randn(hidden.shape, generator=g, dtype=dtype)
    structure = plan.structure()
    for gh, need_y, need_w in ((None, True, True), (grad_hidden, True, True), (grad_hidden, True, False),
                               (grad_hidden, False, True), (None, False, False)):
        bargs = (grad_out, gh, y, weight, keep, hidden, node_norm, edge_norm, *structure, need_y, need_w)
        t_gy, t_gw = triton_stoich_conv_backward(*bargs)
        c_gy, c_gw = torch.ops.stoichconv.stoich_conv_backward(*bargs)
        assert t_gy.shape == c_gy.shape and t_gw.shape == c_gw.shape
        assert (t_gy.numel() > 0) == need_y and (t_gw.numel() > 0) == need_w
        torch.testing.assert_close(t_gy, c_gy, **_tol(dtype))
        torch.testing.assert_close(t_gw, c_gw, **_tol(dtype))


def test_grad_hidden_path_gradcheck(device):
    # Differentiating through both `out` and `hidden` exercises grad_hidden in the backward op.
    y, weight, plan, keep = make_inputs(2, 2, 2, torch.float64, device, seed=5, masked=True, **TINY)
    y.requires_grad_(True)
    weight.requires_grad_(True)
    rest = raw_args(y, weight, plan, keep)[2:]

    def fn(y, weight):
        out, hidden, _, _ = triton_stoich_conv_forward(y, weight, *rest)
        return out, hidden

    assert torch.autograd.gradcheck(fn, (y, weight), fast_mode=True)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_through_stoich_propagate(device, masked):
    y, weight, plan, keep = make_inputs(2, 2, 2, torch.float64, device, seed=11, masked=masked, **TINY)
    y.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda a, b: stoich_propagate(a, b, plan, keep, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, weight), fast_mode=True)


def test_long_rows_and_wide_channels(device):
    # A currency metabolite with 3 x BLOCK_K incidences, a reaction with 2.5 x
    # BLOCK_K, and C > 128 (two channel blocks).
    N, M = 8, 5
    mi = torch.cat([torch.zeros(48, dtype=torch.long), torch.arange(1, 8).repeat(2)])
    ri = torch.cat([torch.arange(48) % 4, torch.full((14,), 4)])
    ri[:40] = torch.where(torch.arange(40) % 2 == 0, 3, ri[:40])
    stoich = torch.linspace(-2.0, 2.0, mi.numel(), dtype=torch.float64)
    plan = build_stoich_plan(torch.stack([mi, ri]).to(device), stoich.to(device), N, M)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, N, 1, 130, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    weight = (stoich[None, :, None] * 1.0).to(device).requires_grad_(True)
    out = stoich_propagate(y, weight, plan, backend="triton")
    ref = reference(y, weight, plan, None)
    torch.testing.assert_close(out, ref, **_tol(torch.float64))
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (y, weight), grad), torch.autograd.grad(ref, (y, weight), grad)):
        torch.testing.assert_close(a, b, **_tol(torch.float64))


def test_deterministic(device):
    y, weight, plan, keep = make_inputs(3, 2, 5, torch.float32, device, seed=2, masked=True)
    args = raw_args(y, weight, plan, keep)
    first = triton_stoich_conv_forward(*args)
    second = triton_stoich_conv_forward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_shapes(device):
    # B = 0 and nnz = 0 both run and give the right shapes (and zeros).
    y, weight, plan, _ = make_inputs(2, 1, 3, torch.float64, device)
    args = raw_args(y[:0], weight[:0], plan, None)
    out, hidden, node_norm, edge_norm = triton_stoich_conv_forward(*args)
    assert out.shape == (0, plan.num_metabolites, 1, 3) and hidden.shape == (0, plan.num_reactions, 1, 3)
    empty = build_stoich_plan(
        torch.empty(2, 0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.float64, device=device), 4, 3
    )
    y0 = torch.randn(2, 4, 1, 3, dtype=torch.float64, device=device)
    out = stoich_propagate(y0, y0.new_empty(2, 0, 1), empty, backend="triton")
    assert out.shape == y0.shape and bool((out == 0).all())


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(device, masked):
    y, weight, plan, keep = make_inputs(2, 2, 3, torch.float64, device, seed=4, masked=masked, **TINY)
    args = raw_args(y.requires_grad_(True), weight.requires_grad_(True), plan, keep)
    torch.library.opcheck(torch.ops.stoichconv.triton_stoich_conv_forward.default, args)
    with torch.no_grad():
        out, hidden, node_norm, edge_norm = triton_stoich_conv_forward(*args)
    bargs = (torch.randn_like(out), torch.randn_like(hidden), y.detach(), weight.detach(), keep, hidden,
             node_norm, edge_norm, *plan.structure(), True, True)
    torch.library.opcheck(torch.ops.stoichconv.triton_stoich_conv_backward.default, bargs)


def test_bad_inputs_raise_naming_the_argument(device):
    y, weight, plan, keep = make_inputs(2, 1, 3, torch.float64, device, masked=True)
    args = list(raw_args(y, weight, plan, keep))
    with pytest.raises(ValueError, match="`weight`"):
        triton_stoich_conv_forward(*[weight[:, :-1] if i == 1 else a for i, a in enumerate(args)])
    with pytest.raises(TypeError, match="`reaction_keep`"):
        triton_stoich_conv_forward(*[keep.long() if i == 2 else a for i, a in enumerate(args)])
    with pytest.raises(ValueError, match="`abs_stoich`"):
        triton_stoich_conv_forward(*[a.float() if i == 5 else a for i, a in enumerate(args)])
    with pytest.raises(TypeError, match="`y`"):
        triton_stoich_conv_forward(*[a.half() if i in (0, 1) else a for i, a in enumerate(args)])
    if device.type == "cpu":  # value checks run where they cost no device sync
        bad_perm = args[7].clone()
        bad_perm[0] = plan.nnz
        with pytest.raises(ValueError, match="`reaction_perm`"):
            triton_stoich_conv_forward(*[bad_perm if i == 7 else a for i, a in enumerate(args)])


def test_torch_compile_fullgraph(device):
    # Dynamo traces through the custom op (fake kernel + registered autograd).
    y, weight, plan, keep = make_inputs(2, 2, 3, torch.float64, device, seed=1, masked=True, **TINY)
    y.requires_grad_(True)
    fn = torch.compile(
        lambda a, b: stoich_propagate(a, b, plan, keep, backend="triton").sin(), backend="aot_eager", fullgraph=True
    )
    out = fn(y, weight)
    (grad,) = torch.autograd.grad(out.sum(), y)
    ref = reference(y, weight, plan, keep).sin()
    (ref_grad,) = torch.autograd.grad(ref.sum(), y)
    torch.testing.assert_close(out, ref, **_tol(torch.float64))
    torch.testing.assert_close(grad, ref_grad, **_tol(torch.float64))


def test_non_contiguous_inputs(device):
    y, weight, plan, keep = make_inputs(2, 2, 3, torch.float64, device, seed=8, masked=True)
    y_nc = y.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # same values, other strides
    w_nc = weight.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not y_nc.is_contiguous() and not w_nc.is_contiguous()
    out = stoich_propagate(y_nc, w_nc, plan, keep, backend="triton")
    y_c, w_c = y.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference(y_c, w_c, plan, keep)
    torch.testing.assert_close(out, ref, **_tol(torch.float64))
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (y_nc, w_nc), grad), torch.autograd.grad(ref, (y_c, w_c), grad)):
        torch.testing.assert_close(a, b, **_tol(torch.float64))


@pytest.mark.parametrize("masked", [False, True])
def test_unsaved_hidden_is_recomputed(device, masked):
    # save_hidden=False: `hidden` comes back empty and the backward recomputes
    # stage 1 (edge norms folded into the coefficients); same gradients.
    y, weight, plan, keep = make_inputs(3, 2, 5, torch.float64, device, seed=9, masked=masked)
    y, weight = y.requires_grad_(True), weight.requires_grad_(True)
    results = []
    for save in (True, False):
        out = stoich_propagate(y, weight, plan, keep, backend="triton", save_hidden=save)
        results.append((out, *torch.autograd.grad(out, (y, weight), torch.ones_like(out))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **_tol(torch.float64))
    args = raw_args(y.detach(), weight.detach(), plan, keep) + (False,)
    _, hidden, _, _ = triton_stoich_conv_forward(*args)
    assert hidden.shape == (0,)
    torch.library.opcheck(torch.ops.stoichconv.triton_stoich_conv_forward.default,
                          raw_args(y, weight, plan, keep) + (False,))
    with pytest.raises(ValueError, match="`grad_hidden` given but `hidden` was not saved"):
        out, hidden, node_norm, edge_norm = triton_stoich_conv_forward(*args)
        triton_stoich_conv_backward(torch.ones_like(out), torch.ones(3, plan.num_reactions, 2, 5, dtype=y.dtype,
                                    device=y.device), y.detach(), weight.detach(), keep, hidden, node_norm,
                                    edge_norm, *plan.structure(), True, True)
