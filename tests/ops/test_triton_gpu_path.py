"""The Triton half of the GPU path (issue 13): the Triton kernels of the group softmax, GATv2
and the pert-mask ops (``reaction_keep``, ``filter_bipartite``) against the references and
the compiled CPU ops, forward and backward, with empty rows / groups, all ``-inf`` groups,
E = 0 and B = 0; ``opcheck`` and ``gradcheck``; review findings 1 (masked or zero-degree
rows never turn an inf into NaN) and 5 (``validate=False`` runs no Python value checks);
and the layer with ``backend="triton"`` against the reference layer with no C++ op running.

Every test runs on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` when no GPU is visible) and on CUDA tensors where a GPU is visible.
Graphs are tiny: the interpreter runs every program in numpy."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stoichconv
from stoichconv.backends import OPS, available_backends, select
from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.ops.group_softmax import group_softmax
from stoichconv.ops.pert_mask import filter_bipartite, filter_edges, reaction_keep
from stoichconv.ops.stoich_conv import build_stoich_plan, stoich_conv
from stoichconv.reference.group_softmax import group_softmax_reference
from stoichconv.testing import CudaSyncCounter, random_edge_set

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="CPU Triton needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]),
]
DTYPES = [torch.float32, torch.float64]
needs_compiled = pytest.mark.skipif(not stoichconv.has_compiled_kernels(), reason="stoichconv._C not built")
TRITON_OPS = ("group_softmax", "gatv2", "stoich_conv", "filter_edges", "reaction_keep", "filter_bipartite")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def cpu_copy(*tensors):
    return tuple(None if t is None else t.detach().cpu() for t in tensors)


# --------------------------------------------------------------------------- generators


def hypergraph(N=6, M=5, nnz=16, seed=0):
    """Metabolite N-1 isolated, reaction M-1 without incidences, a repeated incidence."""
    g = torch.Generator().manual_seed(seed)
    mi = torch.randint(0, N - 1, (nnz,), generator=g)
    ri = torch.randint(0, M - 1, (nnz,), generator=g)
    if nnz > 1:
        mi[1], ri[1] = mi[0], ri[0]
    stoich = torch.randn(nnz, generator=g, dtype=torch.float64) * 2
    return torch.stack([mi, ri]), stoich, N, M


def softmax_case(B, H, dtype, device, mode="node", masked=True, seed=0, nnz=16):
    edge_index, stoich, N, M = hypergraph(nnz=nnz, seed=seed)
    plan = build_stoich_plan(edge_index, stoich, N, M).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    logits = (3 * torch.randn(B, nnz, H, generator=g, dtype=dtype)).to(device)
    kept = None
    if masked and B > 0:
        keep = torch.rand(B, M, generator=g) > 0.3
        if nnz:
            keep[0, int(edge_index[1, 0])] = False  # a masked reaction with incidences
        kept = keep[:, edge_index[1]].to(device)
    if mode == "node":
        ptr, perm, group, G = plan.reaction_ptr, plan.reaction_perm, plan.reaction_index, M
    else:
        ptr, perm, group, G = plan.metabolite_ptr, plan.metabolite_perm, plan.metabolite_index, N
    if B > 1 and nnz > 0:  # one group whose kept logits are all -inf
        logits[1, group == group[0]] = float("-inf")
    return logits, kept, ptr, perm, group, G


def edge_set(num_src=7, num_dst=5, num_rows=6, num_edges=24, seed=0, empty_rows=(2,), device="cpu"):
    """A small EdgeSet (interpreter-sized defaults) of :func:`stoichconv.testing.random_edge_set`."""
    return random_edge_set(num_src, num_dst, num_rows, num_edges, seed, empty_rows, device)


def gat_features(num_src, num_dst, H, C, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()
                 for shape in ((num_src, H, C), (num_dst, H, C), (H, C)))


def deletions(B, N, per_sample=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, per_sample + 1, (B,), generator=g)
    if B > 0:
        counts[0] = per_sample
    pert = torch.randint(0, N, (int(counts.sum()),), generator=g)
    if pert.numel() >= 2:
        pert[1] = pert[0]  # a duplicate deletion
    return pert, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


# --------------------------------------------------------------------------- the backend table


def test_every_op_has_a_triton_custom_op():
    for name in TRITON_OPS:
        spec = OPS[name]
        assert "triton" in spec.backends, name
        fn = select(name, "triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")).fn
        assert fn._qualname.startswith("stoichconv::triton_"), (name, fn)
        if INTERPRETED:
            assert "triton" in available_backends(torch.device("cpu"), name)[name]


# --------------------------------------------------------------------------- group softmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("masked", [False, True])
def test_group_softmax_matches_reference(device, dtype, mode, masked):
    logits, kept, ptr, perm, group, G = softmax_case(3, 3, dtype, device, mode, masked)
    logits.requires_grad_()
    got = group_softmax(logits, ptr, perm, kept, backend="triton")
    want = group_softmax_reference(logits, group, G, kept)
    torch.testing.assert_close(got, want, **tol(dtype))
    assert not bool(got.isnan().any())
    assert bool((got[1, group == group[0]] == 0).all())  # the all -inf group gives 0
    if kept is not None:
        assert bool((got.detach()[~kept] == 0).all())
    grad = torch.randn_like(got)
    (a,) = torch.autograd.grad(got, logits, grad)
    (b,) = torch.autograd.grad(want, logits, grad)
    torch.testing.assert_close(a, b, **tol(dtype))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_softmax_matches_compiled_cpu_op(device, dtype):
    logits, kept, ptr, perm, _, _ = softmax_case(2, 2, dtype, device)
    got = torch.ops.stoichconv.triton_group_softmax(logits, kept, ptr, perm)
    want = torch.ops.stoichconv.group_softmax(*cpu_copy(logits, kept, ptr, perm))
    torch.testing.assert_close(got.cpu(), want, **tol(dtype))
    grad = torch.randn_like(got)
    got_b = torch.ops.stoichconv.triton_group_softmax_backward(grad, got, ptr, perm)
    want_b = torch.ops.stoichconv.group_softmax_backward(*cpu_copy(grad, want, ptr, perm))
    torch.testing.assert_close(got_b.cpu(), want_b, **tol(dtype))


@pytest.mark.parametrize("B,nnz", [(0, 16), (2, 0)])
def test_group_softmax_empty(device, B, nnz):
    logits, kept, ptr, perm, group, G = softmax_case(B, 2, torch.float64, device, nnz=nnz)
    logits.requires_grad_()
    got = group_softmax(logits, ptr, perm, kept, backend="triton")
    assert got.shape == logits.shape
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert grad.shape == logits.shape


def test_group_softmax_gradcheck_and_determinism(device):
    logits, kept, ptr, perm, _, _ = softmax_case(1, 1, torch.float64, device, nnz=8)
    logits = logits.clamp(-5, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: group_softmax(l, ptr, perm, kept, backend="triton"), (logits,))
    first = group_softmax(logits, ptr, perm, kept, backend="triton")
    assert torch.equal(first, group_softmax(logits, ptr, perm, kept, backend="triton"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_softmax_opcheck(device, dtype):
    logits, kept, ptr, perm, _, _ = softmax_case(2, 2, dtype, device, nnz=10)
    torch.library.opcheck(torch.ops.stoichconv.triton_group_softmax.default,
                          (logits.requires_grad_(), kept, ptr, perm))
    alpha = torch.ops.stoichconv.triton_group_softmax(logits.detach(), kept, ptr, perm)
    torch.library.opcheck(torch.ops.stoichconv.triton_group_softmax_backward.default,
                          (torch.randn_like(alpha), alpha, ptr, perm))


# --------------------------------------------------------------------------- GATv2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,C", [(1, 3), (2, 5)])
def test_gatv2_matches_reference(device, dtype, H, C):
    # dst differs from the output row (shared destination features); row 2 has no edge
    edges = edge_set(seed=H * 10 + C, device=device)
    x_l, x_r, att = gat_features(7, 5, H, C, dtype, device)
    got = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="triton")
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, **tol(dtype))
    assert bool((got[2] == 0).all())
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x_l, x_r, att), grad),
                    torch.autograd.grad(want, (x_l, x_r, att), grad)):
        torch.testing.assert_close(a, b, **tol(dtype))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_gatv2_raw_ops_match_compiled_cpu_ops(device, dtype):
    edges = edge_set(seed=3, device=device)
    x_l, x_r, att = (t.detach() for t in gat_features(7, 5, 2, 4, dtype, device))
    structure = (edges.src, edges.dst, edges.crow)
    out, alpha = torch.ops.stoichconv.triton_gatv2_forward(x_l, x_r, att, *structure, 0.2)
    want_out, want_alpha = torch.ops.stoichconv.gatv2_forward(*cpu_copy(x_l, x_r, att, *structure), 0.2)
    torch.testing.assert_close(out.cpu(), want_out, **tol(dtype))
    torch.testing.assert_close(alpha.cpu(), want_alpha, **tol(dtype))
    grad = torch.randn_like(out)
    got = torch.ops.stoichconv.triton_gatv2_backward(grad, x_l, x_r, att, alpha, *structure, 0.2)
    want = torch.ops.stoichconv.gatv2_backward(*cpu_copy(grad, x_l, x_r, att, want_alpha, *structure), 0.2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **tol(dtype))


def test_gatv2_without_edges(device):
    edges = edge_set(num_edges=0, empty_rows=(), device=device)
    x_l, x_r, att = gat_features(7, 5, 2, 3, torch.float64, device)
    out = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="triton")
    assert out.shape == (6, 2, 3) and bool((out == 0).all())
    grads = torch.autograd.grad(out.sum(), (x_l, x_r, att))
    assert all(bool((g == 0).all()) for g in grads)


def test_gatv2_gradcheck_and_determinism(device):
    edges = edge_set(num_src=4, num_dst=3, num_rows=3, num_edges=7, empty_rows=(1,), seed=5, device=device)
    x_l, x_r, att = gat_features(4, 3, 1, 2, torch.float64, device)
    fn = lambda a, b, c: gatv2_attention(a, b, c, edges, 0.2, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x_l, x_r, att))
    # the op's own autograd formula (torch.ops, outside gatv2_attention)
    op = lambda a, b, c: torch.ops.stoichconv.triton_gatv2_forward(a, b, c, edges.src, edges.dst, edges.crow, 0.2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(op, (x_l, x_r, att), fast_mode=True)
    structure = (edges.src, edges.dst, edges.crow)
    x_l, x_r, att = (t.detach() for t in (x_l, x_r, att))
    out, alpha = torch.ops.stoichconv.triton_gatv2_forward(x_l, x_r, att, *structure, 0.2)
    again = torch.ops.stoichconv.triton_gatv2_forward(x_l, x_r, att, *structure, 0.2)
    assert torch.equal(out, again[0]) and torch.equal(alpha, again[1])
    grad = torch.randn_like(out)
    first = torch.ops.stoichconv.triton_gatv2_backward(grad, x_l, x_r, att, alpha, *structure, 0.2)
    second = torch.ops.stoichconv.triton_gatv2_backward(grad, x_l, x_r, att, alpha, *structure, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gatv2_opcheck(device, dtype):
    edges = edge_set(num_src=4, num_dst=3, num_rows=3, num_edges=8, empty_rows=(1,), seed=6, device=device)
    x_l, x_r, att = gat_features(4, 3, 2, 3, dtype, device)
    structure = (edges.src, edges.dst, edges.crow)
    torch.library.opcheck(torch.ops.stoichconv.triton_gatv2_forward.default, (x_l, x_r, att, *structure, 0.2))
    x_l, x_r, att = (t.detach() for t in (x_l, x_r, att))
    out, alpha = torch.ops.stoichconv.triton_gatv2_forward(x_l, x_r, att, *structure, 0.2)
    torch.library.opcheck(torch.ops.stoichconv.triton_gatv2_backward.default,
                          (torch.randn_like(out), x_l, x_r, att, alpha, *structure, 0.2))


# --------------------------------------------------------------------------- pert-mask ops


def bipartite_case(B, E, seed=0, num_src=6, num_dst=4):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, num_src, (E,), generator=g), torch.randint(0, num_dst, (E,), generator=g)])
    src_keep = torch.rand(B, num_src, generator=g) > 0.3
    dst_keep = torch.rand(B, num_dst, generator=g) > 0.3
    return edge_index, src_keep, dst_keep


@pytest.mark.parametrize("B,E", [(3, 20), (0, 20), (2, 0)])
def test_reaction_keep_matches_reference(device, B, E):
    gpr_index, _, _ = bipartite_case(1, E, seed=B + E, num_src=8, num_dst=5)
    pert, pert_ptr = deletions(B, 8, seed=B)
    got = reaction_keep(gpr_index.to(device), 5, pert.to(device), pert_ptr.to(device), backend="triton")
    want = reaction_keep(gpr_index, 5, pert, pert_ptr, backend="reference")
    assert got.dtype == torch.bool and torch.equal(got.cpu(), want)
    for validate in (True, False):
        direct = torch.ops.stoichconv.triton_reaction_keep(gpr_index.to(device), 5, pert.to(device),
                                                           pert_ptr.to(device), validate)
        assert torch.equal(direct.cpu(), want)


@pytest.mark.parametrize("B,E", [(3, 20), (0, 20), (2, 0)])
@pytest.mark.parametrize("relabel", [True, False])
def test_filter_bipartite_matches_reference(device, B, E, relabel):
    edge_index, src_keep, dst_keep = bipartite_case(B, E, seed=B * 7 + E)
    for sk, dk in ((src_keep, dst_keep), (None, dst_keep), (src_keep, None), (None, None)):
        want = filter_bipartite(edge_index, 6, 4, B, sk, dk, relabel=relabel, backend="reference")
        sk_d, dk_d = (None if t is None else t.to(device) for t in (sk, dk))
        got = filter_bipartite(edge_index.to(device), 6, 4, B, sk_d, dk_d, relabel=relabel, backend="triton")
        for name, a, b in zip(want._fields, got, want):
            assert torch.equal(a.cpu(), b), (name, a, b)


@pytest.mark.parametrize("op", ["reaction_keep", "filter_bipartite"])
def test_pert_mask_opcheck(device, op):
    edge_index, src_keep, dst_keep = bipartite_case(2, 12, seed=4)
    if op == "reaction_keep":
        pert, pert_ptr = deletions(2, 6, seed=2)
        args = (edge_index.to(device), 4, pert.to(device), pert_ptr.to(device))
    else:
        args = (edge_index.to(device), 6, 4, 2, src_keep.to(device), dst_keep.to(device), True)
    torch.library.opcheck(getattr(torch.ops.stoichconv, f"triton_{op}").default, args)


def test_pert_mask_bad_values_raise_validated_or_not():
    """Bad values raise with ``validate=True`` (the Python checks, ValueError) and with
    ``validate=False`` (the operators' device-side checks, no Python check: the compiled CPU
    kernel's RuntimeError; tests/ops/test_pert_mask.py compares the texts on every backend)."""
    if not INTERPRETED:
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1")
    edge_index, src_keep, dst_keep = bipartite_case(2, 12, seed=4)
    pert, pert_ptr = deletions(2, 6, seed=2)
    for validate, error in ((True, ValueError), (False, RuntimeError)):
        with pytest.raises(error, match="`pert_ptr`"):
            torch.ops.stoichconv.triton_reaction_keep(edge_index, 4, pert, pert_ptr.flip(0), validate)
        with pytest.raises(error, match=r"`gpr_index\[1\]`"):
            torch.ops.stoichconv.triton_reaction_keep(edge_index, 2, pert, pert_ptr, validate)
        with pytest.raises(error, match=r"`edge_index\[0\]`"):
            torch.ops.stoichconv.triton_filter_bipartite(edge_index, 3, 4, 2, src_keep[:, :3], dst_keep, True, validate)
        with pytest.raises(error, match="`pert`"):
            torch.ops.stoichconv.triton_filter_edges(edge_index, 6, pert + 6, pert_ptr, True, validate)
    with pytest.raises(ValueError, match="`src_keep`"):
        torch.ops.stoichconv.triton_filter_bipartite(edge_index, 6, 4, 3, src_keep, dst_keep, True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_unvalidated_filters_sync_only_for_the_output_size():
    """Finding 5: with validate=False the Triton filters on CUDA tensors run no Python value
    check; the only host sync left is the read of E_out with the device-side value checks (for
    reaction_keep, whose output size is known, the read of those checks alone)."""
    device = torch.device("cuda")
    edge_index, src_keep, dst_keep = bipartite_case(3, 200, seed=1)
    pert, pert_ptr = deletions(3, 6, seed=1)
    ei, p, pp = edge_index.to(device), pert.to(device), pert_ptr.to(device)
    sk, dk = src_keep.to(device), dst_keep.to(device)
    filter_edges(torch.randint(0, 6, (2, 50), device=device), 6, p, pp, backend="triton", validate=False)  # warm-up
    reaction_keep(ei, 4, p, pp, backend="triton", validate=False)
    filter_bipartite(ei, 6, 4, 3, sk, dk, backend="triton", validate=False)
    torch.cuda.synchronize()
    homo = torch.randint(0, 6, (2, 50), device=device)
    with CudaSyncCounter() as counter:
        filter_edges(homo, 6, p, pp, backend="triton", validate=False)
    assert counter.count == 1, [str(w.message) for w in counter.caught]
    with CudaSyncCounter() as counter:
        reaction_keep(ei, 4, p, pp, backend="triton", validate=False)
    assert counter.count == 1, [str(w.message) for w in counter.caught]
    with CudaSyncCounter() as counter:
        filter_bipartite(ei, 6, 4, 3, sk, dk, backend="triton", validate=False)
    assert counter.count == 1, [str(w.message) for w in counter.caught]


# --------------------------------------------------------------------------- finding 1


def _finding1_backends(device):
    backends = ["triton", "reference"]
    if device.type == "cpu" and stoichconv.has_compiled_kernels():
        backends.append("cpu")
    if device.type == "cuda" and "cuda" in available_backends(device, "stoich_conv")["stoich_conv"]:
        backends.append("cuda")
    return backends


@pytest.mark.parametrize("case", ["masked_reaction", "zero_degree_rows"])
def test_inf_in_masked_or_zero_degree_rows_gives_zero(device, case):
    """Finding 1: one reaction {0: -1, 1: +1} with y[0, 0] = inf gives 0, not NaN, on every
    backend when the reaction is masked; likewise when the rows have zero degree (|s| = 0)."""
    edge_index = torch.tensor([[0, 1], [0, 0]], device=device)
    stoich = torch.tensor([-1.0, 1.0] if case == "masked_reaction" else [0.0, 0.0], dtype=torch.float64, device=device)
    plan = build_stoich_plan(edge_index, stoich, 2, 1)
    keep = torch.tensor([[False]], device=device) if case == "masked_reaction" else None
    y = torch.zeros(1, 2, 1, 3, dtype=torch.float64, device=device)
    y[0, 0] = float("inf")
    for backend in _finding1_backends(device):
        yy = y.clone().requires_grad_()
        weight = stoich.view(1, 2, 1).clone().requires_grad_()
        out = stoich_conv(yy, weight, plan, keep, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)), (backend, out)
        if case == "masked_reaction":  # masked incidences get exactly 0 gradients
            gy, gw = torch.autograd.grad(out.sum(), (yy, weight))
            assert bool((gy == 0).all()) and bool((gw == 0).all()), (backend, gy, gw)


# --------------------------------------------------------------------------- the layer


class _OpRecorder(TorchDispatchMode):
    """Records every ``stoichconv::`` operator that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "stoichconv":
            self.ops.add(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


def _compiled_names():
    names = set()
    for spec in OPS.values():
        names.update(n for n in (spec.compiled, spec.compiled_backward, spec.compiled_out) if n)
    return names


@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("batched", [False, True])
def test_layer_on_triton_equals_reference_and_runs_no_compiled_op(device, mode, batched):
    from stoichconv.nn import StoichHypergraphConv as FastConv
    from stoichconv.reference import StoichHypergraphConv as ReferenceConv

    edge_index, stoich, N, M = hypergraph(seed=2)
    F_in, C, H, B = 4, 3, 2, 2
    options = dict(is_stoich_gated=True, use_attention=True, attention_mode=mode, heads=H)
    torch.manual_seed(0)
    reference = ReferenceConv(F_in, C, **options).double().to(device)
    torch.nn.init.normal_(reference.bias)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*((B, N, F_in) if batched else (N, F_in)), generator=g, dtype=torch.float64).to(device)
    attr = torch.randn(M, F_in, generator=g, dtype=torch.float64).to(device)
    keep = None
    if batched:
        keep = (torch.rand(B, M, generator=g) > 0.3).to(device)
        keep[0, int(edge_index[1, 0])] = False
    edge_index, stoich = edge_index.to(device), stoich.to(device)
    if batched:  # reference: the fast layer on the reference ops (the compacted reference is tests/nn's)
        reference = FastConv(F_in, C, backend="reference", **options).double().to(device)
    fast = FastConv(F_in, C, backend="triton", **options).double().to(device)
    fast.load_state_dict(reference.state_dict())
    args = (edge_index, stoich, attr, M) + ((keep,) if batched else ())
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = reference(ref_x, *args)
    recorder = _OpRecorder()
    with recorder:
        got = fast(fast_x, *args)
        grad = torch.randn_like(want)
        got.backward(grad)
    want.backward(grad)
    assert not recorder.ops & _compiled_names(), recorder.ops
    assert {"triton_stoich_conv_forward", "triton_stoich_conv_backward", "triton_incidence_attention",
            "triton_incidence_attention_backward"} <= recorder.ops, recorder.ops
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
