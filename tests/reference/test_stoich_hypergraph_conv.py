"""Tests of the reference layer ``StoichHypergraphConv`` and of the dense ground truth."""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from stoichconv.reference.dense import dense_stoich_conv
from stoichconv.reference.stoich_hypergraph_conv import StoichHypergraphConv
from stoichconv.testing import spec_test_vector

F64 = dict(rtol=1e-10, atol=1e-12)

# The hand-computed test vector (float32, the layer's default dtype).
SPEC_X, SPEC_EDGE_INDEX, SPEC_STOICH, _, _, SPEC_OUT = spec_test_vector(torch.float32)

# Every option combination: gate × attention × heads × concat.
ATTENTION = [None, "node", "edge"]
COMBOS = list(itertools.product([False, True], ATTENTION, [1, 2], [True, False]))


def make_layer(in_channels, out_channels, gated, attention, heads, concat, seed=0, **kwargs):
    """A float64 layer with random (non-zero) parameters, bias included."""
    torch.manual_seed(seed)
    layer = StoichHypergraphConv(
        in_channels, out_channels, is_stoich_gated=gated, use_attention=attention is not None,
        attention_mode=attention or "node", heads=heads, concat=concat, **kwargs,
    ).double()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.7)
    return layer.eval()


def random_hypergraph(seed, num_nodes=9, num_edges=6, in_channels=5):
    """A hypergraph with the awkward cases: the last metabolite is isolated, the last reaction has
    no incidence, reaction 0 repeats a (v, e) pair, reaction 1 has only zero coefficients, and the
    coefficients are fractional and signed (one more is exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    metabolites, reactions = [], []
    for e in range(num_edges - 1):
        members = torch.randperm(num_nodes - 1, generator=gen)[: 2 + e % 3].tolist()
        metabolites += members
        reactions += [e] * len(members)
    metabolites.append(metabolites[0])  # repeated incidence of reaction 0
    reactions.append(0)
    edge_index = torch.tensor([metabolites, reactions])
    nnz = edge_index.size(1)
    magnitude = 0.25 + 2.75 * torch.rand(nnz, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(nnz, generator=gen) < 0.5, -1.0, 1.0).double()
    stoich = magnitude * sign
    stoich[edge_index[1] == 1] = 0.0
    stoich[-2] = 0.0
    order = torch.randperm(nnz, generator=gen)
    x = torch.randn(num_nodes, in_channels, generator=gen, dtype=torch.float64)
    hyperedge_attr = torch.randn(num_edges, in_channels, generator=gen, dtype=torch.float64)
    return x, edge_index[:, order], stoich[order], hyperedge_attr


def loop_attention(layer, y, z, edge_index):
    """α [nnz, H] from the layer's parameters, one incidence and one head at a time."""
    heads, channels = y.size(1), y.size(2)
    att = layer.att[0]
    metabolite, reaction = edge_index.tolist()
    scores = torch.stack([
        torch.stack([
            F.leaky_relu(
                att[h, :channels] @ y[v, h] + att[h, channels:] @ z[e, h], layer.negative_slope
            )
            for h in range(heads)
        ])
        for v, e in zip(metabolite, reaction)
    ])
    group = reaction if layer.attention_mode == "node" else metabolite
    return torch.stack([
        scores[k].exp() / scores[[j for j, g in enumerate(group) if g == group[k]]].exp().sum(0)
        for k in range(len(group))
    ])


def expected_output(layer, x, edge_index, stoich, hyperedge_attr, num_edges):
    """The layer's output rebuilt from its parameters around ``dense_stoich_conv``."""
    num_nodes = x.size(0)
    heads, channels = layer.heads, layer.out_channels
    y = (x @ layer.lin.weight.T).view(num_nodes, heads, channels)
    gate = None
    if layer.is_stoich_gated:
        gate = torch.sigmoid(x @ layer.gate_lin.weight.T + layer.gate_lin.bias)
    alpha = None
    if layer.use_attention:
        z = (hyperedge_attr @ layer.lin.weight.T).view(num_edges, heads, channels)
        alpha = loop_attention(layer, y, z, edge_index)
    out = dense_stoich_conv(y, edge_index, stoich, num_nodes, num_edges, gate=gate, alpha=alpha)
    out = out.reshape(num_nodes, heads * channels) if layer.concat else out.mean(dim=1)
    return out + layer.bias


def capture_message_kwargs(layer):
    """Record the keyword arguments of every ``message`` call; returns (list, hook handle)."""
    calls = []
    handle = layer.register_message_forward_pre_hook(lambda module, inputs: calls.append(inputs[0]))
    return calls, handle


# --- the spec's test vector and the dense ground truth ------------------------------------------

def test_spec_test_vector():
    layer = StoichHypergraphConv(3, 3)
    with torch.no_grad():
        layer.lin.weight.copy_(torch.eye(3))
    assert torch.count_nonzero(layer.bias) == 0
    out = layer(SPEC_X, SPEC_EDGE_INDEX, SPEC_STOICH)
    assert torch.equal(out, SPEC_OUT)
    assert torch.equal(layer(SPEC_X, SPEC_EDGE_INDEX, SPEC_STOICH, num_edges=1), SPEC_OUT)


def test_dense_on_spec_test_vector():
    out = dense_stoich_conv(SPEC_X, SPEC_EDGE_INDEX, SPEC_STOICH, num_nodes=4, num_edges=1)
    assert out.dtype == torch.float64 and out.shape == (4, 1, 3)
    torch.testing.assert_close(out[:, 0], SPEC_OUT.double(), rtol=0, atol=1e-15)


def test_dense_hand_computed_two_reactions():
    # r0: m0 -> 2 m1 (m1 produced via two repeated incidences 1.5 + 0.5), r1: m1 -> m2.
    # S = [[-1, 0], [2, -1], [0, 1]], D = diag(1, 1/3, 1), B = diag(1/3, 1/2), Y = I.
    # h = B Sᵀ = [[-1/3, 2/3, 0], [0, -1/2, 1/2]];  out = D S h.
    edge_index = torch.tensor([[0, 1, 1, 1, 2], [0, 0, 0, 1, 1]])
    stoich = torch.tensor([-1.0, 1.5, 0.5, -1.0, 1.0])
    expected = torch.tensor([
        [1 / 3, -2 / 3, 0.0],
        [-2 / 9, 11 / 18, -1 / 6],
        [0.0, -1 / 2, 1 / 2],
    ], dtype=torch.float64)
    out = dense_stoich_conv(torch.eye(3), edge_index, stoich, num_nodes=3, num_edges=2)
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-15)

    # Gate g = (1, 0.5, 2) and two heads with α = 1 and α = 0.5 on every incidence:
    # W_h = α_h · diag(g) S, while D and B are unchanged, so out_h = α_h² · diag(g) D S diag(g) h.
    gate = torch.tensor([1.0, 0.5, 2.0])
    alpha = torch.tensor([[1.0, 0.5]]).expand(5, 2)
    gated = torch.diag(gate.double()) @ expected @ torch.diag(gate.double())
    y = torch.eye(3).unsqueeze(1).expand(3, 2, 3)
    out = dense_stoich_conv(y, edge_index, stoich, 3, 2, gate, alpha)
    torch.testing.assert_close(out[:, 0], gated, rtol=0, atol=1e-15)
    torch.testing.assert_close(out[:, 1], 0.25 * gated, rtol=0, atol=1e-15)


# --- the layer against the dense formula ---------------------------------------------------------

@pytest.mark.parametrize("gated,attention,heads,concat", COMBOS)
def test_layer_matches_dense(gated, attention, heads, concat):
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=1)
    layer = make_layer(5, 4, gated, attention, heads, concat)
    out = layer(x, edge_index, stoich, hyperedge_attr, num_edges=6)
    width = layer.heads * 4 if concat else 4
    assert out.shape == (9, width) and out.dtype == torch.float64
    expected = expected_output(layer, x, edge_index, stoich, hyperedge_attr, 6)
    torch.testing.assert_close(out, expected, **F64)


@pytest.mark.parametrize("gated,attention", [(False, None), (True, "node"), (True, "edge")])
def test_gradients_match_dense(gated, attention):
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=2)
    layer = make_layer(5, 3, gated, attention, heads=2, concat=True)
    grad_out = torch.randn(9, layer.heads * 3, dtype=torch.float64)

    def grads(forward):
        inputs = [x.clone().requires_grad_(), stoich.clone().requires_grad_()]
        layer.zero_grad()
        (forward(*inputs) * grad_out).sum().backward()
        return [t.grad for t in inputs] + [p.grad for p in layer.parameters()]

    got = grads(lambda x_, s_: layer(x_, edge_index, s_, hyperedge_attr, num_edges=6))
    want = grads(lambda x_, s_: expected_output(layer, x_, edge_index, s_, hyperedge_attr, 6))
    assert all(g is not None for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


def test_dropout_mask_shared_by_both_stages():
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=3)
    layer = make_layer(5, 3, True, "node", heads=2, concat=True, dropout=0.5).train()
    calls, handle = capture_message_kwargs(layer)
    torch.manual_seed(0)
    out = layer(x, edge_index, stoich, hyperedge_attr, num_edges=6)
    handle.remove()
    assert len(calls) == 2
    alpha = calls[0]["alpha"]
    assert torch.equal(alpha, calls[1]["alpha"])
    assert (alpha == 0).any() and (alpha > 1).any()  # dropped and rescaled entries

    y = (x @ layer.lin.weight.T).view(9, 2, 3)
    gate = torch.sigmoid(x @ layer.gate_lin.weight.T + layer.gate_lin.bias)
    expected = dense_stoich_conv(y, edge_index, stoich, 9, 6, gate, alpha).reshape(9, 6)
    torch.testing.assert_close(out, expected + layer.bias, **F64)


# --- invariants -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gated,attention,heads,concat", [
    (False, None, 1, True), (True, "node", 2, True), (True, "edge", 2, False),
])
def test_zero_stoich_gives_bias(gated, attention, heads, concat):
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=4)
    layer = make_layer(5, 4, gated, attention, heads, concat)
    out = layer(x, edge_index, torch.zeros_like(stoich), hyperedge_attr, num_edges=6)
    assert torch.equal(out, layer.bias.expand_as(out))


@pytest.mark.parametrize("gated,attention,heads,concat", [
    (False, None, 1, True), (True, "node", 2, True), (True, "edge", 2, False),
])
def test_isolated_metabolite_gives_bias(gated, attention, heads, concat):
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=5)
    assert not (edge_index[0] == 8).any()
    layer = make_layer(5, 4, gated, attention, heads, concat)
    out = layer(x, edge_index, stoich, hyperedge_attr, num_edges=6)
    assert torch.equal(out[8], layer.bias)
    assert not torch.equal(out[:8], layer.bias.expand(8, -1))


@pytest.mark.parametrize("attention", ["node", "edge"])
def test_attention_sums_to_one_per_group(attention):
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=6)
    layer = make_layer(5, 4, False, attention, heads=3, concat=True)
    calls, handle = capture_message_kwargs(layer)
    layer(x, edge_index, stoich, hyperedge_attr, num_edges=6)
    handle.remove()
    alpha = calls[0]["alpha"]
    assert alpha.shape == (edge_index.size(1), 3)
    group = edge_index[1] if attention == "node" else edge_index[0]
    for g in group.unique():
        torch.testing.assert_close(alpha[group == g].sum(0), torch.ones(3, dtype=torch.float64),
                                   **F64)
    if attention == "node":
        # Parity quirk: the same α reused in stage 2 does not sum to 1 per metabolite.
        per_metabolite = torch.zeros(9, 3, dtype=torch.float64).index_add_(0, edge_index[0], alpha)
        assert not torch.allclose(per_metabolite[:8], torch.ones(8, 3, dtype=torch.float64))


@pytest.mark.parametrize("attention", [None, "node", "edge"])
def test_permuting_incidences_keeps_output(attention):
    x, edge_index, stoich, hyperedge_attr = random_hypergraph(seed=7)
    layer = make_layer(5, 4, True, attention, heads=2, concat=True)
    perm = torch.randperm(edge_index.size(1), generator=torch.Generator().manual_seed(1))
    out = layer(x, edge_index, stoich, hyperedge_attr, num_edges=6)
    permuted = layer(x, edge_index[:, perm], stoich[perm], hyperedge_attr, num_edges=6)
    torch.testing.assert_close(permuted, out, **F64)


@pytest.mark.parametrize("attention", [None, "node", "edge"])
def test_block_diagonal_batch_equals_one_by_one(attention):
    graphs = [random_hypergraph(seed=8), random_hypergraph(seed=9, num_nodes=7, num_edges=4)]
    counts = [(9, 6), (7, 4)]
    layer = make_layer(5, 4, True, attention, heads=2, concat=False)
    separate = [
        layer(x, ei, s, attr, num_edges=m) for (x, ei, s, attr), (_, m) in zip(graphs, counts)
    ]

    # Graph 0 ends with a reaction without incidence: the reaction offset must be its reaction
    # count M, not edge_index[1].max() + 1.
    offset = torch.tensor([[counts[0][0]], [counts[0][1]]])
    x = torch.cat([graphs[0][0], graphs[1][0]])
    edge_index = torch.cat([graphs[0][1], graphs[1][1] + offset], dim=1)
    stoich = torch.cat([graphs[0][2], graphs[1][2]])
    hyperedge_attr = torch.cat([graphs[0][3], graphs[1][3]])
    batched = layer(x, edge_index, stoich, hyperedge_attr, num_edges=10)
    torch.testing.assert_close(batched, torch.cat(separate), **F64)


# --- empty graphs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gated,attention,heads,concat", [
    (False, None, 1, True), (True, "node", 2, True), (True, "edge", 2, False),
])
@pytest.mark.parametrize("num_nodes,num_edges", [(4, None), (4, 3), (0, None), (0, 2)])
def test_empty_graph_gives_bias(gated, attention, heads, concat, num_nodes, num_edges):
    layer = make_layer(5, 4, gated, attention, heads, concat)
    x = torch.randn(num_nodes, 5, dtype=torch.float64)
    hyperedge_attr = torch.randn(num_edges or 0, 5, dtype=torch.float64)
    edge_index = torch.empty(2, 0, dtype=torch.long)
    out = layer(x, edge_index, torch.empty(0, dtype=torch.float64), hyperedge_attr, num_edges)
    width = layer.heads * 4 if concat else 4
    assert out.shape == (num_nodes, width)
    assert torch.equal(out, layer.bias.expand(num_nodes, width))


# --- parameter layout -----------------------------------------------------------------------------

# The seed's parameter layout, written out for in_channels=5, out_channels=4, in state_dict order
# (the layer's own parameters first, then those of lin and gate_lin).
SEED_LAYOUT = [
    (dict(), {"bias": (4,), "lin.weight": (4, 5)}),
    (dict(bias=False), {"lin.weight": (4, 5)}),
    (dict(is_stoich_gated=True, concat=False),
     {"bias": (4,), "lin.weight": (4, 5), "gate_lin.weight": (1, 5), "gate_lin.bias": (1,)}),
    (dict(use_attention=True, heads=3),
     {"att": (1, 3, 8), "bias": (12,), "lin.weight": (12, 5)}),
    (dict(use_attention=True, heads=3, concat=False),
     {"att": (1, 3, 8), "bias": (4,), "lin.weight": (12, 5)}),
    (dict(is_stoich_gated=True, use_attention=True, attention_mode="edge", heads=2),
     {"att": (1, 2, 8), "bias": (8,), "lin.weight": (8, 5), "gate_lin.weight": (1, 5),
      "gate_lin.bias": (1,)}),
    # The seed built a (8,) bias here and crashed on the [N, 4] output; the fix sizes it (4,).
    (dict(heads=2), {"bias": (4,), "lin.weight": (4, 5)}),
]


@pytest.mark.parametrize("kwargs,layout", SEED_LAYOUT)
def test_state_dict_layout(kwargs, layout):
    layer = StoichHypergraphConv(5, 4, **kwargs)
    state = layer.state_dict()
    assert list(state) == list(layout)
    assert {k: tuple(v.shape) for k, v in state.items()} == layout


def test_heads_without_attention_runs_with_fixed_bias():
    layer = StoichHypergraphConv(3, 3, heads=2, concat=True)
    with torch.no_grad():
        layer.lin.weight.copy_(torch.eye(3))
        layer.bias.fill_(1.0)
    assert layer.heads == 1
    assert torch.equal(layer(SPEC_X, SPEC_EDGE_INDEX, SPEC_STOICH), SPEC_OUT + 1.0)


# --- input validation -----------------------------------------------------------------------------

def _valid_inputs():
    return dict(
        x=SPEC_X.clone(), edge_index=SPEC_EDGE_INDEX.clone(), stoich=SPEC_STOICH.clone(),
        hyperedge_attr=torch.randn(1, 3), num_edges=None,
    )


BAD_INPUTS = [
    ("edge_index", SPEC_EDGE_INDEX.float(), TypeError, "edge_index"),
    ("edge_index", SPEC_EDGE_INDEX.bool(), TypeError, "edge_index"),
    ("edge_index", SPEC_EDGE_INDEX[0], ValueError, "edge_index"),
    ("edge_index", torch.tensor([[0, 1, 2], [0, 0, 0], [0, 0, 0]]), ValueError, "edge_index"),
    ("edge_index", torch.tensor([[0, -1, 2], [0, 0, 0]]), ValueError, "edge_index"),
    ("edge_index", torch.tensor([[0, 1, 4], [0, 0, 0]]), ValueError, "edge_index[0]"),
    ("stoich", SPEC_STOICH[:2], ValueError, "stoich"),
    ("stoich", SPEC_STOICH.view(3, 1), ValueError, "stoich"),
    ("stoich", torch.tensor([-1, -2, 1]), TypeError, "stoich"),
    ("stoich", torch.tensor([-1.0, float("nan"), 1.0]), ValueError, "stoich"),
    ("stoich", torch.tensor([-1.0, float("inf"), 1.0]), ValueError, "stoich"),
    ("x", SPEC_X[0], ValueError, "x"),
    ("x", SPEC_X.long(), TypeError, "x"),
    ("x", SPEC_X[:, :2], ValueError, "x"),
    ("hyperedge_attr", None, ValueError, "hyperedge_attr"),
    ("hyperedge_attr", torch.randn(2, 3), ValueError, "hyperedge_attr"),
    ("hyperedge_attr", torch.randn(1, 2), ValueError, "hyperedge_attr"),
    ("num_edges", -1, ValueError, "num_edges"),
]


@pytest.mark.parametrize("name,value,error,argument", BAD_INPUTS)
def test_bad_input_raises_naming_argument(name, value, error, argument):
    layer = StoichHypergraphConv(3, 3, use_attention=True)
    inputs = _valid_inputs()
    layer(**inputs)  # the unmodified inputs are valid
    inputs[name] = value
    with pytest.raises(error, match="^" + re.escape(argument)):
        layer(**inputs)


def test_reaction_id_out_of_range_raises():
    layer = StoichHypergraphConv(3, 3)
    edge_index = torch.tensor([[0, 1, 2], [0, 0, 1]])
    layer(SPEC_X, edge_index, SPEC_STOICH, num_edges=2)
    with pytest.raises(ValueError, match=re.escape("edge_index[1]")):
        layer(SPEC_X, edge_index, SPEC_STOICH, num_edges=1)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(use_attention=True, attention_mode="hyperedge"), "attention_mode"),
    (dict(heads=0), "heads"),
])
def test_bad_construction_raises_naming_argument(kwargs, argument):
    with pytest.raises(ValueError, match="^" + argument):
        StoichHypergraphConv(3, 3, **kwargs)
