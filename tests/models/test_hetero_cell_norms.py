"""The fast HeteroCell's graph LayerNorm (``_GraphLayerNormFunction``, a hand-written backward)
against the autograd formulas it replaces (written out here, independently of the model module):
values and gradients in float32 and float64 on fresh random inputs, gradcheck in float64, with and
without a keep-mask, with and without affine parameters; the formula fallback for mixed dtypes."""

import pytest
import torch
from torch_geometric.nn import LayerNorm as GraphLayerNorm

from stoichconv.models.hetero_cell import _GraphLayerNormFunction, _graph_layer_norm


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
