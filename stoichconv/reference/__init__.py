"""Pure PyTorch / PyG references: the baselines every fast path is tested and benchmarked
against. Nothing here imports the fast path (``stoichconv.ops``, ``nn``, ``models``, ``_C``);
one module per op (:mod:`.stoich_conv`, :mod:`.pert_mask`, :mod:`.group_softmax`,
:mod:`.gatv2`), plus the layer, the batch builder and the model. The names below are loaded
on first access, so that importing one reference module does not import them all."""

import importlib

_NAMES = {
    "HeteroCell": "hetero_cell",
    "StoichHypergraphConv": "stoich_hypergraph_conv",
    "dense_stoich_conv": "dense",
    "filter_bipartite_reference": "pert_mask",
    "filter_edges_reference": "pert_mask",
    "gatv2_attention_reference": "gatv2",
    "group_softmax_reference": "group_softmax",
    "nan_mse_loss": "hetero_cell",
    "perturb_batch_reference": "perturb",
    "reaction_keep_reference": "pert_mask",
    "stoich_conv_reference": "stoich_conv",
    "stoich_propagate_reference": "stoich_conv",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
