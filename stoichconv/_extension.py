"""Loads the compiled extension ``stoichconv._C`` (gsplat style: the package
still imports without it, and the pure-PyTorch reference path runs)."""

from __future__ import annotations

import warnings

import torch

BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation -e .` in an "
    "environment that has torch, ninja and a C++17 compiler)"
)

try:
    from stoichconv import _C  # noqa: F401  (importing registers the kernels)
except ImportError as _error:  # pragma: no cover - exercised by test_import_without_extension
    _C = None
    warnings.warn(
        f"stoichconv: the compiled extension stoichconv._C could not be loaded ({_error}); "
        f"falling back to the pure-PyTorch reference kernels, which are much slower. To fix, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_compiled_kernels() -> bool:
    """Whether ``stoichconv._C`` (the C++ CPU kernels) is loaded."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """Whether CUDA kernels are registered for the compiled operators."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "stoichconv::stoich_conv_forward", "CUDA"
    )
