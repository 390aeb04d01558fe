"""Pure PyTorch / PyG references: the baselines every fast path is tested and
benchmarked against."""

from stoichconv.reference.dense import dense_stoich_conv
from stoichconv.reference.hetero_cell import HeteroCell, nan_mse_loss
from stoichconv.reference.propagate import stoich_propagate_reference
from stoichconv.reference.stoich_hypergraph_conv import StoichHypergraphConv

__all__ = [
    "HeteroCell",
    "StoichHypergraphConv",
    "dense_stoich_conv",
    "nan_mse_loss",
    "stoich_propagate_reference",
]
