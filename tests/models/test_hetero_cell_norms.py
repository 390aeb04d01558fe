"""The fast HeteroCell's norms with hand-written backwards (``_GraphLayerNormFunction``, the graph
LayerNorm; ``_WeightedBatchNormFunction``, the row-weighted BatchNorm) against the autograd formulas
they replace (written out here, independently of the model module): values and gradients in float32
and float64 on fresh random inputs, gradcheck in float64, with and without a keep-mask (0/1 or
count weights), with and without affine parameters, the running statistics, the formula fallback
for mixed dtypes."""

import pytest
import torch
from torch_geometric.nn import LayerNorm as GraphLayerNorm

from torch import nn

from stoichconv.models.hetero_cell import (_GraphLayerNormFunction, _WeightedBatchNormFunction, _batch_norm,
                                         _graph_layer_norm)


def _formula(x, keep, weight, bias, eps):
    """torch_geometric's graph-mode LayerNorm over the rows with ``keep`` (None: all rows)."""
    k = torch.ones(x.size(0), dtype=x.dtype) if keep is None else keep.to(x.dtype)
    k = k.unsqueeze(-1)
    count = k.sum() * x.size(-1)
    x = x - (x * k).sum() / count
    std = ((x * x * k).sum() / count).sqrt()
    out = x / (std + eps)
    return out if weight is None else out * weight + bias


def _inputs(rows, channels, dtype, masked, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, channels, generator=gen, dtype=dtype) * 1.7 + 0.4).requires_grad_()
    keep = torch.rand(rows, generator=gen) > 0.3 if masked else None
    weight = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_() if affine else None
    bias = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_() if affine else None
    grad = torch.randn(rows, channels, generator=gen, dtype=dtype)
    return x, keep, weight, bias, grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_function_equals_formula(dtype, tol, masked, affine):
    x, keep, weight, bias, grad = _inputs(3000, 64, dtype, masked, affine, seed=int(masked) + 2 * int(affine))
    inputs = [t for t in (x, weight, bias) if t is not None]
    k = None if keep is None else keep.to(dtype)
    got = _GraphLayerNormFunction.apply(x, k, weight, bias, 1e-5)
    want = _formula(x, keep, weight, bias, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    for a, b in zip((got,) + torch.autograd.grad(got, inputs, grad),
                    (want,) + torch.autograd.grad(want, inputs, grad)):
        assert (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_function_gradcheck(masked, affine):
    x, keep, weight, bias, _ = _inputs(9, 5, torch.float64, masked, affine, seed=7)
    k = None if keep is None else keep.double()
    assert torch.autograd.gradcheck(lambda x, w, b: _GraphLayerNormFunction.apply(x, k, w, b, 1e-5),
                                    (x, weight, bias))


def test_layer_norm_function_partial_gradients():
    x, keep, weight, bias, grad = _inputs(50, 8, torch.float64, True, True, seed=3)
    x_only = x.detach().requires_grad_()
    out = _GraphLayerNormFunction.apply(x_only, keep.double(), weight.detach(), bias.detach(), 1e-5)
    (gx,) = torch.autograd.grad(out, [x_only], grad)
    want = _formula(x_only, keep, weight.detach(), bias.detach(), 1e-5)
    (wx,) = torch.autograd.grad(want, [x_only], grad)
    assert torch.allclose(gx, wx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [True, False])
def test_graph_layer_norm_module_and_mixed_dtypes(masked):
    torch.manual_seed(0)
    norm = GraphLayerNorm(16, mode="graph")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(40, 16)
    keep = torch.rand(40) > 0.5 if masked else None
    want = _formula(x, keep, norm.weight, norm.bias, norm.eps)
    assert torch.allclose(_graph_layer_norm(norm, x, keep), want, rtol=1e-5, atol=1e-5)
    if not masked:
        assert torch.allclose(_graph_layer_norm(norm, x, None), norm(x), rtol=1e-5, atol=1e-5)
    # bfloat16 features with float32 parameters (autocast): the formulas' type promotion
    xb = x.bfloat16()
    got = _graph_layer_norm(norm, xb, keep)
    assert got.dtype == torch.float32
    assert torch.equal(got, _formula(xb, keep, norm.weight, norm.bias, norm.eps) if masked else norm(xb))


def _bn_formula(x, w, gamma, beta, eps):
    """Training-mode BatchNorm1d over the rows weighted by ``w`` [rows]: (out, mean, biased var)."""
    w = w.to(x.dtype).unsqueeze(-1)
    n = w.sum()
    mean = (x * w).sum(0) / n
    xc = x - mean
    var = (xc * xc * w).sum(0) / n
    out = xc * torch.rsqrt(var + eps)
    return (out if gamma is None else out * gamma + beta), mean, var


def _row_weights(rows, kind, gen):
    if kind == "ones":
        return torch.ones(rows)
    if kind == "keep":
        return (torch.rand(rows, generator=gen) > 0.3).float()
    return torch.randint(0, 5, (rows,), generator=gen).float()  # samples sharing each row


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", ["ones", "keep", "counts"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_function_equals_formula(dtype, tol, kind, affine):
    x, _, gamma, beta, grad = _inputs(3000, 64, dtype, False, affine, seed=5 + int(affine))
    w = _row_weights(3000, kind, torch.Generator().manual_seed(1)).to(dtype)
    inputs = [t for t in (x, gamma, beta) if t is not None]
    got, mean, var = _WeightedBatchNormFunction.apply(x, w, gamma, beta, 1e-5)
    want, want_mean, want_var = _bn_formula(x, w, gamma, beta, 1e-5)
    assert not mean.requires_grad and not var.requires_grad
    for a, b in [(mean, want_mean), (var, want_var), (got, want)]:
        assert (a - b).abs().max() <= tol * b.abs().max()
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        assert (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("kind", ["ones", "keep", "counts"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_function_gradcheck(kind, affine):
    x, _, gamma, beta, _ = _inputs(12, 4, torch.float64, False, affine, seed=9)
    w = _row_weights(12, kind, torch.Generator().manual_seed(2)).double()
    w[0] = 1.0  # at least one weighted row
    assert torch.autograd.gradcheck(lambda x, g, b: _WeightedBatchNormFunction.apply(x, w, g, b, 1e-5)[0],
                                    (x, gamma, beta))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_running_statistics(momentum, dtype):
    torch.manual_seed(0)
    x = torch.randn(200, 8, dtype=dtype) * 3 + 1
    native = nn.BatchNorm1d(8, momentum=momentum).to(dtype)
    fast = nn.BatchNorm1d(8, momentum=momentum).to(dtype)
    for _ in range(2):  # all rows weighted 1: exactly what the native module does
        want = native(x)
        got = _batch_norm(fast, x, torch.ones(200, dtype=torch.bool))
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(fast.running_mean, native.running_mean)
    torch.testing.assert_close(fast.running_var, native.running_var)
    assert int(fast.num_batches_tracked) == int(native.num_batches_tracked) == 2
    # count weights: the statistics of the rows repeated that many times
    counts = torch.randint(0, 4, (200,))
    repeated = nn.BatchNorm1d(8, momentum=momentum).to(dtype)
    weighted = nn.BatchNorm1d(8, momentum=momentum).to(dtype)
    want = repeated(x.repeat_interleave(counts, dim=0))
    got = _batch_norm(weighted, x, counts)
    torch.testing.assert_close(got.repeat_interleave(counts, dim=0), want)
    torch.testing.assert_close(weighted.running_mean, repeated.running_mean)
    torch.testing.assert_close(weighted.running_var, repeated.running_var)


def test_batch_norm_mixed_dtypes_use_the_formulas():
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(8)
    x = torch.randn(50, 8).bfloat16()
    keep = torch.rand(50) > 0.4
    got = _batch_norm(bn, x, keep)
    want = _bn_formula(x, keep, bn.weight, bn.bias, bn.eps)[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)
