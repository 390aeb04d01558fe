"""stoichconv: fused CPU (C++), CUDA and Triton kernels for cell-graph models.

* :func:`stoichconv.ops.stoich_conv`: signed stoichiometric hypergraph propagation.
* :class:`stoichconv.nn.StoichHypergraphConv`: the drop-in PyG layer on it.
* :mod:`stoichconv.perturb`: batched gene-deletion masks of a cell graph.
* :mod:`stoichconv.reference`: pure PyTorch/PyG references of everything.
* :mod:`stoichconv.data`: the bundled yeast-GEM 9.0.2 cell graph.
* :mod:`stoichconv.backends`: the backend table and selector.
* :func:`host_cache_info`, :func:`set_host_cache_limit`, :func:`empty_host_cache`: the cache of
  large host blocks the CPU ops and layers allocate from (:mod:`stoichconv._host_pages`).

Importing the package registers every op's fake kernels and autograd formulas.
"""

from stoichconv._extension import has_compiled_kernels, has_cuda_kernels
from stoichconv._host_pages import HostCacheInfo, empty_host_cache, host_cache_info, set_host_cache_limit
from stoichconv.backends import BACKENDS, BackendUnavailableError
from stoichconv import ops

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "HostCacheInfo",
    "empty_host_cache",
    "has_compiled_kernels",
    "has_cuda_kernels",
    "host_cache_info",
    "ops",
    "set_host_cache_limit",
    "__version__",
]
