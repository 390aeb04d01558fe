"""The drop-in layer against the reference PyG layer with shared weights, on every backend of
the stoich conv's table entry and device (the layer passes ``backend`` down to its ops; Triton on
CPU tensors is left to tests/ops/test_triton_gpu_path.py, the option matrix would take minutes
through the interpreter)."""

import itertools

import pytest
import torch
from torch_geometric.nn import HeteroConv

from stoichconv.data.relations import METABOLISM
from stoichconv.nn import StoichHypergraphConv as FastConv
from stoichconv.reference import StoichHypergraphConv as ReferenceConv
from stoichconv.testing import backend_params, compact_metabolic_batch, random_hypergraph, random_keep

N, M, NNZ, F_IN, C = 9, 7, 30, 5, 4
BACKENDS = backend_params("stoich_conv", reference=True, exclude=("triton-cpu",))
OPTIONS = [
    dict(is_stoich_gated=gate, use_attention=mode is not None, attention_mode=mode or "node", heads=heads, concat=concat)
    for gate, mode, heads, concat in itertools.product([False, True], [None, "node", "edge"], [1, 2, 10], [True, False])
]


def option_id(o):
    att = o["attention_mode"] if o["use_attention"] else "noatt"
    return f"gate{int(o['is_stoich_gated'])}-{att}-h{o['heads']}-{'cat' if o['concat'] else 'mean'}"


def paired_layers(options, backend="cpu", seed=0, device="cpu"):
    torch.manual_seed(seed)
    reference = ReferenceConv(F_IN, C, **options).double()
    if reference.bias is not None:
        torch.nn.init.normal_(reference.bias)
    fast = FastConv(F_IN, C, backend=backend, **options).double()
    fast.load_state_dict(reference.state_dict())
    return reference.to(device), fast.to(device)


def graph(seed=0, device="cpu"):
    edge_index, stoich = random_hypergraph(N, M, NNZ, seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(N, F_IN, generator=gen, dtype=torch.float64)
    attr = torch.randn(M, F_IN, generator=gen, dtype=torch.float64)
    return tuple(t.to(device) for t in (edge_index, stoich, x, attr))


def assert_same_forward_backward(reference, fast, ref_args, fast_args, ref_x, fast_x, reshape=lambda t: t):
    ref_x, fast_x = ref_x.clone().requires_grad_(), fast_x.clone().requires_grad_()
    ref_out, fast_out = reference(ref_x, *ref_args), fast(fast_x, *fast_args)
    torch.testing.assert_close(reshape(fast_out), ref_out, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(ref_out)
    ref_out.backward(grad)
    fast_out.backward(grad.view_as(fast_out))
    torch.testing.assert_close(fast_x.grad.reshape(ref_x.grad.shape), ref_x.grad, rtol=1e-10, atol=1e-12)
    ref_params, fast_params = dict(reference.named_parameters()), dict(fast.named_parameters())
    assert ref_params.keys() == fast_params.keys()
    for name, p in ref_params.items():
        torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_layer_matches_reference(backend, device, options):
    reference, fast = paired_layers(options, backend, device=device)
    edge_index, stoich, x, attr = graph(device=device)
    args = (edge_index, stoich, attr, M)
    assert_same_forward_backward(reference, fast, args, args, x, x)


@pytest.mark.parametrize("options", [o for o in OPTIONS if o["heads"] in (1, 2)], ids=option_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_shared_topology_batch_matches_compacted_reference(backend, device, options):
    """x [B, N, F] + reaction_keep equals the reference on the filtered,
    compacted block-diagonal graph (masked incidences also leave the softmax)."""
    B = 3
    reference, fast = paired_layers(options, backend, device=device)
    edge_index, stoich, _, attr = graph(seed=1, device=device)
    x = torch.randn(B, N, F_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(device)
    keep = random_keep(B, M, seed=7, device=device)
    compact, compact_stoich, kept_reactions = compact_metabolic_batch(edge_index, stoich, keep, N)
    assert_same_forward_backward(
        reference, fast,
        (compact, compact_stoich, attr[kept_reactions], int(keep.sum())),
        (edge_index, stoich, attr, M, keep),
        x.reshape(B * N, F_IN), x,
        reshape=lambda t: t.reshape(B * N, -1),
    )


def test_state_dict_loads_both_ways():
    options = dict(is_stoich_gated=True, use_attention=True, heads=2)
    reference, fast = ReferenceConv(F_IN, C, **options), FastConv(F_IN, C, **options)
    assert list(reference.state_dict()) == list(fast.state_dict())
    reference.load_state_dict(fast.state_dict())
    for name, tensor in fast.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor)


def test_bias_shape_fixed_without_attention():
    layer = FastConv(F_IN, C, heads=3, concat=True)  # the seed crashed here
    edge_index, stoich, x, _ = graph()
    assert layer.bias.shape == (C,)
    assert layer(x.float(), edge_index, stoich.float()).shape == (N, C)


def test_empty_graph_returns_bias():
    layer = FastConv(F_IN, C).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(4, F_IN, dtype=torch.float64)
    out = layer(x, torch.empty(2, 0, dtype=torch.long), torch.empty(0, dtype=torch.float64))
    torch.testing.assert_close(out, layer.bias.expand(4, C))


def test_inside_hetero_conv_with_extra_dicts():
    options = dict(is_stoich_gated=True, use_attention=True, heads=2)
    reference, fast = paired_layers(options, "cpu")
    edge_index, stoich, x, attr = graph()
    rel = METABOLISM
    outs = []
    for layer in (reference, fast):
        conv = HeteroConv({rel: layer}, aggr="sum")
        outs.append(conv({"metabolite": x}, {rel: edge_index}, stoich_dict={rel: stoich},
                         hyperedge_attr_dict={rel: attr}, num_edges_dict={rel: M})["metabolite"])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


def test_plan_is_cached_per_graph():
    layer = FastConv(F_IN, C).double()
    edge_index, stoich, x, _ = graph()
    layer(x, edge_index, stoich)
    plan = layer._plans._plan
    layer(x, edge_index, stoich)
    assert layer._plans._plan is plan
    other_edge_index, other_stoich, _, _ = graph(seed=3)
    out = layer(x, other_edge_index, other_stoich)
    assert layer._plans._plan is not plan
    fresh = FastConv(F_IN, C).double()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out, fresh(x, other_edge_index, other_stoich))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda l, e, s, x, a: l(x.long(), e, s, a, M), ValueError, "`x` must be a floating tensor"),
        (lambda l, e, s, x, a: l(x, e, s, None, M), ValueError, "`hyperedge_attr` is required"),
        (lambda l, e, s, x, a: l(x, e, s, a[:-1], M), ValueError, r"`hyperedge_attr` must be \[M, F\]"),
        (lambda l, e, s, x, a: l(x, e, s.clone().fill_(float("nan")), a, M), ValueError, "`stoich` contains NaN"),
        (lambda l, e, s, x, a: l(x, e, s[:-1], a, M), ValueError, "`stoich` must have shape"),
        (lambda l, e, s, x, a: l(x, e.double(), s, a, M), TypeError, "`edge_index` must hold integer"),
        (lambda l, e, s, x, a: l(x, e, s, a, 2), ValueError, r"`edge_index\[1\]` \(reactions\)"),
        (lambda l, e, s, x, a: l(x[:3], e, s, a, M), ValueError, r"`edge_index\[0\]` \(metabolites\)"),
        (lambda l, e, s, x, a: l(x, e, s.to("meta"), a, M), ValueError, "are on cpu/meta"),
        (lambda l, e, s, x, a: l(x.unsqueeze(0).expand(2, N, F_IN), e, s, a, M, torch.ones(3, M, dtype=torch.bool)), ValueError, "`reaction_keep` must have shape"),
    ],
)
def test_layer_rejects_bad_input(call, exc, match):
    layer = FastConv(F_IN, C, is_stoich_gated=True, use_attention=True, heads=2).double()
    edge_index, stoich, x, attr = graph()
    with pytest.raises(exc, match=match):
        call(layer, edge_index, stoich, x, attr)


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="`attention_mode` must be one of"):
        FastConv(F_IN, C, use_attention=True, attention_mode="bogus")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        FastConv(F_IN, C, backend="bogus")


@pytest.mark.parametrize("gate,attention", [(False, False), (True, False), (False, True)])
def test_layer_passes_a_shared_weight_unexpanded(gate, attention, monkeypatch):
    """Review finding 6: without a per-sample factor (no gate, no attention) the layer hands the
    op one weight [1, nnz, H] for the whole batch (never expanded to [B, nnz, H]); with a gate or
    attention the weight is per sample. Either way the batch equals the compacted reference."""
    import stoichconv.nn.stoich_hypergraph_conv as layer_module

    shapes = []
    real = layer_module.stoich_conv

    def recording(y, weight, *args, **kwargs):
        shapes.append(tuple(weight.shape))
        return real(y, weight, *args, **kwargs)

    monkeypatch.setattr(layer_module, "stoich_conv", recording)
    options = dict(is_stoich_gated=gate, use_attention=attention, heads=2 if attention else 1)
    B = 4
    reference, fast = paired_layers(options)
    edge_index, stoich, _, attr = graph(seed=2)
    x = torch.randn(B, N, F_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    keep = random_keep(B, M, seed=8)
    compact, compact_stoich, kept_reactions = compact_metabolic_batch(edge_index, stoich, keep, N)
    assert_same_forward_backward(
        reference, fast,
        (compact, compact_stoich, attr[kept_reactions], int(keep.sum())),
        (edge_index, stoich, attr, M, keep),
        x.reshape(B * N, F_IN), x,
        reshape=lambda t: t.reshape(B * N, -1),
    )
    H = options["heads"]
    assert shapes == [(1 if not (gate or attention) else B, NNZ, H)]


def test_gated_attention_weight_gradcheck_and_matches_autograd():
    from stoichconv.nn.stoich_hypergraph_conv import _GatedAttentionWeight

    g = torch.Generator().manual_seed(3)
    B, nnz, H, N = 3, 11, 2, 5
    stoich = torch.randn(nnz, generator=g, dtype=torch.float64)
    index = torch.randint(0, N, (nnz,), generator=g)
    gate = torch.rand(B, N, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(B, nnz, H, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _GatedAttentionWeight.apply(stoich, a, index, b), (gate, alpha))
    grad = torch.randn(B, nnz, H, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(_GatedAttentionWeight.apply(stoich, gate, index, alpha), (gate, alpha), grad)
    plain = stoich.view(1, -1, 1) * gate.index_select(1, index).unsqueeze(-1) * alpha
    want = torch.autograd.grad(plain, (gate, alpha), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
