"""The fused GATv2 forward and backward kernels (stoichconv.ops.gatv2) on every kernel backend
of its table entry against the edge-chunked pure-PyTorch reference
(stoichconv.reference.gatv2): forward and hand-written backward, softmax rows, gradcheck,
opcheck in both dtypes, determinism and empty edge sets, bad input of the compiled kernels."""

import pytest
import torch

from stoichconv.backends import available_backends
from stoichconv.ops.gatv2 import gatv2_attention, gatv2_backward, gatv2_forward
from stoichconv.testing import backend_cases, backend_params, is_interpreted, kernel_op, random_edge_set
from stoichconv.types import EdgeSet

OP = "gatv2"
KERNELS = backend_params(OP)


# a smaller edge set for the Triton interpreter (it runs every program in numpy); rows 3 and 7 empty
SMALL = dict(num_src=12, num_dst=10, num_rows=10, num_edges=40)


def on(device, edges):
    return EdgeSet(edges.src.to(device), edges.dst.to(device), edges.row.to(device), edges.crow.to(device),
                   edges.num_rows)


def features(edges, H=2, C=5, dtype=torch.float64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(int(edges.src.max()) + 3, H, C, generator=g, dtype=dtype).to(device).requires_grad_(True)
    x_r = torch.randn(int(edges.dst.max()) + 2, H, C, generator=g, dtype=dtype).to(device).requires_grad_(True)
    att = torch.randn(H, C, generator=g, dtype=dtype).to(device).requires_grad_(True)
    return x_l, x_r, att


def test_available_backends():
    assert "cpu" in available_backends(torch.device("cpu"), OP)[OP]
    assert "cpu" not in available_backends(torch.device("meta"), OP)[OP]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend,device,H,C", backend_cases(KERNELS, [(1, 7), (2, 5), (2, 32)], [(1, 7), (2, 5)]))
def test_kernel_matches_chunked_pytorch(backend, device, H, C, dtype, tol):
    edges = random_edge_set(seed=H * C, **(SMALL if is_interpreted(backend, device) else {}))
    x_l, x_r, att = features(edges, H, C, dtype, device=device)
    edges = on(device, edges)
    got = gatv2_attention(x_l, x_r, att, edges, 0.2, backend=backend)
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.all(got[3] == 0) and torch.all(got[7] == 0)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x_l, x_r, att), grad), torch.autograd.grad(want, (x_l, x_r, att), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", ["auto", "default"])  # AVX2+FMA kernels where the CPU has them; portable ones
@pytest.mark.parametrize("dst_is_row", [False, True], ids=["shared-dst", "dst-is-row"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cpu_isa_variants_match_reference(dtype, tol, dst_is_row, isa, monkeypatch):
    monkeypatch.setenv("STOICHCONV_CPU_ISA", isa)
    edges = random_edge_set(seed=11, num_src=60, num_dst=50, num_rows=50, num_edges=400)
    if dst_is_row:  # every edge's destination is its output row (the dst-is-row backward)
        edges = EdgeSet(edges.src, edges.row.clone(), edges.row, edges.crow, edges.num_rows)
    x_l, x_r, att = features(edges, H=2, C=37, dtype=dtype, seed=5)  # 37: vector lanes and a tail
    if dst_is_row:  # one destination row per output row
        x_r = x_r.detach()[:edges.num_rows].clone().requires_grad_(True)
        assert x_r.size(0) == edges.num_rows
    got = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="cpu")
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x_l, x_r, att), grad), torch.autograd.grad(want, (x_l, x_r, att), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_backward_kernel_with_per_row_destinations_and_zero_preactivations(backend, device, dtype, tol):
    # dst == output row (the per-sample layout: the kernel takes the rows as the
    # destination grouping), and rows of zeros so that some pre-activations are
    # exactly 0 (where the derivative must be the slope, as in torch).
    size = dict(num_src=15, num_dst=10, num_rows=10, num_edges=50) if is_interpreted(backend, device) else \
        dict(num_src=40, num_dst=25, num_rows=25, num_edges=200)
    edges = random_edge_set(seed=21, **size)
    edges = EdgeSet(edges.src, edges.row.clone(), edges.row, edges.crow, edges.num_rows)
    x_l, x_r, att = features(edges, H=2, C=6, dtype=dtype, device=device)
    edges = on(device, edges)
    with torch.no_grad():
        x_l[:5] = 0
        x_r[:5] = 0
    got = gatv2_attention(x_l, x_r, att, edges, 0.2, backend=backend)
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x_l, x_r, att), grad), torch.autograd.grad(want, (x_l, x_r, att), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# (rows, edges, sources, destinations): a real-size edge set; the interpreter a small one
DETERMINISM = backend_cases(KERNELS, [(2000, 20000, 500, 400)], [(12, 60, 10, 8)])


def raw_ops(backend, device):
    return kernel_op(OP, backend, device), kernel_op(OP, backend, device, name="backward")


@pytest.mark.parametrize("dst_is_row", [False, True], ids=["shared-dst", "dst-is-row"])
@pytest.mark.parametrize("backend,device,rows,E,S,D", DETERMINISM)
def test_deterministic_across_runs_and_threads_and_empty_edge_set(backend, device, rows, E, S, D, dst_is_row):
    # both CPU backward schedules: destinations shared (a pass by destination) and dst == row
    # (x_r's gradient in the row pass)
    forward, backward = raw_ops(backend, device)
    edges = random_edge_set(num_rows=rows, num_edges=E, num_src=S, num_dst=D, seed=9)
    if dst_is_row:
        edges = EdgeSet(edges.src, edges.row.clone(), edges.row, edges.crow, edges.num_rows)
    x_l, x_r, att = (t.detach().float() for t in features(edges, H=2, C=32, device=device))
    edges = on(device, edges)
    args = (x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    grad = torch.randn(rows, 2, 32, generator=torch.Generator().manual_seed(0)).to(device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out, alpha = forward(*args)
            results.append((out, alpha, *backward(grad, *args[:3], alpha, *args[3:])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    empty = torch.zeros(0, dtype=torch.long, device=device)
    out, alpha = forward(x_l, x_r, att, empty, empty, torch.zeros(4, dtype=torch.long, device=device), 0.2)
    assert out.shape == (3, 2, 32) and torch.all(out == 0) and alpha.shape == (0, 2)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_alpha_is_a_softmax_per_row(backend, device):
    edges = random_edge_set(seed=3, **(SMALL if is_interpreted(backend, device) else {}))
    x_l, x_r, att = (t.detach() for t in features(edges, device=device))
    edges = on(device, edges)
    out, alpha = raw_ops(backend, device)[0](x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    sums = torch.zeros(edges.num_rows, alpha.size(1), dtype=alpha.dtype, device=device).index_add_(0, edges.row, alpha)
    has_edges = edges.crow[1:] > edges.crow[:-1]
    torch.testing.assert_close(sums[has_edges], torch.ones_like(sums[has_edges]))
    assert out.shape == (edges.num_rows, *x_l.shape[1:])


@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck_through_the_kernel_forward(backend, device):
    edges = random_edge_set(num_src=6, num_dst=5, num_rows=5, num_edges=14, seed=5, empty_rows=(2,))
    x_l, x_r, att = features(edges, H=2, C=3, device=device)
    edges = on(device, edges)
    fn = lambda a, b, c: gatv2_attention(a, b, c, edges, 0.2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x_l, x_r, att), fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck(backend, device, dtype):
    forward, backward = raw_ops(backend, device)
    tiny = dict(num_src=5, num_dst=4, num_rows=4, num_edges=10, empty_rows=(2,))  # opcheck calls the op often
    interpreted = is_interpreted(backend, device)
    edges = random_edge_set(seed=11, **(tiny if interpreted else {}))
    x_l, x_r, att = (t.detach() for t in features(edges, C=3 if interpreted else 5, dtype=dtype, device=device))
    edges = on(device, edges)
    torch.library.opcheck(forward, (x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2))
    out, alpha = forward(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    torch.library.opcheck(backward, (torch.randn_like(out), x_l, x_r, att, alpha, edges.src, edges.dst, edges.crow, 0.2))


def test_compiled_kernels_reject_bad_input():
    edges = random_edge_set(seed=12)
    x_l, x_r, att = (t.detach() for t in features(edges))
    args = [x_l, x_r, att, edges.src, edges.dst, edges.crow]
    with pytest.raises(RuntimeError, match=r"`src` has id .* outside \[0, "):
        gatv2_forward(x_l[:2], *args[1:])
    with pytest.raises(RuntimeError, match=r"`crow` must start at 0 and end at E"):
        gatv2_forward(*args[:5], edges.crow[:-1])
    with pytest.raises(RuntimeError, match=r"`att` must be \[H, C\]"):
        gatv2_forward(x_l, x_r, att[:1], *args[3:])
    with pytest.raises(RuntimeError, match="share one dtype"):  # the wrapper's TypeError comes first
        torch.ops.stoichconv.gatv2_forward(x_l, x_r.float(), *args[2:], 0.2)
    with pytest.raises(TypeError, match="`src` must be a 1-D int64 tensor"):
        gatv2_forward(x_l, x_r, att, edges.src.int(), edges.dst, edges.crow)
    out, alpha = gatv2_forward(*args)
    with pytest.raises(RuntimeError, match=r"`alpha` must be a CPU tensor \[E, H\]"):
        gatv2_backward(out, *args[:3], alpha[1:], *args[3:])
    with pytest.raises(RuntimeError, match=r"`grad_out` must be a CPU tensor \[num_rows, H, C\]"):
        gatv2_backward(out[1:], *args[:3], alpha, *args[3:])
    with pytest.raises(RuntimeError, match=r"`dst` has id .* outside \[0, "):
        gatv2_backward(out, x_l, x_r[:2], att, alpha, *args[3:])
    with pytest.raises(TypeError, match="`alpha` must be a floating tensor"):
        gatv2_backward(out, *args[:3], alpha.long(), *args[3:])
