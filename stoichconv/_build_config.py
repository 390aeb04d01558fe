"""How ``setup.py`` decides whether to compile the CUDA kernels.

Kept free of torch imports so that ``setup.py`` can load it by path and the
tests can exercise every branch.

* ``STOICHCONV_NO_CUDA=1``: never compile CUDA (CPU kernels only).
* ``FORCE_CUDA=1``: compile CUDA or fail the build with a clear error.
* otherwise: compile CUDA when torch is a CUDA build and ``nvcc`` is found.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
DEFAULT_CUDA_HOME = "/usr/local/cuda"


class CudaBuildError(RuntimeError):
    """The build was asked for CUDA (``FORCE_CUDA=1``) but cannot compile it."""


@dataclass(frozen=True)
class CudaDecision:
    with_cuda: bool
    reason: str
    cuda_home: Optional[str] = None


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_cuda_home(env: Mapping[str, str]) -> Optional[str]:
    """The CUDA toolkit root: ``$CUDA_HOME``/``$CUDA_PATH``, else ``/usr/local/cuda``,
    else the parent of the real ``nvcc`` on the PATH (wrapper scripts resolved)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            return env[name]
    if os.path.exists(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        return DEFAULT_CUDA_HOME
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(root, "lib64")):
            return root
    return None


def decide_cuda_build(env: Mapping[str, str], torch_cuda_version: Optional[str]) -> CudaDecision:
    """Decide whether to build the CUDA kernels; raise ``CudaBuildError`` when
    ``FORCE_CUDA=1`` cannot be honoured."""
    if _flag(env, "STOICHCONV_NO_CUDA"):
        if _flag(env, "FORCE_CUDA"):
            raise CudaBuildError("FORCE_CUDA=1 and STOICHCONV_NO_CUDA=1 contradict each other")
        return CudaDecision(False, "STOICHCONV_NO_CUDA=1")
    force = _flag(env, "FORCE_CUDA")
    if torch_cuda_version is None:
        if force:
            raise CudaBuildError(
                "FORCE_CUDA=1 but the installed torch is a CPU-only build; install the CUDA "
                "build (e.g. `pip install torch===2.13.0`, or `make` without TORCH=cpu)"
            )
        return CudaDecision(False, "torch is a CPU-only build")
    cuda_home = find_cuda_home(env)
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        if force:
            raise CudaBuildError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder "
                "holding bin/nvcc and lib64/libcudart.so"
            )
        return CudaDecision(False, "nvcc not found")
    return CudaDecision(True, f"torch CUDA {torch_cuda_version}, toolkit at {cuda_home}", cuda_home)
