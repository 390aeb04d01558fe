"""Backend selection shared by every operator and layer.

``backend`` is one of:

* ``"auto"`` (default): CUDA tensors -> the CUDA kernels (Triton when the CUDA
  part was not built, the reference when neither is there); CPU tensors -> the
  C++ kernels (the reference when ``stoichconv._C`` is missing).
* ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``: force one; raises
  :class:`BackendUnavailableError` when it cannot run the given tensors.

The environment variable ``STOICHCONV_BACKEND`` replaces the default ``"auto"``
(an explicit ``backend=`` argument other than ``"auto"`` still wins).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from stoichconv._extension import BUILD_HINT, has_compiled_kernels, has_cuda_kernels

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
ENV_VAR = "STOICHCONV_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, or wrong device)."""


# Looked up once: Dynamo (torch 2.11) refuses to trace importlib.util.find_spec.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package is importable."""
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend (maybe ``"auto"``) into the one that runs on
    tensors of ``device``, or raise :class:`BackendUnavailableError`."""
    check_backend_name(backend)
    if backend == "auto":
        backend = check_backend_name(os.environ.get(ENV_VAR, "auto"))
    if backend == "auto":
        if device.type == "cuda":
            if has_cuda_kernels():
                return "cuda"
            return "triton" if triton_available() else "reference"
        return "cpu" if has_compiled_kernels() and device.type == "cpu" else "reference"
    if backend == "cpu":
        if not has_compiled_kernels():
            raise BackendUnavailableError(f"backend='cpu' needs stoichconv._C; {BUILD_HINT}")
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend='cpu' runs CPU tensors, got tensors on {device}")
    elif backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend='cuda' runs CUDA tensors, got tensors on {device}")
        if not has_cuda_kernels():
            raise BackendUnavailableError(
                "backend='cuda': stoichconv._C was built without CUDA kernels; rebuild with a CUDA "
                "build of torch and nvcc on the PATH (FORCE_CUDA=1 makes that an error if missing)"
            )
    elif backend == "triton":
        if not triton_available():
            raise BackendUnavailableError("backend='triton' needs the `triton` package")
        if device.type != "cuda" and not triton_interpreted():
            raise BackendUnavailableError(
                f"backend='triton' runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                f"before import), got tensors on {device}"
            )
    return backend
