"""The fused GATv2 forward and backward kernels (stoichconv.ops.gatv2) against the
edge-chunked pure-PyTorch path of stoichconv.models.hetero_cell.gatv2_attention."""

import pytest
import torch

import stoichconv
from stoichconv.backends import available_backends
from stoichconv.ops.gatv2 import gatv2_attention, gatv2_backward, gatv2_forward
from stoichconv.types import EdgeSet

pytestmark = pytest.mark.skipif(not stoichconv.has_compiled_kernels(), reason="stoichconv._C not built")


def random_edges(num_src=30, num_dst=20, num_rows=25, num_edges=150, seed=0, empty_rows=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, num_rows, (num_edges,), generator=g)
    for r in empty_rows:  # rows without edges must give 0
        row[row == r] = (r + 1) % num_rows
    row = torch.sort(row).values
    src = torch.randint(0, num_src, (num_edges,), generator=g)
    dst = torch.randint(0, num_dst, (num_edges,), generator=g)
    crow = torch.zeros(num_rows + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=num_rows), 0)
    return EdgeSet(src, dst, row, crow, num_rows)


def features(edges, H=2, C=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(int(edges.src.max()) + 3, H, C, generator=g, dtype=dtype).requires_grad_(True)
    x_r = torch.randn(int(edges.dst.max()) + 2, H, C, generator=g, dtype=dtype).requires_grad_(True)
    att = torch.randn(H, C, generator=g, dtype=dtype).requires_grad_(True)
    return x_l, x_r, att


def test_available_on_cpu_only():
    assert "cpu" in available_backends(torch.device("cpu"), "gatv2")["gatv2"]
    assert "cpu" not in available_backends(torch.device("meta"), "gatv2")["gatv2"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("H,C", [(1, 7), (2, 5), (2, 32)])
def test_kernel_matches_chunked_pytorch(dtype, tol, H, C):
    edges = random_edges(seed=H * C)
    x_l, x_r, att = features(edges, H, C, dtype)
    got = gatv2_attention(x_l, x_r, att, edges, 0.2)
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.all(got[3] == 0) and torch.all(got[7] == 0)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x_l, x_r, att), grad), torch.autograd.grad(want, (x_l, x_r, att), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_backward_kernel_with_per_row_destinations_and_zero_preactivations(dtype, tol):
    # dst == output row (the per-sample layout: the kernel takes the rows as the
    # destination grouping), and rows of zeros so that some pre-activations are
    # exactly 0 (where the derivative must be the slope, as in torch).
    edges = random_edges(num_src=40, num_dst=25, num_rows=25, num_edges=200, seed=21)
    edges = EdgeSet(edges.src, edges.row.clone(), edges.row, edges.crow, edges.num_rows)
    x_l, x_r, att = features(edges, H=2, C=6, dtype=dtype)
    with torch.no_grad():
        x_l[:5] = 0
        x_r[:5] = 0
    got = gatv2_attention(x_l, x_r, att, edges, 0.2)
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x_l, x_r, att), grad), torch.autograd.grad(want, (x_l, x_r, att), grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_backward_is_deterministic_across_threads():
    edges = random_edges(num_rows=2000, num_edges=20000, num_src=500, num_dst=400, seed=19)
    x_l, x_r, att = (t.detach().float() for t in features(edges, H=2, C=32))
    out, alpha = gatv2_forward(x_l, x_r, att, edges.src, edges.dst, edges.crow)
    grad = torch.randn_like(out)
    threads = torch.get_num_threads()
    try:
        first = gatv2_backward(grad, x_l, x_r, att, alpha, edges.src, edges.dst, edges.crow)
        torch.set_num_threads(1)
        single = gatv2_backward(grad, x_l, x_r, att, alpha, edges.src, edges.dst, edges.crow)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, single))


def test_alpha_is_a_softmax_per_row():
    edges = random_edges(seed=3)
    x_l, x_r, att = (t.detach() for t in features(edges))
    out, alpha = gatv2_forward(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    sums = torch.zeros(edges.num_rows, alpha.size(1), dtype=alpha.dtype).index_add_(0, edges.row, alpha)
    has_edges = edges.crow[1:] > edges.crow[:-1]
    torch.testing.assert_close(sums[has_edges], torch.ones_like(sums[has_edges]))
    assert out.shape == (edges.num_rows, *x_l.shape[1:])


def test_gradcheck_through_the_kernel_forward():
    edges = random_edges(num_src=6, num_dst=5, num_rows=5, num_edges=14, seed=5, empty_rows=(2,))
    x_l, x_r, att = features(edges, H=2, C=3)
    assert torch.autograd.gradcheck(lambda a, b, c: gatv2_attention(a, b, c, edges, 0.2), (x_l, x_r, att))


def test_deterministic_across_threads_and_empty_edge_set():
    edges = random_edges(num_rows=2000, num_edges=20000, num_src=500, num_dst=400, seed=9)
    x_l, x_r, att = (t.detach().float() for t in features(edges, H=2, C=32))
    threads = torch.get_num_threads()
    try:
        first = gatv2_forward(x_l, x_r, att, edges.src, edges.dst, edges.crow)
        torch.set_num_threads(1)
        single = gatv2_forward(x_l, x_r, att, edges.src, edges.dst, edges.crow)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, single))
    empty = torch.zeros(0, dtype=torch.long)
    out, alpha = gatv2_forward(x_l, x_r, att, empty, empty, torch.zeros(4, dtype=torch.long))
    assert out.shape == (3, 2, 32) and torch.all(out == 0) and alpha.shape == (0, 2)


def test_opcheck():
    edges = random_edges(seed=11)
    x_l, x_r, att = (t.detach() for t in features(edges))
    torch.library.opcheck(torch.ops.stoichconv.gatv2_forward.default,
                          (x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2))
    out, alpha = gatv2_forward(x_l, x_r, att, edges.src, edges.dst, edges.crow, 0.2)
    torch.library.opcheck(torch.ops.stoichconv.gatv2_backward.default,
                          (torch.randn_like(out), x_l, x_r, att, alpha, edges.src, edges.dst, edges.crow, 0.2))


def test_bad_input():
    edges = random_edges(seed=12)
    x_l, x_r, att = (t.detach() for t in features(edges))
    args = [x_l, x_r, att, edges.src, edges.dst, edges.crow]
    with pytest.raises(RuntimeError, match=r"`src` has id .* outside \[0, "):
        gatv2_forward(x_l[:2], *args[1:])
    with pytest.raises(RuntimeError, match=r"`crow` must start at 0 and end at E"):
        gatv2_forward(*args[:5], edges.crow[:-1])
    with pytest.raises(RuntimeError, match=r"`att` must be \[H, C\]"):
        gatv2_forward(x_l, x_r, att[:1], *args[3:])
    with pytest.raises(RuntimeError, match="share one dtype"):
        gatv2_forward(x_l, x_r.float(), *args[2:])
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
