"""torchcell HeteroCell checkpoints: ``from_torchcell`` / ``to_torchcell_state_dict`` on both models.

The original model is held here as *data*, not code: for each configuration, the torchcell
constructor arguments, its ``state_dict`` keys and shapes (per-layer blocks written once with
``{l}`` for the layer index) and the predictions the original computed (torchcell 007c45e2, PyG
2.8.1, float64) on the small cell graph (``make_small_cell_graph(seed=0)``), for the synthetic
``state_dict`` built by :func:`synthetic_state_dict` from those keys and shapes:

* ``eval``: eval mode, the loaded ``state_dict`` as is;
* ``train``: train mode (``torch.manual_seed(100)``, dropout drawn by :func:`det_dropout`);
* ``step``: train mode again after one SGD step (lr 0.05) on :func:`_loss` of ``train``
  (``torch.manual_seed(101)``);
* ``step_eval``: eval mode after that step (BatchNorm running statistics included).

:func:`det_dropout` replaces ``torch.nn.functional.dropout`` during these runs: its masks come
from ``torch.rand`` (the same numbers on every CPU; ``bernoulli_`` takes a vendor-specific MKL
path), and both models must call it in the original's order with the original's shapes.
"""

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from stoichconv.data import random_perturbations
from stoichconv.models.hetero_cell import HeteroCell as FastHeteroCell
from stoichconv.reference.hetero_cell import HeteroCell as RefHeteroCell
from stoichconv.reference.hetero_cell import torchcell_config
from stoichconv.reference.perturb import perturb_batch_reference
from stoichconv.train import make_small_cell_graph

BATCH_SIZE = 4
PERT_SEED = 1
STATE_SEED = 0
LR = 0.05

# torchcell aliases: the original's state_dict lists these modules under two names
ALIASES = {
    "preprocessor.mlp.5.": "preprocessor.mlp.1.",
    "global_aggregator.aggregator.gate_nn.": "global_aggregator.gate_nn.",
    "global_aggregator.aggregator.nn.": "global_aggregator.transform_nn.",
}


# ----------------------------------------------------------------------------------------------
# Helpers (shared with the script that recorded the data from the original)
# ----------------------------------------------------------------------------------------------
def expand_keys(case: dict) -> "OrderedDict[str, tuple]":
    """The original's state_dict keys -> shapes of a case, in the original's order."""
    out = OrderedDict()
    for key, shape in case["head_keys"].items():
        out[key] = tuple(shape)
    for layer in range(case["torchcell"]["num_layers"]):
        for key, shape in case["layer_keys"].items():
            out["convs.{l}.".format(l=layer) + key] = tuple(shape)
    for key, shape in case["tail_keys"].items():
        out[key] = tuple(shape)
    return out


def canonical(key: str) -> str:
    for alias, target in ALIASES.items():
        if key.startswith(alias):
            return target + key[len(alias):]
    return key


def synthetic_state_dict(shapes: "OrderedDict[str, tuple]", seed: int = STATE_SEED) -> "OrderedDict[str, torch.Tensor]":
    """Deterministic float64 values for the original's keys (aliases share one tensor): weights
    ~ N(0, 1 / fan_in), 1-D ``weight`` (norm scales) ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), running
    means ~ N(0, 0.1), running variances ~ U(0.5, 1.5), ``num_batches_tracked`` = 3."""
    gen = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, shape in shapes.items():
        if canonical(key) != key:
            out[key] = out[canonical(key)]
            continue
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(3, dtype=torch.long)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif key.endswith("embedding.weight"):
            value = torch.randn(shape, generator=gen, dtype=torch.float64)
        elif len(shape) >= 2:
            value = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])
        elif key.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            value = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        out[key] = value
    return out


def det_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` with masks from ``torch.rand`` (vendor-independent)."""
    if not training or p == 0:
        return input
    keep = torch.rand(input.shape, dtype=input.dtype) >= p
    return input * keep / (1 - p)


def small_graph():
    graph = make_small_cell_graph(seed=0)
    met = graph["metabolite", "reaction", "metabolite"]
    met.stoichiometry = met.stoichiometry.double()
    return graph


def torchcell_kwargs(case: dict, graph) -> dict:
    return dict(case["torchcell"], gene_num=int(graph["gene"].num_nodes), reaction_num=int(graph["reaction"].num_nodes),
                metabolite_num=int(graph["metabolite"].num_nodes))


def _loss(pred, latents):
    ramp = torch.linspace(-1, 1, latents["z_p"].size(1), dtype=pred.dtype)
    return pred.pow(2).sum() + (latents["z_p"] * ramp).sum()


def run_stages(model, forward) -> dict:
    """The recorded stages (module docstring) of ``model`` called as ``forward(model)``."""
    out = {}
    model.eval()
    with torch.no_grad():
        out["eval"] = forward(model)[0].detach().clone()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(100)
    pred, latents = forward(model)
    out["train"] = pred.detach().clone()
    optimizer.zero_grad()
    _loss(pred, latents).backward()
    optimizer.step()
    torch.manual_seed(101)
    out["step"] = forward(model)[0].detach().clone()
    model.eval()
    with torch.no_grad():
        out["step_eval"] = forward(model)[0].detach().clone()
    return out


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------
CASES = {
    "checkpoint": {
        "torchcell": {"hidden_channels": 64,
                      "out_channels": 2,
                      "num_layers": 3,
                      "dropout": 0.0,
                      "norm": "layer",
                      "activation": "relu",
                      "gene_encoder_config": {"heads": 10,
                                              "concat": True,
                                              "bias": True,
                                              "add_self_loops": False,
                                              "share_weights": False},
                      "gpr_conv_config": {"heads": 10, "concat": True, "add_self_loops": False},
                      "metabolism_config": {"is_stoich_gated": True, "use_attention": True, "heads": 10, "concat": True},
                      "prediction_head_config": {"hidden_channels": 64,
                                                 "head_num_layers": 4,
                                                 "dropout": 0.0,
                                                 "activation": "relu",
                                                 "head_norm": "layer"}},
        "head_keys": {
            "gene_embedding.weight": (40, 64),
            "reaction_embedding.weight": (24, 64),
            "metabolite_embedding.weight": (18, 64),
            "preprocessor.mlp.0.weight": (64, 64),
            "preprocessor.mlp.0.bias": (64,),
            "preprocessor.mlp.1.weight": (64,),
            "preprocessor.mlp.1.bias": (64,),
            "preprocessor.mlp.4.weight": (64, 64),
            "preprocessor.mlp.4.bias": (64,),
            "preprocessor.mlp.5.weight": (64,),
            "preprocessor.mlp.5.bias": (64,),
        },
        "layer_keys": {
            "convs.<gene___physical_interaction___gene>.conv.att": (1, 10, 6),
            "convs.<gene___physical_interaction___gene>.conv.bias": (60,),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.weight": (60, 64),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.bias": (60,),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.weight": (60, 64),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.bias": (60,),
            "convs.<gene___physical_interaction___gene>.proj.weight": (64, 60),
            "convs.<gene___physical_interaction___gene>.proj.bias": (64,),
            "convs.<gene___physical_interaction___gene>.norm.weight": (64,),
            "convs.<gene___physical_interaction___gene>.norm.bias": (64,),
            "convs.<gene___regulatory_interaction___gene>.conv.att": (1, 10, 6),
            "convs.<gene___regulatory_interaction___gene>.conv.bias": (60,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.weight": (60, 64),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.bias": (60,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.weight": (60, 64),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.bias": (60,),
            "convs.<gene___regulatory_interaction___gene>.proj.weight": (64, 60),
            "convs.<gene___regulatory_interaction___gene>.proj.bias": (64,),
            "convs.<gene___regulatory_interaction___gene>.norm.weight": (64,),
            "convs.<gene___regulatory_interaction___gene>.norm.bias": (64,),
            "convs.<gene___gpr___reaction>.conv.att": (1, 10, 64),
            "convs.<gene___gpr___reaction>.conv.bias": (640,),
            "convs.<gene___gpr___reaction>.conv.lin_l.weight": (640, 64),
            "convs.<gene___gpr___reaction>.conv.lin_l.bias": (640,),
            "convs.<gene___gpr___reaction>.conv.lin_r.weight": (640, 64),
            "convs.<gene___gpr___reaction>.conv.lin_r.bias": (640,),
            "convs.<gene___gpr___reaction>.proj.weight": (64, 640),
            "convs.<gene___gpr___reaction>.proj.bias": (64,),
            "convs.<gene___gpr___reaction>.norm.weight": (64,),
            "convs.<gene___gpr___reaction>.norm.bias": (64,),
            "convs.<metabolite___reaction___metabolite>.conv.att": (1, 10, 128),
            "convs.<metabolite___reaction___metabolite>.conv.bias": (640,),
            "convs.<metabolite___reaction___metabolite>.conv.lin.weight": (640, 64),
            "convs.<metabolite___reaction___metabolite>.conv.gate_lin.weight": (1, 64),
            "convs.<metabolite___reaction___metabolite>.conv.gate_lin.bias": (1,),
            "convs.<metabolite___reaction___metabolite>.proj.weight": (64, 640),
            "convs.<metabolite___reaction___metabolite>.proj.bias": (64,),
            "convs.<metabolite___reaction___metabolite>.norm.weight": (64,),
            "convs.<metabolite___reaction___metabolite>.norm.bias": (64,),
        },
        "tail_keys": {
            "global_aggregator.gate_nn.0.weight": (32, 64),
            "global_aggregator.gate_nn.0.bias": (32,),
            "global_aggregator.gate_nn.3.weight": (1, 32),
            "global_aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.transform_nn.0.weight": (64, 64),
            "global_aggregator.transform_nn.0.bias": (64,),
            "global_aggregator.aggregator.gate_nn.0.weight": (32, 64),
            "global_aggregator.aggregator.gate_nn.0.bias": (32,),
            "global_aggregator.aggregator.gate_nn.3.weight": (1, 32),
            "global_aggregator.aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.aggregator.nn.0.weight": (64, 64),
            "global_aggregator.aggregator.nn.0.bias": (64,),
            "prediction_head.0.weight": (64, 64),
            "prediction_head.0.bias": (64,),
            "prediction_head.1.weight": (64,),
            "prediction_head.1.bias": (64,),
            "prediction_head.4.weight": (64, 64),
            "prediction_head.4.bias": (64,),
            "prediction_head.5.weight": (64,),
            "prediction_head.5.bias": (64,),
            "prediction_head.8.weight": (64, 64),
            "prediction_head.8.bias": (64,),
            "prediction_head.9.weight": (64,),
            "prediction_head.9.bias": (64,),
            "prediction_head.12.weight": (2, 64),
            "prediction_head.12.bias": (2,),
        },
        "prediction_shape": (4, 2),
        "predictions": {
            "eval": [
                0.6119216975179848, -0.18284121784601426, 1.0227759963560643, 0.09418293717998505,
                0.9445816777197725, -0.12480023448627287, 0.16158016887899404, 0.07701044877186136,
            ],
            "train": [
                0.6119216975179848, -0.18284121784601426, 1.0227759963560643, 0.09418293717998505,
                0.9445816777197725, -0.12480023448627287, 0.16158016887899404, 0.07701044877186136,
            ],
            "step": [
                -8.903200426019762, 2.0948375062757805, -8.95463149718275, 2.1717615623005484,
                -8.976185097160524, 2.2073616719633913, -9.208296310809962, 2.1715964804136916,
            ],
            "step_eval": [
                -8.903200426019762, 2.0948375062757805, -8.95463149718275, 2.1717615623005484,
                -8.976185097160524, 2.2073616719633913, -9.208296310809962, 2.1715964804136916,
            ],
        },
    },
    "batch_norm": {
        "torchcell": {"hidden_channels": 8,
                      "out_channels": 2,
                      "num_layers": 2,
                      "dropout": 0.2,
                      "norm": "batch",
                      "activation": "gelu",
                      "gene_encoder_config": {"heads": 3},
                      "metabolism_config": {},
                      "prediction_head_config": {"head_num_layers": 2}},
        "head_keys": {
            "gene_embedding.weight": (40, 8),
            "reaction_embedding.weight": (24, 8),
            "metabolite_embedding.weight": (18, 8),
            "preprocessor.mlp.0.weight": (8, 8),
            "preprocessor.mlp.0.bias": (8,),
            "preprocessor.mlp.1.weight": (8,),
            "preprocessor.mlp.1.bias": (8,),
            "preprocessor.mlp.1.running_mean": (8,),
            "preprocessor.mlp.1.running_var": (8,),
            "preprocessor.mlp.1.num_batches_tracked": (),
            "preprocessor.mlp.4.weight": (8, 8),
            "preprocessor.mlp.4.bias": (8,),
            "preprocessor.mlp.5.weight": (8,),
            "preprocessor.mlp.5.bias": (8,),
            "preprocessor.mlp.5.running_mean": (8,),
            "preprocessor.mlp.5.running_var": (8,),
            "preprocessor.mlp.5.num_batches_tracked": (),
        },
        "layer_keys": {
            "convs.<gene___physical_interaction___gene>.conv.att": (1, 3, 2),
            "convs.<gene___physical_interaction___gene>.conv.bias": (6,),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.weight": (6, 8),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.bias": (6,),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.weight": (6, 8),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.bias": (6,),
            "convs.<gene___physical_interaction___gene>.proj.weight": (8, 6),
            "convs.<gene___physical_interaction___gene>.proj.bias": (8,),
            "convs.<gene___physical_interaction___gene>.norm.module.weight": (8,),
            "convs.<gene___physical_interaction___gene>.norm.module.bias": (8,),
            "convs.<gene___physical_interaction___gene>.norm.module.running_mean": (8,),
            "convs.<gene___physical_interaction___gene>.norm.module.running_var": (8,),
            "convs.<gene___physical_interaction___gene>.norm.module.num_batches_tracked": (),
            "convs.<gene___regulatory_interaction___gene>.conv.att": (1, 3, 2),
            "convs.<gene___regulatory_interaction___gene>.conv.bias": (6,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.weight": (6, 8),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.bias": (6,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.weight": (6, 8),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.bias": (6,),
            "convs.<gene___regulatory_interaction___gene>.proj.weight": (8, 6),
            "convs.<gene___regulatory_interaction___gene>.proj.bias": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.weight": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.bias": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.running_mean": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.running_var": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.num_batches_tracked": (),
            "convs.<gene___gpr___reaction>.conv.att": (1, 1, 8),
            "convs.<gene___gpr___reaction>.conv.bias": (8,),
            "convs.<gene___gpr___reaction>.conv.lin_l.weight": (8, 8),
            "convs.<gene___gpr___reaction>.conv.lin_l.bias": (8,),
            "convs.<gene___gpr___reaction>.conv.lin_r.weight": (8, 8),
            "convs.<gene___gpr___reaction>.conv.lin_r.bias": (8,),
            "convs.<gene___gpr___reaction>.norm.module.weight": (8,),
            "convs.<gene___gpr___reaction>.norm.module.bias": (8,),
            "convs.<gene___gpr___reaction>.norm.module.running_mean": (8,),
            "convs.<gene___gpr___reaction>.norm.module.running_var": (8,),
            "convs.<gene___gpr___reaction>.norm.module.num_batches_tracked": (),
            "convs.<metabolite___reaction___metabolite>.conv.att": (1, 1, 16),
            "convs.<metabolite___reaction___metabolite>.conv.bias": (8,),
            "convs.<metabolite___reaction___metabolite>.conv.lin.weight": (8, 8),
            "convs.<metabolite___reaction___metabolite>.norm.module.weight": (8,),
            "convs.<metabolite___reaction___metabolite>.norm.module.bias": (8,),
            "convs.<metabolite___reaction___metabolite>.norm.module.running_mean": (8,),
            "convs.<metabolite___reaction___metabolite>.norm.module.running_var": (8,),
            "convs.<metabolite___reaction___metabolite>.norm.module.num_batches_tracked": (),
        },
        "tail_keys": {
            "global_aggregator.gate_nn.0.weight": (4, 8),
            "global_aggregator.gate_nn.0.bias": (4,),
            "global_aggregator.gate_nn.3.weight": (1, 4),
            "global_aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.transform_nn.0.weight": (8, 8),
            "global_aggregator.transform_nn.0.bias": (8,),
            "global_aggregator.aggregator.gate_nn.0.weight": (4, 8),
            "global_aggregator.aggregator.gate_nn.0.bias": (4,),
            "global_aggregator.aggregator.gate_nn.3.weight": (1, 4),
            "global_aggregator.aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.aggregator.nn.0.weight": (8, 8),
            "global_aggregator.aggregator.nn.0.bias": (8,),
            "prediction_head.0.weight": (8, 8),
            "prediction_head.0.bias": (8,),
            "prediction_head.1.weight": (8,),
            "prediction_head.1.bias": (8,),
            "prediction_head.1.running_mean": (8,),
            "prediction_head.1.running_var": (8,),
            "prediction_head.1.num_batches_tracked": (),
            "prediction_head.4.weight": (2, 8),
            "prediction_head.4.bias": (2,),
        },
        "prediction_shape": (4, 2),
        "predictions": {
            "eval": [
                0.17277084307172555, 0.028623513712938364, 0.17063587387455545, 0.024164025056054333,
                0.16957695658421962, 0.012318130205926536, 0.16953753285810044, 0.014408064931764053,
            ],
            "train": [
                -1.6270181287817422, 1.188115442097045, 1.0279936580188813, -0.9068976615397893,
                1.0753759231591167, 0.07875098004648884, 0.8833861578740557, -0.867218811574393,
            ],
            "step": [
                -0.48201193669080633, -0.06223007234944705, -0.1744377111722051, 0.3643154758770667,
                0.5923671174378072, 0.22119772791808276, -0.022389456165486585, 0.2681629424381077,
            ],
            "step_eval": [
                -0.17251987265609514, 0.21826365452339475, -0.16578300410503358, 0.23325931801291264,
                -0.17670170966314927, 0.2273683731507664, -0.18357477345573997, 0.22804972064359505,
            ],
        },
    },
    "self_loops": {
        "torchcell": {"hidden_channels": 12,
                      "out_channels": 2,
                      "num_layers": 2,
                      "dropout": 0.1,
                      "norm": "batch",
                      "activation": "leaky_relu",
                      "gene_encoder_config": {"heads": 2, "concat": False, "add_self_loops": True},
                      "gpr_conv_config": {"heads": 2, "concat": True, "add_self_loops": True},
                      "metabolism_config": {"is_stoich_gated": True, "use_attention": False},
                      "prediction_head_config": {"head_num_layers": 3,
                                                 "hidden_channels": 10,
                                                 "head_norm": None,
                                                 "activation": "tanh",
                                                 "dropout": 0.15,
                                                 "residual": True}},
        "head_keys": {
            "gene_embedding.weight": (40, 12),
            "reaction_embedding.weight": (24, 12),
            "metabolite_embedding.weight": (18, 12),
            "preprocessor.mlp.0.weight": (12, 12),
            "preprocessor.mlp.0.bias": (12,),
            "preprocessor.mlp.1.weight": (12,),
            "preprocessor.mlp.1.bias": (12,),
            "preprocessor.mlp.1.running_mean": (12,),
            "preprocessor.mlp.1.running_var": (12,),
            "preprocessor.mlp.1.num_batches_tracked": (),
            "preprocessor.mlp.4.weight": (12, 12),
            "preprocessor.mlp.4.bias": (12,),
            "preprocessor.mlp.5.weight": (12,),
            "preprocessor.mlp.5.bias": (12,),
            "preprocessor.mlp.5.running_mean": (12,),
            "preprocessor.mlp.5.running_var": (12,),
            "preprocessor.mlp.5.num_batches_tracked": (),
        },
        "layer_keys": {
            "convs.<gene___physical_interaction___gene>.conv.att": (1, 2, 6),
            "convs.<gene___physical_interaction___gene>.conv.bias": (6,),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.weight": (12, 12),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.bias": (12,),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.weight": (12, 12),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.bias": (12,),
            "convs.<gene___physical_interaction___gene>.proj.weight": (12, 6),
            "convs.<gene___physical_interaction___gene>.proj.bias": (12,),
            "convs.<gene___physical_interaction___gene>.norm.module.weight": (12,),
            "convs.<gene___physical_interaction___gene>.norm.module.bias": (12,),
            "convs.<gene___physical_interaction___gene>.norm.module.running_mean": (12,),
            "convs.<gene___physical_interaction___gene>.norm.module.running_var": (12,),
            "convs.<gene___physical_interaction___gene>.norm.module.num_batches_tracked": (),
            "convs.<gene___regulatory_interaction___gene>.conv.att": (1, 2, 6),
            "convs.<gene___regulatory_interaction___gene>.conv.bias": (6,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.weight": (12, 12),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.bias": (12,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.weight": (12, 12),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.bias": (12,),
            "convs.<gene___regulatory_interaction___gene>.proj.weight": (12, 6),
            "convs.<gene___regulatory_interaction___gene>.proj.bias": (12,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.weight": (12,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.bias": (12,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.running_mean": (12,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.running_var": (12,),
            "convs.<gene___regulatory_interaction___gene>.norm.module.num_batches_tracked": (),
            "convs.<gene___gpr___reaction>.conv.att": (1, 2, 12),
            "convs.<gene___gpr___reaction>.conv.bias": (24,),
            "convs.<gene___gpr___reaction>.conv.lin_l.weight": (24, 12),
            "convs.<gene___gpr___reaction>.conv.lin_l.bias": (24,),
            "convs.<gene___gpr___reaction>.conv.lin_r.weight": (24, 12),
            "convs.<gene___gpr___reaction>.conv.lin_r.bias": (24,),
            "convs.<gene___gpr___reaction>.proj.weight": (12, 24),
            "convs.<gene___gpr___reaction>.proj.bias": (12,),
            "convs.<gene___gpr___reaction>.norm.module.weight": (12,),
            "convs.<gene___gpr___reaction>.norm.module.bias": (12,),
            "convs.<gene___gpr___reaction>.norm.module.running_mean": (12,),
            "convs.<gene___gpr___reaction>.norm.module.running_var": (12,),
            "convs.<gene___gpr___reaction>.norm.module.num_batches_tracked": (),
            "convs.<metabolite___reaction___metabolite>.conv.bias": (12,),
            "convs.<metabolite___reaction___metabolite>.conv.lin.weight": (12, 12),
            "convs.<metabolite___reaction___metabolite>.conv.gate_lin.weight": (1, 12),
            "convs.<metabolite___reaction___metabolite>.conv.gate_lin.bias": (1,),
            "convs.<metabolite___reaction___metabolite>.norm.module.weight": (12,),
            "convs.<metabolite___reaction___metabolite>.norm.module.bias": (12,),
            "convs.<metabolite___reaction___metabolite>.norm.module.running_mean": (12,),
            "convs.<metabolite___reaction___metabolite>.norm.module.running_var": (12,),
            "convs.<metabolite___reaction___metabolite>.norm.module.num_batches_tracked": (),
        },
        "tail_keys": {
            "global_aggregator.gate_nn.0.weight": (6, 12),
            "global_aggregator.gate_nn.0.bias": (6,),
            "global_aggregator.gate_nn.3.weight": (1, 6),
            "global_aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.transform_nn.0.weight": (12, 12),
            "global_aggregator.transform_nn.0.bias": (12,),
            "global_aggregator.aggregator.gate_nn.0.weight": (6, 12),
            "global_aggregator.aggregator.gate_nn.0.bias": (6,),
            "global_aggregator.aggregator.gate_nn.3.weight": (1, 6),
            "global_aggregator.aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.aggregator.nn.0.weight": (12, 12),
            "global_aggregator.aggregator.nn.0.bias": (12,),
            "prediction_head.0.weight": (10, 12),
            "prediction_head.0.bias": (10,),
            "prediction_head.3.weight": (10, 10),
            "prediction_head.3.bias": (10,),
            "prediction_head.6.weight": (2, 10),
            "prediction_head.6.bias": (2,),
        },
        "prediction_shape": (4, 2),
        "predictions": {
            "eval": [
                0.2611838822408763, 0.17825941391627556, 0.279357355636366, 0.1654801402852472,
                0.2698966951191559, 0.16493807867739238, 0.2823165700704788, 0.16395452253291865,
            ],
            "train": [
                0.6515573266365104, -0.20431635872917134, 0.1384425566062928, 0.2795483148679215,
                0.39779034787813106, 0.12873563533398336, 0.17795292951720282, 0.10674656438746902,
            ],
            "step": [
                0.11001760812932797, -0.09347748647661014, 0.023020529734970138, -0.015904640085347446,
                0.3051040030847388, -0.13084817383701358, 0.38094237130905223, 0.18932810992411034,
            ],
            "step_eval": [
                -0.008620423168620245, 0.04950492306193803, 0.006972558977297649, 0.05502073285707651,
                0.011338885583307132, 0.058666414553390236, 0.003876505409464895, 0.02715378957802277,
            ],
        },
    },
    "averaged_heads": {
        "torchcell": {"hidden_channels": 8,
                      "out_channels": 2,
                      "num_layers": 3,
                      "dropout": 0.3,
                      "norm": "layer",
                      "activation": "sigmoid",
                      "gene_encoder_config": {"heads": 4},
                      "gpr_conv_config": {"heads": 2},
                      "metabolism_config": {"heads": 2, "concat": False},
                      "prediction_head_config": {"head_num_layers": 1}},
        "head_keys": {
            "gene_embedding.weight": (40, 8),
            "reaction_embedding.weight": (24, 8),
            "metabolite_embedding.weight": (18, 8),
            "preprocessor.mlp.0.weight": (8, 8),
            "preprocessor.mlp.0.bias": (8,),
            "preprocessor.mlp.1.weight": (8,),
            "preprocessor.mlp.1.bias": (8,),
            "preprocessor.mlp.4.weight": (8, 8),
            "preprocessor.mlp.4.bias": (8,),
            "preprocessor.mlp.5.weight": (8,),
            "preprocessor.mlp.5.bias": (8,),
        },
        "layer_keys": {
            "convs.<gene___physical_interaction___gene>.conv.att": (1, 4, 2),
            "convs.<gene___physical_interaction___gene>.conv.bias": (8,),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.weight": (8, 8),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.bias": (8,),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.weight": (8, 8),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.bias": (8,),
            "convs.<gene___physical_interaction___gene>.norm.weight": (8,),
            "convs.<gene___physical_interaction___gene>.norm.bias": (8,),
            "convs.<gene___regulatory_interaction___gene>.conv.att": (1, 4, 2),
            "convs.<gene___regulatory_interaction___gene>.conv.bias": (8,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.weight": (8, 8),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.bias": (8,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.weight": (8, 8),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.bias": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.weight": (8,),
            "convs.<gene___regulatory_interaction___gene>.norm.bias": (8,),
            "convs.<gene___gpr___reaction>.conv.att": (1, 2, 8),
            "convs.<gene___gpr___reaction>.conv.bias": (8,),
            "convs.<gene___gpr___reaction>.conv.lin_l.weight": (16, 8),
            "convs.<gene___gpr___reaction>.conv.lin_l.bias": (16,),
            "convs.<gene___gpr___reaction>.conv.lin_r.weight": (16, 8),
            "convs.<gene___gpr___reaction>.conv.lin_r.bias": (16,),
            "convs.<gene___gpr___reaction>.norm.weight": (8,),
            "convs.<gene___gpr___reaction>.norm.bias": (8,),
            "convs.<metabolite___reaction___metabolite>.conv.att": (1, 2, 16),
            "convs.<metabolite___reaction___metabolite>.conv.bias": (8,),
            "convs.<metabolite___reaction___metabolite>.conv.lin.weight": (16, 8),
            "convs.<metabolite___reaction___metabolite>.norm.weight": (8,),
            "convs.<metabolite___reaction___metabolite>.norm.bias": (8,),
        },
        "tail_keys": {
            "global_aggregator.gate_nn.0.weight": (4, 8),
            "global_aggregator.gate_nn.0.bias": (4,),
            "global_aggregator.gate_nn.3.weight": (1, 4),
            "global_aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.transform_nn.0.weight": (8, 8),
            "global_aggregator.transform_nn.0.bias": (8,),
            "global_aggregator.aggregator.gate_nn.0.weight": (4, 8),
            "global_aggregator.aggregator.gate_nn.0.bias": (4,),
            "global_aggregator.aggregator.gate_nn.3.weight": (1, 4),
            "global_aggregator.aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.aggregator.nn.0.weight": (8, 8),
            "global_aggregator.aggregator.nn.0.bias": (8,),
            "prediction_head.0.weight": (2, 8),
            "prediction_head.0.bias": (2,),
        },
        "prediction_shape": (4, 2),
        "predictions": {
            "eval": [
                -0.023368061485894175, -0.07038815088105985, 0.0014095538592233865, -0.08356887693539845,
                0.0042359901189966374, -0.11133708347611751, 0.008459806751425328, -0.11410493103952105,
            ],
            "train": [
                -0.18841724606372243, -0.3977649757590329, -0.03383947991303829, 0.09498038528522336,
                -0.030905570169031196, -0.40952819408123015, -0.034878956943786496, -0.4706478820741851,
            ],
            "step": [
                0.09903050656670556, 0.14928272253164243, -0.07662542843896802, 0.10260064148035383,
                0.15000279733722785, 0.12796987518135633, 0.05240467865837059, -0.0005574960529232328,
            ],
            "step_eval": [
                0.0005538958152415535, 0.04029995390483973, 0.030291781309109294, 0.03514898493329397,
                0.033570814983173325, 0.006640391157312204, 0.0392780548454736, 0.008264133695442911,
            ],
        },
    },
    "identity_head": {
        "torchcell": {"hidden_channels": 6,
                      "out_channels": 2,
                      "num_layers": 1,
                      "dropout": 0.05,
                      "norm": "layer",
                      "activation": "tanh",
                      "gene_encoder_config": {"heads": 5},
                      "metabolism_config": {"is_stoich_gated": True, "heads": 3},
                      "prediction_head_config": {"head_num_layers": 0}},
        "head_keys": {
            "gene_embedding.weight": (40, 6),
            "reaction_embedding.weight": (24, 6),
            "metabolite_embedding.weight": (18, 6),
            "preprocessor.mlp.0.weight": (6, 6),
            "preprocessor.mlp.0.bias": (6,),
            "preprocessor.mlp.1.weight": (6,),
            "preprocessor.mlp.1.bias": (6,),
            "preprocessor.mlp.4.weight": (6, 6),
            "preprocessor.mlp.4.bias": (6,),
            "preprocessor.mlp.5.weight": (6,),
            "preprocessor.mlp.5.bias": (6,),
        },
        "layer_keys": {
            "convs.<gene___physical_interaction___gene>.conv.att": (1, 5, 1),
            "convs.<gene___physical_interaction___gene>.conv.bias": (5,),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.weight": (5, 6),
            "convs.<gene___physical_interaction___gene>.conv.lin_l.bias": (5,),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.weight": (5, 6),
            "convs.<gene___physical_interaction___gene>.conv.lin_r.bias": (5,),
            "convs.<gene___physical_interaction___gene>.proj.weight": (6, 5),
            "convs.<gene___physical_interaction___gene>.proj.bias": (6,),
            "convs.<gene___physical_interaction___gene>.norm.weight": (6,),
            "convs.<gene___physical_interaction___gene>.norm.bias": (6,),
            "convs.<gene___regulatory_interaction___gene>.conv.att": (1, 5, 1),
            "convs.<gene___regulatory_interaction___gene>.conv.bias": (5,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.weight": (5, 6),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_l.bias": (5,),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.weight": (5, 6),
            "convs.<gene___regulatory_interaction___gene>.conv.lin_r.bias": (5,),
            "convs.<gene___regulatory_interaction___gene>.proj.weight": (6, 5),
            "convs.<gene___regulatory_interaction___gene>.proj.bias": (6,),
            "convs.<gene___regulatory_interaction___gene>.norm.weight": (6,),
            "convs.<gene___regulatory_interaction___gene>.norm.bias": (6,),
            "convs.<gene___gpr___reaction>.conv.att": (1, 1, 6),
            "convs.<gene___gpr___reaction>.conv.bias": (6,),
            "convs.<gene___gpr___reaction>.conv.lin_l.weight": (6, 6),
            "convs.<gene___gpr___reaction>.conv.lin_l.bias": (6,),
            "convs.<gene___gpr___reaction>.conv.lin_r.weight": (6, 6),
            "convs.<gene___gpr___reaction>.conv.lin_r.bias": (6,),
            "convs.<gene___gpr___reaction>.norm.weight": (6,),
            "convs.<gene___gpr___reaction>.norm.bias": (6,),
            "convs.<metabolite___reaction___metabolite>.conv.att": (1, 3, 12),
            "convs.<metabolite___reaction___metabolite>.conv.bias": (18,),
            "convs.<metabolite___reaction___metabolite>.conv.lin.weight": (18, 6),
            "convs.<metabolite___reaction___metabolite>.conv.gate_lin.weight": (1, 6),
            "convs.<metabolite___reaction___metabolite>.conv.gate_lin.bias": (1,),
            "convs.<metabolite___reaction___metabolite>.proj.weight": (6, 18),
            "convs.<metabolite___reaction___metabolite>.proj.bias": (6,),
            "convs.<metabolite___reaction___metabolite>.norm.weight": (6,),
            "convs.<metabolite___reaction___metabolite>.norm.bias": (6,),
        },
        "tail_keys": {
            "global_aggregator.gate_nn.0.weight": (3, 6),
            "global_aggregator.gate_nn.0.bias": (3,),
            "global_aggregator.gate_nn.3.weight": (1, 3),
            "global_aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.transform_nn.0.weight": (6, 6),
            "global_aggregator.transform_nn.0.bias": (6,),
            "global_aggregator.aggregator.gate_nn.0.weight": (3, 6),
            "global_aggregator.aggregator.gate_nn.0.bias": (3,),
            "global_aggregator.aggregator.gate_nn.3.weight": (1, 3),
            "global_aggregator.aggregator.gate_nn.3.bias": (1,),
            "global_aggregator.aggregator.nn.0.weight": (6, 6),
            "global_aggregator.aggregator.nn.0.bias": (6,),
        },
        "prediction_shape": (4, 6),
        "predictions": {
            "eval": [
                -0.07033905321301767, -0.04856317800790777, -0.0396856992113816, 0.1842361184779724,
                0.03992331768228252, -0.02297158740537425, 0.005147730973973003, -0.0017739248837296828,
                -0.0058295448286320856, 0.02474028537969597, -0.0031873085686793257, 0.004089078057802842,
                0.01232412279521175, -0.05222127469492854, 0.0013263922661213706, -0.05032167103809826,
                -0.03399022072757474, 0.06879583882317908, 0.0071419193484514865, 0.005839497936147187,
                -0.007904446186809633, 0.0052723626146777836, 0.005854813184645091, 0.004660087123600276,
            ],
            "train": [
                -0.08164113199857859, -0.03748681075446869, -0.013401279808993888, -0.019956573280321188,
                0.09190267939539598, -0.20028099841826102, 0.07849342111959307, 0.06227042305741998,
                -0.043044337232355206, -0.13807723101315295, 0.02903469498102118, -0.05037405099372011,
                0.07085080710126054, -0.11983513615497737, 0.021364348895168542, -0.31855412258111515,
                -0.09080781069672933, 0.012004167921375514, -0.19503992854707497, 0.12841915942772325,
                -0.05295184261175881, 0.29260750119428935, 0.19477191451934373, -0.4032021414799073,
            ],
            "step": [
                0.0051097396566988085, -0.04351214881523674, -0.004156008265961041, -0.25363301407549477,
                0.015351826448623984, -0.056759000181238306, 0.026996106196388953, -0.0402874970372879,
                -0.013861710477846376, -0.21002761672550463, 0.0014840524504857178, -0.06692402338370107,
                -0.0003069384325133373, -0.024187022298611527, -0.023491469890133784, -0.05484441865315515,
                0.0092644834927888, 0.07608820877145855, 0.007047395570998205, -0.03480525384650235,
                -0.05763692500891783, -0.23449911855158245, 0.08059850747971026, -0.16711546137332195,
            ],
            "step_eval": [
                -0.03985196480695535, -0.015201087833482063, -0.0037968313594007944, 0.09577344428747647,
                0.018610100704598953, -0.005148771961280385, 0.014858186464185158, -0.004258942591360393,
                -0.0040151504596872035, -0.010220392833038883, -0.0065085405840593635, 0.013320326659541193,
                -0.00877930748533412, -0.027376247626895167, -2.2918299630194164e-05, 0.006689163750743687,
                -0.013079975016460132, 0.039004470784308576, 0.007059696439264601, 0.00446357306233075,
                -0.00063930586150821, 0.005039503430895986, 0.006818423012748598, 0.0015667201321287183,
            ],
        },
    },
}


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def _models(case, graph, state_dict):
    kwargs = torchcell_kwargs(case, graph)
    ref = RefHeteroCell.from_torchcell(state_dict, **kwargs)
    fast = FastHeteroCell.from_torchcell(state_dict, **kwargs)
    return ref, fast


def _forwards(graph):
    pert, ptr = random_perturbations(int(graph["gene"].num_nodes), BATCH_SIZE, sizes=(1, 2, 3), seed=PERT_SEED)
    batch = perturb_batch_reference(graph, pert, ptr)
    return {"reference": lambda m: m(graph, batch), "fast": lambda m: m(graph, pert, ptr)}


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _recorded(case, stage):
    return torch.tensor(case["predictions"][stage], dtype=torch.float64).view(case["prediction_shape"])


def test_the_data_covers_every_configuration_point():
    configs = [case["torchcell"] for case in CASES.values()]
    assert any(c["hidden_channels"] == 64 and c["gene_encoder_config"]["heads"] == 10 for c in configs)
    assert any(c["hidden_channels"] % c["gene_encoder_config"]["heads"] for c in configs)  # heads not dividing C
    assert {c["norm"] for c in configs} == {"layer", "batch"}
    assert {c["activation"] for c in configs} | {c["prediction_head_config"].get("activation") for c in configs} \
        >= {"relu", "gelu", "leaky_relu", "tanh", "sigmoid"}
    assert {c["prediction_head_config"].get("head_num_layers", 1) for c in configs} >= {0, 1, 2, 3, 4}
    assert any(c["prediction_head_config"].get("head_norm", "x") is None for c in configs)
    assert any(c["dropout"] > 0 for c in configs)
    assert any(c["gene_encoder_config"].get("add_self_loops") for c in configs)
    assert any(not c["gene_encoder_config"].get("concat", True) for c in configs)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["reference", "fast"])
def test_names_and_shapes_are_the_originals(name, kind):
    case = CASES[name]
    graph = small_graph()
    cls = RefHeteroCell if kind == "reference" else FastHeteroCell
    model = cls.from_torchcell(None, **torchcell_kwargs(case, graph))
    exported = model.to_torchcell_state_dict()
    expected = expand_keys(case)
    assert list(exported) == list(expected)  # same names, same order
    assert {k: tuple(v.shape) for k, v in exported.items()} == dict(expected)
    # the torchcell constructor arguments round-trip (up to the keys the original never reads)
    again = torchcell_config(**model.torchcell_kwargs())
    assert again == torchcell_config(**torchcell_kwargs(case, graph))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["reference", "fast"])
def test_gives_the_originals_predictions(name, kind, monkeypatch):
    case = CASES[name]
    graph = small_graph()
    state = synthetic_state_dict(expand_keys(case))
    cls = RefHeteroCell if kind == "reference" else FastHeteroCell
    model = cls.from_torchcell(state, **torchcell_kwargs(case, graph))
    monkeypatch.setattr(F, "dropout", det_dropout)
    stages = run_stages(model, _forwards(graph)[kind])
    for stage, pred in stages.items():
        expected = _recorded(case, stage)
        assert pred.shape == expected.shape, stage
        assert _rel(pred, expected) < 1e-9, (stage, _rel(pred, expected))


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_and_training_step(name, monkeypatch):
    case = CASES[name]
    graph = small_graph()
    state = synthetic_state_dict(expand_keys(case))
    ref, fast = _models(case, graph, state)
    for model in (ref, fast):
        exported = model.to_torchcell_state_dict()
        assert list(exported) == list(state)
        assert all(torch.equal(exported[k], v) for k, v in state.items())
        for key in exported:  # aliases are one tensor, as in the original
            assert exported[key].data_ptr() == exported[canonical(key)].data_ptr(), key
    # both models load each other's own state_dict
    ref.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    monkeypatch.setattr(F, "dropout", det_dropout)
    forwards = _forwards(graph)
    run_stages(ref, forwards["reference"])
    run_stages(fast, forwards["fast"])
    after_ref, after_fast = ref.to_torchcell_state_dict(), fast.to_torchcell_state_dict()
    for key, value in after_ref.items():
        if value.is_floating_point():
            assert (after_fast[key] - value).abs().max() <= 1e-9 * max(1.0, float(value.abs().max())), key
        else:
            assert torch.equal(after_fast[key], value), key
    # the trained state goes back through torchcell names into a fresh model
    for cls, kind in ((RefHeteroCell, "reference"), (FastHeteroCell, "fast")):
        fresh = cls.from_torchcell(after_ref, **torchcell_kwargs(case, graph)).eval()
        ref.eval()
        with torch.no_grad():
            a = forwards[kind](fresh)[0]
            b = forwards["reference"](ref)[0]
        assert _rel(a, b) < 1e-9
        assert _rel(b, _recorded(case, "step_eval")) < 1e-9


def _grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_equals_reference(name, mode):
    """Forward and backward in float64 with PyTorch's own dropout: the same seed draws the same
    masks in both models (the fast model makes the reference's dropout calls in its order)."""
    case = CASES[name]
    graph = small_graph()
    state = synthetic_state_dict(expand_keys(case))
    ref, fast = _models(case, graph, state)
    forwards = _forwards(graph)
    outputs = {}
    for kind, model in (("reference", ref), ("fast", fast)):
        model.train(mode == "train")
        torch.manual_seed(7)
        pred, latents = forwards[kind](model)
        _loss(pred, latents).backward()
        outputs[kind] = pred, latents, _grads(model)
    (pred_r, lat_r, grad_r), (pred_f, lat_f, grad_f) = outputs["reference"], outputs["fast"]
    assert _rel(pred_f, pred_r) < 1e-6
    for key in ("z_w", "z_i"):
        assert _rel(lat_f[key], lat_r[key]) < 1e-6, key
    scale = max(float(g.abs().max()) for g in grad_r.values() if g is not None)
    for key, g in grad_r.items():
        if g is None:
            assert grad_f[key] is None, key
            continue
        assert grad_f[key] is not None, key
        assert (grad_f[key] - g).abs().max() <= 1e-6 * max(float(g.abs().max()), 1e-6 * scale), key
    buffers_f = dict(fast.named_buffers())
    for key, b in ref.named_buffers():  # BatchNorm running statistics
        assert torch.allclose(buffers_f[key].double(), b.double(), rtol=1e-9, atol=1e-12), key


def test_batch_norm_updates_in_the_originals_order():
    case = CASES["batch_norm"]
    graph = small_graph()
    ref, fast = _models(case, graph, synthetic_state_dict(expand_keys(case)))
    forwards = _forwards(graph)
    for kind, model in (("reference", ref), ("fast", fast)):
        model.train()
        before = {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
        forwards[kind](model)
        after = {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
        counts = {n: after[n] - before[n] for n in before}
        assert counts.pop("preprocessor.mlp.1.num_batches_tracked") == 4  # one norm, two positions, two passes
        assert counts.pop("head.1.num_batches_tracked") == 1
        assert counts and all(v == 2 for v in counts.values()), counts  # relation norms: wildtype + batch
        # the shared norm stays one module
        assert model.preprocessor.mlp[1] is model.preprocessor.mlp[5]


def test_checkpoint_wrappers_and_prefixes():
    case = CASES["averaged_heads"]
    graph = small_graph()
    state = synthetic_state_dict(expand_keys(case))
    kwargs = torchcell_kwargs(case, graph)
    direct = RefHeteroCell.from_torchcell(state, **kwargs).state_dict()
    lightning = {"epoch": 3, "state_dict": OrderedDict(("model." + k, v) for k, v in state.items())}
    for wrapped in (lightning, lightning["state_dict"]):
        loaded = RefHeteroCell.from_torchcell(wrapped, **kwargs).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in direct.items())


def test_mismatched_state_dicts_raise():
    case = CASES["averaged_heads"]
    graph = small_graph()
    state = synthetic_state_dict(expand_keys(case))
    kwargs = torchcell_kwargs(case, graph)
    with pytest.raises(ValueError, match="shape mismatches"):  # the state_dict of another head count
        RefHeteroCell.from_torchcell(state, **dict(kwargs, gene_encoder_config={"heads": 2}))
    broken = OrderedDict(state)
    del broken["prediction_head.0.bias"]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys: prediction_head.0.bias.*unexpected keys: extra.weight"):
        RefHeteroCell.from_torchcell(broken, **kwargs)
    untied = OrderedDict(state)
    untied["preprocessor.mlp.5.weight"] = state["preprocessor.mlp.1.weight"] + 1
    with pytest.raises(ValueError, match="alias"):
        RefHeteroCell.from_torchcell(untied, **kwargs)


def test_torchcell_configuration_rules():
    base = dict(gene_num=40, reaction_num=24, metabolite_num=18, hidden_channels=8, num_layers=2,
                gene_encoder_config={}, metabolism_config={})
    config = torchcell_config(**base)  # the original's defaults
    assert (config["heads"], config["gpr_heads"], config["gpr_concat"], config["metabolism_gated"],
            config["metabolism_attention"], config["head_num_layers"], config["dropout"]) == (1, 1, False, False,
                                                                                              True, 1, 0.1)
    with pytest.raises(TypeError, match="gene_encoder_config"):
        torchcell_config(**dict(base, gene_encoder_config=None))
    with pytest.raises(ValueError, match="norm"):
        torchcell_config(**dict(base, norm="graph"))
    with pytest.raises(ValueError, match="cannot run"):
        torchcell_config(**dict(base, metabolism_config={"use_attention": False, "heads": 2}))
    with pytest.warns(UserWarning, match="never read"):
        torchcell_config(**dict(base, gene_encoder_config={"heads": 2, "dropout": 0.5}))
    with pytest.raises(ValueError, match="activation"):
        RefHeteroCell.from_torchcell(None, **dict(base, activation="swish"))
    native = RefHeteroCell(40, 24, 18, hidden_channels=8, metabolism_to_gene=True)
    with pytest.raises(ValueError, match="metabolism_to_gene"):
        native.to_torchcell_state_dict()
