"""Fast HeteroCell (stoichconv.models.hetero_cell) against the PyG reference
(stoichconv.reference.hetero_cell), in float64: predictions, z_w, z_i, z_p and every
parameter gradient, on small synthetic cell graphs and on the real-size one, for this package's
configurations (the torchcell ones: test_torchcell.py). In train mode with dropout both models run
under the same seed: the fast model draws the reference's masks (same calls, same order)."""

import pytest
import torch

from stoichconv.data import load_cell_graph, random_perturbations
from stoichconv.models.hetero_cell import HeteroCell as FastHeteroCell
from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.types import EdgeSet
from stoichconv.reference.hetero_cell import HeteroCell as RefHeteroCell, nan_mse_loss
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.train import make_small_cell_graph

UNUSED_PREFIXES = ("reaction_embedding", "metabolite_embedding")
UNUSED_RELATIONS = ("<gene___gpr___reaction>", "<metabolite___reaction___metabolite>")


def _double_graph(graph):
    met = graph["metabolite", "reaction", "metabolite"]
    met.stoichiometry = met.stoichiometry.double()
    return graph


def _pair(graph, metabolism_to_gene, hidden, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = RefHeteroCell.from_cell_graph(graph, hidden_channels=hidden, metabolism_to_gene=metabolism_to_gene,
                                        **kwargs).double()
    fast = FastHeteroCell.from_cell_graph(graph, hidden_channels=hidden, metabolism_to_gene=metabolism_to_gene,
                                          **kwargs).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _loss(pred, latents):
    # touches every output so that every reachable parameter gets a gradient
    return pred.pow(2).sum() + (latents["z_p"] * torch.linspace(-1, 1, latents["z_p"].size(1),
                                                                 dtype=pred.dtype)).sum()


def _rel(a, b, scale=None):
    a, b = a.detach(), b.detach()
    scale = b.abs().max() if scale is None else torch.as_tensor(scale).detach()
    return float((a - b).abs().max() / scale) if scale > 0 else float((a - b).abs().max())


def _compare(graph, batch_size, metabolism_to_gene, hidden, seed=0, train=True, **kwargs):
    ref, fast = _pair(graph, metabolism_to_gene, hidden, seed, **kwargs)
    ref.train(train)
    fast.train(train)
    num_genes = int(graph["gene"].num_nodes)
    pert, pert_ptr = random_perturbations(num_genes, batch_size, sizes=(1, 2, 3), seed=seed + 1)
    batch = perturb_batch_reference(graph, pert, pert_ptr)
    torch.manual_seed(seed + 100)  # the same dropout masks in both models
    pred_r, lat_r = ref(graph, batch)
    _loss(pred_r, lat_r).backward()
    torch.manual_seed(seed + 100)
    pred_f, lat_f = fast(graph, pert, pert_ptr)
    _loss(pred_f, lat_f).backward()
    assert pred_f.shape == (batch_size, 2)
    assert _rel(pred_f, pred_r) < 1e-6
    for key in ("z_w", "z_i"):
        assert lat_f[key].shape == lat_r[key].shape
        assert _rel(lat_f[key], lat_r[key]) < 1e-6, key
    # z_p = z_w - z_i cancels: measure against the size of its terms
    assert _rel(lat_f["z_p"], lat_r["z_p"], lat_r["z_w"].abs().max()) < 1e-6
    fast_params = dict(fast.named_parameters())
    grads = [p.grad.abs().max() for p in ref.parameters() if p.grad is not None]
    global_scale = max(grads)
    for name, p in ref.named_parameters():
        q = fast_params[name]
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert q.grad is not None, name
        # analytically zero gradients (the pool's gate bias: softmax is shift invariant) are
        # rounding noise: compare them against the global gradient scale
        scale = max(p.grad.abs().max(), 1e-6 * global_scale)
        assert _rel(q.grad, p.grad, scale) < 1e-6, name
    fast_buffers = dict(fast.named_buffers())
    for name, b in ref.named_buffers():  # BatchNorm running statistics
        assert torch.allclose(fast_buffers[name], b, rtol=1e-9, atol=1e-12), name
    return ref, fast


def _unused(name):
    return name.startswith(UNUSED_PREFIXES) or any(rel in name for rel in UNUSED_RELATIONS)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("metabolism_to_gene", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_graph_equivalence(batch_size, metabolism_to_gene, seed):
    graph = _double_graph(make_small_cell_graph(seed=seed))
    ref, fast = _compare(graph, batch_size, metabolism_to_gene, hidden=8, seed=seed)
    names = [n for n, _ in ref.named_parameters()]
    if metabolism_to_gene:
        # the reaction -> gene relation lets metabolism reach the prediction: every parameter learns
        assert all(p.grad is not None for p in ref.parameters())
        assert all(p.grad is not None for p in fast.parameters())
    else:
        # the seed's design: GPR, metabolism and the reaction / metabolite embeddings never reach
        # the prediction, so they get no gradient (DDP needs find_unused_parameters=True)
        unused = {n for n, p in ref.named_parameters() if p.grad is None}
        assert unused == {n for n in names if _unused(n)}
        assert unused  # the fact documented in the model


def test_small_graph_other_shapes():
    graph = _double_graph(make_small_cell_graph(num_genes=30, num_reactions=12, num_metabolites=10, seed=3))
    _compare(graph, 4, True, hidden=12, heads=3, num_layers=2)


# Configurations beyond torchcell's (metabolism_to_gene lets the GPR and metabolism relations reach
# the prediction, so their options are checked through predictions and gradients too).
NATIVE_CONFIGS = {
    "batch_norm_dropout": dict(hidden=8, heads=3, num_layers=2, norm="batch", dropout=0.2, activation="gelu",
                               head_num_layers=2),
    "gpr_self_loops": dict(hidden=10, heads=4, num_layers=2, norm="batch", dropout=0.1, gpr_add_self_loops=True,
                           gpr_heads=2, gene_add_self_loops=True, gene_concat=False, activation="leaky_relu",
                           head_norm=None),
    "no_attention": dict(hidden=8, heads=2, num_layers=3, dropout=0.25, metabolism_attention=False,
                         metabolism_gated=False, gpr_concat=False, activation="tanh", head_dropout=0.3),
    "averaged_heads": dict(hidden=12, heads=5, num_layers=2, norm=None, metabolism_concat=False, gpr_heads=3,
                           activation="sigmoid", head_hidden_channels=7, head_norm="batch", dropout=0.15),
}


@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
@pytest.mark.parametrize("train", [True, False])
def test_small_graph_configurations(name, train):
    config = dict(NATIVE_CONFIGS[name])
    hidden = config.pop("hidden")
    graph = _double_graph(make_small_cell_graph(seed=2))
    ref, fast = _compare(graph, 4, True, hidden=hidden, train=train, **config)
    assert all(p.grad is not None for p in fast.parameters())


@pytest.mark.parametrize("metabolism_to_gene", [False, True])
def test_real_size_equivalence(metabolism_to_gene):
    graph = _double_graph(load_cell_graph(seed=0))
    _compare(graph, 4 if metabolism_to_gene else 1, metabolism_to_gene, hidden=16, num_layers=2)


def test_state_dict_round_trip():
    graph = make_small_cell_graph()
    torch.manual_seed(0)
    ref = RefHeteroCell.from_cell_graph(graph, hidden_channels=8, metabolism_to_gene=True)
    torch.manual_seed(1)
    fast = FastHeteroCell.from_cell_graph(graph, hidden_channels=8, metabolism_to_gene=True)
    assert list(ref.state_dict()) == list(fast.state_dict())
    assert all(ref.state_dict()[k].shape == v.shape for k, v in fast.state_dict().items())
    fast.load_state_dict(ref.state_dict())
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in fast.state_dict().items())
    torch.manual_seed(2)
    other = FastHeteroCell.from_cell_graph(graph, hidden_channels=8, metabolism_to_gene=True)
    ref.load_state_dict(other.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_wildtype_cache_in_eval_and_invalidation():
    graph = make_small_cell_graph()
    fast = FastHeteroCell.from_cell_graph(graph, hidden_channels=8).eval()
    pert, ptr = random_perturbations(40, 3, seed=0)
    with torch.no_grad():
        _, a = fast(graph, pert, ptr)
        _, b = fast(graph, pert, ptr)
        assert b["z_w"] is a["z_w"]  # cached
        fast.gene_embedding.weight.add_(0.5)  # in-place update bumps the version counter
        _, c = fast(graph, pert, ptr)
        assert c["z_w"] is not a["z_w"]
        assert not torch.allclose(c["z_w"], a["z_w"])
    fast.train()
    assert fast._wildtype is None
    _, d = fast(graph, pert, ptr)
    assert d["z_w"].requires_grad


def test_gatv2_attention_gradcheck():
    torch.manual_seed(0)
    H, Ch, Ns, Nd = 2, 3, 5, 4
    src = torch.tensor([0, 3, 1, 4, 2, 2, 0])
    row = torch.tensor([0, 0, 1, 1, 1, 3, 3])
    crow = torch.tensor([0, 2, 5, 5, 7])
    edges = EdgeSet(src, row.clone(), row, crow, Nd)
    x_l = torch.randn(Ns, H, Ch, dtype=torch.double, requires_grad=True)
    x_r = torch.randn(Nd, H, Ch, dtype=torch.double, requires_grad=True)
    att = torch.randn(H, Ch, dtype=torch.double, requires_grad=True)
    out = gatv2_attention(x_l, x_r, att, edges)
    assert torch.all(out[2] == 0)  # a row without edges
    torch.autograd.gradcheck(lambda a, b, c: gatv2_attention(a, b, c, edges), (x_l, x_r, att))


def test_bad_inputs_raise():
    graph = make_small_cell_graph()
    fast = FastHeteroCell.from_cell_graph(graph, hidden_channels=8)
    with pytest.raises(ValueError, match="pert_ptr"):
        fast(graph, torch.tensor([1]), torch.tensor([0]))
    FastHeteroCell.from_cell_graph(graph, hidden_channels=9, heads=2)  # 2 x 4 channels, projected to 9
    with pytest.raises(ValueError, match="hidden_channels"):
        FastHeteroCell.from_cell_graph(graph, hidden_channels=8, heads=9)
    with pytest.raises(ValueError, match="norm"):
        FastHeteroCell.from_cell_graph(graph, hidden_channels=8, norm="graph")
    with pytest.raises(ValueError, match="activation"):
        FastHeteroCell.from_cell_graph(graph, hidden_channels=8, activation="swish")
    with pytest.raises(ValueError, match="gene"):
        fast(make_small_cell_graph(num_genes=41), torch.tensor([1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pred"):
        nan_mse_loss(torch.zeros(2, 2), torch.zeros(3, 2))


def test_nan_mse_loss_ignores_nan():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, float("nan")], [3.0, 2.0]])
    assert torch.isclose(nan_mse_loss(pred, target), torch.tensor((1.0 + 0.0 + 4.0) / 3))
