"""stoichconv: fused CPU (C++), CUDA and Triton kernels for cell-graph models.

* :func:`stoichconv.ops.stoich_conv`: signed stoichiometric hypergraph propagation.
* :class:`stoichconv.nn.StoichHypergraphConv`: the drop-in PyG layer on it.
* :mod:`stoichconv.perturb`: batched gene-deletion masks of a cell graph.
* :mod:`stoichconv.reference`: pure PyTorch/PyG references of everything.
* :mod:`stoichconv.data`: the bundled yeast-GEM 9.0.2 cell graph.
* :mod:`stoichconv.backends`: the backend table and selector.

Importing the package registers every op's fake kernels and autograd formulas.
"""

from stoichconv._extension import has_compiled_kernels, has_cuda_kernels
from stoichconv.backends import BACKENDS, BackendUnavailableError
from stoichconv import ops

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "has_compiled_kernels",
    "has_cuda_kernels",
    "ops",
    "__version__",
]
