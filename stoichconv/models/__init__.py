"""Models on the fused kernels."""

from stoichconv.models.hetero_cell import HeteroCell

__all__ = ["HeteroCell"]
