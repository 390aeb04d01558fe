"""The drop-in layer and the reference layer in reduced precision: under
``torch.autocast("cpu", bfloat16 | float16)`` with float32 parameters and inputs (what mixed
precision training runs), and as ``.to(torch.bfloat16)`` / ``.half()`` modules on inputs of that
dtype. Every option combination, forward and backward (dL/dx and every parameter gradient),
against the reference layer in float64 on the same values; bounds from
:func:`stoichconv.testing.tolerance` (the layer's longest sum: F input features, then the
longest CSR row of the stoich conv), norm-wise relative to the reference's magnitude."""

from __future__ import annotations

import copy

import pytest
import torch

from stoichconv.nn import StoichHypergraphConv
from stoichconv.reference import StoichHypergraphConv as ReferenceConv
from stoichconv.testing import assert_close_scaled, tolerance

N, M, NNZ, F, C = 12, 9, 40, 16, 8
OPTIONS = {
    "plain": dict(),
    "gated": dict(is_stoich_gated=True),
    "attention_node": dict(use_attention=True, heads=2),
    "gated_attention_node_mean": dict(is_stoich_gated=True, use_attention=True, heads=2, concat=False),
    "gated_attention_edge": dict(is_stoich_gated=True, use_attention=True, heads=2, attention_mode="edge"),
}
MODES = ["autocast-bf16", "autocast-fp16", "module-bf16", "module-fp16"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _graph(seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, N, (NNZ,), generator=g), torch.randint(0, M, (NNZ,), generator=g)])
    stoich = torch.randn(NNZ, generator=g)
    x = torch.randn(N, F, generator=g)
    attr = torch.randn(M, F, generator=g)
    return edge_index, stoich, x, attr


def _reduction_length(edge_index) -> int:
    longest_row = max(int(torch.bincount(edge_index[0]).max()), int(torch.bincount(edge_index[1]).max()))
    return F + 2 * longest_row


def _run(layer, x, edge_index, stoich, attr):
    x = x.detach().requires_grad_(True)
    out = layer(x, edge_index, stoich, hyperedge_attr=attr, num_edges=M)
    out.double().square().sum().backward()
    return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_reduced_precision_matches_float64(kind, option, mode):
    how, name = mode.split("-")
    dtype = DTYPES[name]
    edge_index, stoich, x, attr = _graph()
    torch.manual_seed(0)
    reference = ReferenceConv(F, C, **OPTIONS[option])
    torch.nn.init.normal_(reference.bias, std=0.1)
    layer = (StoichHypergraphConv(F, C, backend="cpu", **OPTIONS[option]) if kind == "fast"
             else copy.deepcopy(reference))
    layer.load_state_dict(reference.state_dict())
    if how == "module":
        layer = layer.to(dtype)
        x, stoich, attr = x.to(dtype), stoich.to(dtype), attr.to(dtype)
        out, gx, grads = _run(layer, x, edge_index, stoich, attr)
        assert out.dtype == dtype and gx.dtype == dtype
    else:
        with torch.autocast("cpu", dtype=dtype):
            out, gx, grads = _run(layer, x, edge_index, stoich, attr)
        if kind == "fast":
            assert out.dtype == dtype  # the kernels ran in the autocast dtype
        assert gx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    # float64 reference on the very values the layer saw (the rounded ones for a module run)
    reference64 = copy.deepcopy(reference).double()
    if how == "module":
        reference64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    want, want_gx, want_grads = _run(reference64, x.double(), edge_index, stoich.double(), attr.double())
    bound = tolerance(dtype, _reduction_length(edge_index))[0]
    assert_close_scaled(out, want, bound, "out")
    # gradients norm-wise over the whole gradient (dL/dx and every parameter's): a parameter
    # gradient sums over every incidence and may cancel to far below its terms (the gate bias)
    scale = max(float(g.abs().max()) for g in [want_gx, *want_grads.values()])
    for n, g, w in [("dL/dx", gx, want_gx)] + [(n, g, want_grads[n]) for n, g in grads.items()]:
        assert g is not None and bool(torch.isfinite(g).all()), n
        assert_close_scaled(g, w, bound * scale / max(float(w.abs().max()), 1e-30), n)
