"""CUDA kernels of the grouped softmax and the fused GATv2 attention
(csrc/cuda/group_softmax*.{cpp,cu}, csrc/cuda/gatv2*.{cpp,cu}) against the CPU
kernels (float64 1e-12, float32 1e-5), forward and backward: empty and fully
masked groups, all -inf groups, no entries at all, rows longer than a block,
bit-identical reruns, opcheck, non-contiguous index tensors and the CPU
kernels' error messages. Marked ``cuda``: they run wherever a GPU is visible
(``make gpu-check``) and are skipped only when none is."""

import re

import pytest
import torch
from hypergraphs import random_hypergraph, random_keep

import stoichconv
from stoichconv.ops import build_stoich_plan
from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.ops.group_softmax import group_softmax
from stoichconv.types import EdgeSet

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]

DEV = "cuda"
OPS = torch.ops.stoichconv
TOLS = [(torch.float64, 1e-12), (torch.float32, 1e-5)]


@pytest.fixture(autouse=True)
def _needs_kernels():
    # A GPU is visible: a missing CUDA build is a failure, not a skip.
    assert stoichconv.has_cuda_kernels(), "stoichconv._C has no CUDA kernels; rebuild with FORCE_CUDA=1"


def to_dev(*tensors):
    return tuple(None if t is None else t.to(DEV) for t in tensors)


def close(got, want, tol):
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol, equal_nan=True)


def non_contiguous(t):
    """The same values as a strided (non-contiguous) view."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
    view = wide[..., 0]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


# --------------------------------------------------------------------------
# group_softmax
# --------------------------------------------------------------------------


def groups_from(group_of, num_groups, seed=0):
    """CSR ordering (ptr, perm) of incidence -> group ids, perm shuffled within groups."""
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(group_of.numel(), generator=g)
    order = shuffle[torch.sort(group_of[shuffle], stable=True).indices]
    ptr = torch.zeros(num_groups + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(group_of, minlength=num_groups), 0)
    return ptr, order


def softmax_inputs(B=3, H=2, dtype=torch.float64, masked=True, mode="node", seed=0, N=9, M=7, nnz=30):
    edge_index, stoich = random_hypergraph(N, M, nnz, seed=seed)
    plan = build_stoich_plan(edge_index, stoich, N, M)
    g = torch.Generator().manual_seed(seed + 1)
    logits = 3 * torch.randn(B, nnz, H, generator=g, dtype=dtype)
    kept = None
    if masked:
        keep = random_keep(B, M, seed=seed + 2)
        keep[0, plan.reaction_index[0]] = False  # a masked reaction with incidences
        kept = keep[:, plan.reaction_index]
    if mode == "node":
        ptr, perm = plan.reaction_ptr, plan.reaction_perm
    else:
        ptr, perm = plan.metabolite_ptr, plan.metabolite_perm
    return logits, kept, ptr, perm


def check_softmax(logits, kept, ptr, perm, tol):
    want = OPS.group_softmax(logits, kept, ptr, perm)
    got = OPS.group_softmax(*to_dev(logits, kept, ptr, perm))
    assert got.device.type == "cuda" and got.dtype == logits.dtype
    close(got, want, tol)
    assert not torch.isnan(got).any()
    grad = torch.randn_like(want)
    bwant = OPS.group_softmax_backward(grad, want, ptr, perm)
    bgot = OPS.group_softmax_backward(*to_dev(grad, want, ptr, perm))
    close(bgot, bwant, tol)
    return got, bgot


@pytest.mark.parametrize("dtype,tol", TOLS)
@pytest.mark.parametrize("mode", ["node", "edge"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("H", [1, 3])
def test_group_softmax_matches_cpu_kernel(dtype, tol, mode, masked, H):
    # random_hypergraph has an empty reaction and an isolated metabolite: empty groups.
    logits, kept, ptr, perm = softmax_inputs(H=H, dtype=dtype, masked=masked, mode=mode)
    check_softmax(logits, kept, ptr, perm, tol)


@pytest.mark.parametrize("dtype,tol", TOLS)
def test_group_softmax_all_minus_inf_and_fully_masked_groups_give_zero(dtype, tol):
    logits, kept, ptr, perm = softmax_inputs(B=3, H=2, dtype=dtype, masked=True)
    logits[1, perm[ptr[0]:ptr[1]]] = -float("inf")  # group 0 of sample 1: all -inf
    logits[2, perm[ptr[1]:ptr[2]], 0] = -float("inf")  # group 1 of sample 2, head 0
    got, _ = check_softmax(logits, kept, ptr, perm, tol)
    assert torch.all(got[1, perm[ptr[0]:ptr[1]].to(DEV)] == 0)
    assert torch.all(got[2, perm[ptr[1]:ptr[2]].to(DEV), 0] == 0)
    assert torch.all(got[~kept.to(DEV)] == 0)


@pytest.mark.parametrize("dtype,tol", TOLS)
@pytest.mark.parametrize("masked", [False, True])
def test_group_softmax_rows_longer_than_a_block(dtype, tol, masked):
    # one group of 700 entries, one of 300, many of 1-3 and empty ones
    sizes = [700, 0, 1, 300, 2, 0, 3] + [1, 2, 3] * 40
    group_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ptr, perm = groups_from(group_of, len(sizes), seed=3)
    g = torch.Generator().manual_seed(4)
    logits = 5 * torch.randn(4, group_of.numel(), 2, generator=g, dtype=dtype)
    kept = torch.rand(4, group_of.numel(), generator=g) > 0.3 if masked else None
    check_softmax(logits, kept, ptr, perm, tol)


def test_group_softmax_empty_inputs():
    logits, kept, ptr, perm = softmax_inputs()
    empty_batch = OPS.group_softmax(*to_dev(logits[:0], kept[:0], ptr, perm))
    assert empty_batch.shape == (0, logits.shape[1], 2) and empty_batch.is_cuda
    no_entries = OPS.group_softmax(torch.empty(2, 0, 1, device=DEV), None, torch.zeros(4, dtype=torch.long, device=DEV),
                                   torch.empty(0, dtype=torch.long, device=DEV))
    assert no_entries.shape == (2, 0, 1)
    no_heads = OPS.group_softmax(*to_dev(logits[:, :, :0], kept, ptr, perm))
    assert no_heads.shape == (3, logits.shape[1], 0)
    back = OPS.group_softmax_backward(*to_dev(logits[:0], logits[:0], ptr, perm))
    assert back.shape == (0, logits.shape[1], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_softmax_bit_identical_across_runs(dtype):
    logits, kept, ptr, perm = softmax_inputs(B=64, H=4, dtype=dtype, mode="edge", N=200, M=150, nnz=1500)
    args = to_dev(logits, kept, ptr, perm)
    grad = torch.randn(logits.shape, dtype=dtype, device=DEV)
    runs = []
    for _ in range(2):
        alpha = OPS.group_softmax(*args)
        runs.append((alpha, OPS.group_softmax_backward(grad, alpha, *args[2:])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_group_softmax_non_contiguous_inputs():
    logits, kept, ptr, perm = softmax_inputs(B=3, H=2)
    want = OPS.group_softmax(*to_dev(logits, kept, ptr, perm))
    logits_nc = non_contiguous(logits.to(DEV))
    got = OPS.group_softmax(logits_nc, non_contiguous(kept.to(DEV)), non_contiguous(ptr.to(DEV)),
                            non_contiguous(perm.to(DEV)))
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    assert torch.equal(OPS.group_softmax_backward(non_contiguous(grad), non_contiguous(want), non_contiguous(ptr.to(DEV)),
                                                  non_contiguous(perm.to(DEV))),
                       OPS.group_softmax_backward(grad, want, *to_dev(ptr, perm)))


def test_group_softmax_opcheck_and_autograd():
    logits, kept, ptr, perm = softmax_inputs(B=2)
    args = to_dev(logits, kept, ptr, perm)
    torch.library.opcheck(OPS.group_softmax.default, args)
    alpha = OPS.group_softmax(*args)
    torch.library.opcheck(OPS.group_softmax_backward.default, (torch.randn_like(alpha), alpha, *args[2:]))
    x = args[0].clone().requires_grad_(True)
    got = group_softmax(x, args[2], args[3], args[1], backend="cuda")
    xc = logits.clone().requires_grad_(True)
    want = group_softmax(xc, ptr, perm, kept, backend="cpu")
    close(got.detach(), want.detach(), 1e-12)
    grad = torch.randn_like(want)
    (g_got,) = torch.autograd.grad(got, x, grad.to(DEV))
    (g_want,) = torch.autograd.grad(want, xc, grad)
    close(g_got, g_want, 1e-12)
    assert torch.autograd.gradcheck(lambda t: group_softmax(t, args[2], args[3], args[1], backend="cuda"), (x,))


def first_line(exc):
    return str(exc.value).splitlines()[0]


def same_error(fn, cpu_args, gpu_args, pattern):
    with pytest.raises(RuntimeError, match=pattern) as cpu:
        fn(*cpu_args)
    with pytest.raises(RuntimeError, match=pattern) as gpu:
        fn(*gpu_args)
    assert first_line(cpu) == first_line(gpu)


def test_group_softmax_bad_values_raise_the_cpu_errors():
    logits, kept, ptr, perm = softmax_inputs()
    nnz = logits.shape[1]
    bad_range, repeat = perm.clone(), perm.clone()
    bad_range[5] = nnz
    repeat[7] = perm[3]
    short, decreasing = ptr.clone(), ptr.clone()
    short[-1] = nnz - 1
    decreasing[2], decreasing[3] = int(ptr[3]) + 1, int(ptr[2])  # a decrease at group 2
    for p, q, pattern in ((ptr, bad_range, r"`group_perm` has id .* outside \[0, "),
                          (ptr, repeat, r"`group_perm` must be a permutation .* repeats"),
                          (short, perm, "`group_ptr` must start at 0 and end at nnz"),
                          (decreasing, perm, "`group_ptr` must be non-decreasing")):
        same_error(OPS.group_softmax, (logits, kept, p, q), to_dev(logits, kept, p, q), pattern)
        same_error(OPS.group_softmax_backward, (logits, logits, p, q), to_dev(logits, logits, p, q), pattern)
    with pytest.raises(RuntimeError, match=r"`kept` must be \[B, nnz\]"):
        OPS.group_softmax(*to_dev(logits, kept[:, :-1], ptr, perm))
    with pytest.raises(RuntimeError, match="`logits` must be float16, bfloat16, float32 or float64"):
        OPS.group_softmax(*to_dev(logits.int(), kept, ptr, perm))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        OPS.group_softmax(logits.to(DEV), kept.to(DEV), ptr, perm.to(DEV))


# --------------------------------------------------------------------------
# GATv2
# --------------------------------------------------------------------------


def random_edges(num_src=30, num_dst=20, num_rows=25, num_edges=150, seed=0, empty_rows=(3, 7), dst_is_row=False):
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, num_rows, (num_edges,), generator=g)
    for r in empty_rows:  # rows without edges must give 0
        row[row == r] = (r + 1) % num_rows
    row = torch.sort(row).values
    src = torch.randint(0, num_src, (num_edges,), generator=g)
    dst = row.clone() if dst_is_row else torch.randint(0, num_dst, (num_edges,), generator=g)
    crow = torch.zeros(num_rows + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=num_rows), 0)
    return EdgeSet(src, dst, row, crow, num_rows)


def gat_features(num_src, num_dst, H, C, dtype, seed=1, zero_rows=0):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(num_src, H, C, generator=g, dtype=dtype)
    x_r = torch.randn(num_dst, H, C, generator=g, dtype=dtype)
    att = torch.randn(H, C, generator=g, dtype=dtype)
    x_l[:zero_rows] = 0  # pre-activations exactly 0: the derivative takes the slope
    x_r[:zero_rows] = 0
    return x_l, x_r, att


def check_gatv2(x_l, x_r, att, edges, tol, slope=0.2):
    cpu = (x_l, x_r, att, edges.src, edges.dst, edges.crow)
    gpu = to_dev(*cpu)
    out_w, alpha_w = OPS.gatv2_forward(*cpu, slope)
    out_g, alpha_g = OPS.gatv2_forward(*gpu, slope)
    assert out_g.is_cuda and alpha_g.is_cuda
    close(out_g, out_w, tol)
    close(alpha_g, alpha_w, tol)
    grad = torch.randn_like(out_w)
    want = OPS.gatv2_backward(grad, *cpu[:3], alpha_w, *cpu[3:], slope)
    got = OPS.gatv2_backward(grad.to(DEV), *gpu[:3], alpha_w.to(DEV), *gpu[3:], slope)
    for a, b in zip(got, want):
        close(a, b, tol)
    return out_g, got


@pytest.mark.parametrize("dtype,tol", TOLS)
@pytest.mark.parametrize("H,C", [(1, 7), (2, 5), (2, 32), (3, 70), (4, 1)])
@pytest.mark.parametrize("dst_is_row", [False, True])
def test_gatv2_matches_cpu_kernel(dtype, tol, H, C, dst_is_row):
    edges = random_edges(num_edges=200, seed=H * C, dst_is_row=dst_is_row)
    num_dst = edges.num_rows if dst_is_row else 20
    x_l, x_r, att = gat_features(33, num_dst, H, C, dtype, zero_rows=4)  # src rows 30-32 have no edge
    out, _ = check_gatv2(x_l, x_r, att, edges, tol)
    assert torch.all(out[3] == 0) and torch.all(out[7] == 0)


@pytest.mark.parametrize("dtype,tol", TOLS)
def test_gatv2_rows_sources_and_destinations_longer_than_a_block(dtype, tol):
    # row 0 takes 900 edges, source 0 and destination 1 take most of them
    g = torch.Generator().manual_seed(8)
    E, R = 1500, 40
    row = torch.sort(torch.cat([torch.zeros(900, dtype=torch.long), torch.randint(1, R, (E - 900,), generator=g)])).values
    src = torch.where(torch.rand(E, generator=g) < 0.6, 0, torch.randint(0, 50, (E,), generator=g))
    dst = torch.where(torch.rand(E, generator=g) < 0.6, 1, torch.randint(0, 30, (E,), generator=g))
    crow = torch.zeros(R + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=R), 0)
    edges = EdgeSet(src, dst, row, crow, R)
    x_l, x_r, att = gat_features(50, 30, 2, 16, dtype)
    x_l, x_r = 0.3 * x_l, 0.3 * x_r  # keep the 900-edge softmax away from one-hot
    check_gatv2(x_l, x_r, att, edges, tol)


def test_gatv2_no_edges():
    x_l, x_r, att = to_dev(*gat_features(6, 5, 2, 8, torch.float64))
    empty = torch.zeros(0, dtype=torch.long, device=DEV)
    crow = torch.zeros(4, dtype=torch.long, device=DEV)
    out, alpha = OPS.gatv2_forward(x_l, x_r, att, empty, empty, crow, 0.2)
    assert out.shape == (3, 2, 8) and torch.all(out == 0) and alpha.shape == (0, 2)
    grads = OPS.gatv2_backward(torch.randn_like(out), x_l, x_r, att, alpha, empty, empty, crow, 0.2)
    assert [tuple(t.shape) for t in grads] == [(6, 2, 8), (5, 2, 8), (2, 8)]
    assert all(torch.all(t == 0) for t in grads)
    no_rows = OPS.gatv2_forward(x_l, x_r, att, empty, empty, crow[:1], 0.2)
    assert no_rows[0].shape == (0, 2, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gatv2_bit_identical_across_runs(dtype):
    edges = random_edges(num_rows=2000, num_edges=20000, num_src=500, num_dst=400, seed=9)
    x_l, x_r, att = to_dev(*gat_features(500, 400, 2, 32, dtype))
    e = to_dev(edges.src, edges.dst, edges.crow)
    runs = []
    for _ in range(2):
        out, alpha = OPS.gatv2_forward(x_l, x_r, att, *e, 0.2)
        grad = torch.ones_like(out) + out
        runs.append((out, alpha, *OPS.gatv2_backward(grad, x_l, x_r, att, alpha, *e, 0.2)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gatv2_non_contiguous_edges():
    edges = random_edges(seed=11)
    x_l, x_r, att = to_dev(*gat_features(30, 20, 2, 5, torch.float64))
    e = to_dev(edges.src, edges.dst, edges.crow)
    e_nc = tuple(non_contiguous(t) for t in e)
    out, alpha = OPS.gatv2_forward(x_l, x_r, att, *e, 0.2)
    out_nc, alpha_nc = OPS.gatv2_forward(non_contiguous(x_l), x_r, non_contiguous(att), *e_nc, 0.2)
    assert torch.equal(out, out_nc) and torch.equal(alpha, alpha_nc)
    grad = torch.randn_like(out)
    want = OPS.gatv2_backward(grad, x_l, x_r, att, alpha, *e, 0.2)
    got = OPS.gatv2_backward(non_contiguous(grad), x_l, non_contiguous(x_r), att, non_contiguous(alpha), *e_nc, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_gatv2_opcheck_and_autograd():
    edges = random_edges(seed=12)
    x_l, x_r, att = to_dev(*gat_features(30, 20, 2, 5, torch.float64))
    e = to_dev(edges.src, edges.dst, edges.crow)
    torch.library.opcheck(OPS.gatv2_forward.default, (x_l, x_r, att, *e, 0.2))
    out, alpha = OPS.gatv2_forward(x_l, x_r, att, *e, 0.2)
    torch.library.opcheck(OPS.gatv2_backward.default, (torch.randn_like(out), x_l, x_r, att, alpha, *e, 0.2))
    dev_edges = EdgeSet(*to_dev(edges.src, edges.dst, edges.row, edges.crow), edges.num_rows)
    small = random_edges(num_src=6, num_dst=5, num_rows=5, num_edges=14, seed=5, empty_rows=(2,))
    small = EdgeSet(*to_dev(small.src, small.dst, small.row, small.crow), small.num_rows)
    inputs = tuple(t.requires_grad_(True) for t in to_dev(*gat_features(6, 5, 2, 3, torch.float64)))
    assert torch.autograd.gradcheck(lambda a, b, c: gatv2_attention(a, b, c, small, 0.2, backend="cuda"), inputs)
    leaves = tuple(t.clone().requires_grad_(True) for t in (x_l, x_r, att))
    got = gatv2_attention(*leaves, dev_edges, 0.2, backend="cuda")
    want = gatv2_attention(*leaves, dev_edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gatv2_bad_values_raise_the_cpu_errors():
    edges = random_edges(seed=13)
    x_l, x_r, att = gat_features(30, 20, 2, 5, torch.float64)
    bad_src, bad_dst = edges.src.clone(), edges.dst.clone()
    bad_src[40] = 30
    bad_dst[10] = -1
    short, decreasing = edges.crow.clone(), edges.crow.clone()
    short[-1] -= 1
    decreasing[4], decreasing[5] = int(edges.crow[5]) + 1, int(edges.crow[4])  # a decrease at row 4
    for s, d, c, pattern in ((bad_src, edges.dst, edges.crow, r"`src` has id 30 outside \[0, 30\)"),
                             (edges.src, bad_dst, edges.crow, r"`dst` has id -1 outside \[0, 20\)"),
                             (bad_src, bad_dst, edges.crow, r"`dst` has id -1 outside"),  # the first bad edge
                             (edges.src, edges.dst, short, "`crow` must start at 0 and end at E"),
                             (edges.src, edges.dst, decreasing, "`crow` must be non-decreasing")):
        cpu = (x_l, x_r, att, s, d, c)
        same_error(OPS.gatv2_forward, (*cpu, 0.2), (*to_dev(*cpu), 0.2), pattern)
    out, alpha = OPS.gatv2_forward(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    args = to_dev(x_l, x_r, att)
    e = to_dev(edges.src, edges.dst, edges.crow)
    with pytest.raises(RuntimeError, match=re.escape("`alpha` must be a CUDA tensor [E, H]")):
        OPS.gatv2_backward(out.to(DEV), *args, alpha[1:].to(DEV), *e, 0.2)
    with pytest.raises(RuntimeError, match=re.escape("`grad_out` must be a CUDA tensor [num_rows, H, C]")):
        OPS.gatv2_backward(out[1:].to(DEV), *args, alpha.to(DEV), *e, 0.2)
    with pytest.raises(RuntimeError, match="share one dtype"):
        OPS.gatv2_forward(args[0], args[1].float(), args[2], *e, 0.2)
    with pytest.raises(RuntimeError, match=r"`att` must be \[H, C\]"):
        OPS.gatv2_forward(args[0], args[1], args[2][:1], *e, 0.2)
