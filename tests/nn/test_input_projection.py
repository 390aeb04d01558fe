"""The layer's fused input projections (:mod:`stoichconv.nn._input_projection`) against
``F.linear`` in float64, their hand-written backward by gradcheck, and the huge-page advice of
their large CPU outputs (:mod:`stoichconv._host_pages`)."""

import pytest
import torch
import torch.nn.functional as F

from stoichconv import _host_pages
from stoichconv.nn import StoichHypergraphConv
from stoichconv.nn._input_projection import TALL_PRODUCT_BLOCK_ROWS, input_projection, tall_product
from stoichconv.testing import assert_advised_into_huge_pages, tolerance


def make(rows=37, features=11, out=6, side=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g, dtype=dtype)
    w = torch.randn(out, features, generator=g, dtype=dtype)
    s = torch.randn(side, features, generator=g, dtype=dtype) if side else None
    return x, w, s


@pytest.mark.parametrize("side", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_linear_in_float64(dtype, side):
    x, w, s = make(side=side, dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w, s) if t is not None]
    y, out_side = input_projection(x, w, s)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    gs = torch.randn(out_side.shape, generator=g, dtype=dtype) if side else None
    loss = (y * gy).sum() + ((out_side * gs).sum() if side else 0)
    got = torch.autograd.grad(loss, leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[:2]
    y64 = F.linear(x64, w64)
    loss64 = (y64 * gy.double()).sum()
    if side:
        s64 = leaves64[2]
        torch.testing.assert_close(out_side.double(), F.linear(x64, s64).detach(), rtol=tolerance(dtype, 11)[0], atol=tolerance(dtype, 11)[1])
        loss64 = loss64 + (F.linear(x64, s64) * gs.double()).sum()
    else:
        assert out_side is None
    rtol, atol = tolerance(dtype, 37)
    torch.testing.assert_close(y.double(), y64.detach(), rtol=rtol, atol=atol)
    for a, b in zip(got, torch.autograd.grad(loss64, leaves64)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


def _tall_product_cases():
    block = TALL_PRODUCT_BLOCK_ROWS
    # one block (a plain product), whole blocks only, whole blocks and a remainder
    return [block + 5, 3 * block, 3 * block + 17]


@pytest.mark.parametrize("rows", _tall_product_cases())
@pytest.mark.parametrize("columns", [3, 24])  # the side rows; a weight gradient's output rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tall_product_matches_the_float64_product(rows, columns, dtype):
    g = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, columns, generator=g, dtype=dtype)
    b = torch.randn(rows, 16, generator=g, dtype=dtype)
    got = tall_product(a, b)
    assert got.shape == (columns, 16) and got.dtype == dtype
    rtol, atol = tolerance(dtype, rows)
    torch.testing.assert_close(got.double(), a.double().t() @ b.double(), rtol=rtol, atol=atol * rows ** 0.5)
    assert torch.equal(tall_product(a, b), got)  # a fixed summation order: the same bits again
    # a non-contiguous `a` (a column slice, as the layer's side gradient may be)
    wide = torch.randn(rows, columns + 2, generator=g, dtype=dtype)
    torch.testing.assert_close(tall_product(wide[:, 1:-1], b), wide[:, 1:-1].t() @ b, rtol=rtol, atol=atol * rows ** 0.5)


@pytest.mark.parametrize("side", [0, 2])
def test_gradcheck(side):
    x, w, s = make(rows=9, features=5, out=4, side=side)
    if side:
        torch.autograd.gradcheck(input_projection, [t.requires_grad_() for t in (x, w, s)])
    else:
        torch.autograd.gradcheck(lambda a, b: input_projection(a, b)[0], [t.requires_grad_() for t in (x, w)])


def test_only_one_output_used_and_partial_requires_grad():
    x, w, s = make()
    w.requires_grad_()
    s.requires_grad_()
    y, side = input_projection(x, w, s)  # x needs no gradient
    grad_w, grad_s = torch.autograd.grad(side.sum(), (w, s), allow_unused=True)
    assert torch.equal(grad_w, torch.zeros_like(w))  # y unused: its weight gets a zero gradient
    torch.testing.assert_close(grad_s, x.sum(0).expand_as(s))
    x.requires_grad_()
    y, side = input_projection(x, w, s)
    (grad_x,) = torch.autograd.grad(y.sum(), (x,))
    torch.testing.assert_close(grad_x, w.sum(0).expand_as(x))


@pytest.mark.parametrize("bad,message", [
    (dict(x=torch.ones(3)), "`x` must be a 2-D floating tensor"),
    (dict(weight=torch.ones(4, 5)), "`weight` must be \\[\\*, 11\\]"),
    (dict(side_weight=torch.ones(2, 11, dtype=torch.float32)), "`side_weight` must be \\[\\*, 11\\] torch.float64"),
    (dict(weight=torch.ones(4, 11, dtype=torch.long)), "`weight` must be a 2-D floating tensor"),
])
def test_bad_input_names_the_argument(bad, message):
    x, w, s = make()
    args = dict(x=x, weight=w, side_weight=s) | bad
    with pytest.raises(ValueError, match=message):
        input_projection(**args)


@pytest.mark.parametrize("config", [dict(is_stoich_gated=True, use_attention=True, heads=2),
                                    dict(is_stoich_gated=True), dict(use_attention=True, heads=3), dict()])
def test_layer_fused_projection_equals_the_module_path(config, monkeypatch):
    # The layer's one-read projections give what lin / gate_lin / the folded attention scores
    # give through the modules (the path taken under autocast), values and every gradient.
    from stoichconv.testing import random_hypergraph, random_keep

    N, M = 9, 7
    edge_index, stoich = random_hypergraph(N, M, seed=3)
    B, F_in = 3, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, F_in, generator=g, dtype=torch.float64)
    attr = torch.randn(M, F_in, generator=g, dtype=torch.float64)
    keep = random_keep(B, M, seed=1)
    torch.manual_seed(0)
    layer = StoichHypergraphConv(F_in, 5, **config, backend="cpu").double()
    kwargs = dict(edge_index=edge_index, stoich=stoich, num_edges=M,
                  reaction_keep=keep, hyperedge_attr=attr if config.get("use_attention") else None)

    def run():
        xx = x.clone().requires_grad_()
        out = layer(xx, **kwargs)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum(),
                                    [xx] + list(layer.parameters()))
        return [out.detach()] + list(grads)

    fused = run()
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: True)  # forces the module path
    modules = run()
    for a, b in zip(fused, modules):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("host_cache", ["off", "on"])
def test_large_cpu_outputs_are_advised_into_huge_pages(host_cache):
    # with the host block cache off: torch.empty advised; on: a fresh cache block is advised too
    import stoichconv

    limit = stoichconv.host_cache_info().limit_bytes
    stoichconv.set_host_cache_limit(0 if host_cache == "off" else 256 << 20)
    stoichconv.empty_host_cache()
    try:
        _check_large_cpu_outputs_are_advised()
    finally:
        stoichconv.set_host_cache_limit(limit)


def _check_large_cpu_outputs_are_advised():
    assert _host_pages.HUGE_PAGE_ADVICE_BYTES == 32 << 20
    t = _host_pages.empty(9 << 20, dtype=torch.float32, device=torch.device("cpu"))  # 36 MiB
    assert t.shape == (9 << 20,) and t.dtype == torch.float32
    assert_advised_into_huge_pages(t)
    small = _host_pages.empty(16, 4, dtype=torch.float64, device=torch.device("cpu"))
    assert small.shape == (16, 4) and small.dtype == torch.float64
    x, w, _ = make(rows=1 << 17, features=4, out=72, side=0, dtype=torch.float32)  # y: 36 MiB
    y, _ = input_projection(x, w)
    assert y.nbytes > _host_pages.HUGE_PAGE_ADVICE_BYTES
    assert_advised_into_huge_pages(y)
    torch.testing.assert_close(y, x @ w.t())
