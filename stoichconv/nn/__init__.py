"""Drop-in layers on the fused operators."""

from stoichconv.nn.stoich_hypergraph_conv import StoichHypergraphConv

__all__ = ["StoichHypergraphConv"]
