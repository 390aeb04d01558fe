"""Loads the compiled extension ``stoichconv._C`` (gsplat style: the package
still imports without it, and the pure-PyTorch reference path runs).

Before ``_C`` is loaded, the build is checked against the running torch: the
small module ``stoichconv._build_info`` (built next to ``_C`` from
``csrc/build_info.cpp``, linked against no torch library, so it imports even
when ``_C`` cannot) says which torch and CUDA versions ``_C`` was compiled
against, and :func:`check_build_matches` turns a mismatch into an
``ImportError`` that says so and how to rebuild, instead of an "undefined
symbol" error or silent misbehaviour. A plain missing extension only warns.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Optional

import torch

BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation -e .` in an "
    "environment that has torch, ninja and a C++17 compiler)"
)

REBUILD_HINT = (
    "rebuild it against the running torch: `make clean build`, or `rm -rf build "
    "stoichconv/_C*.so stoichconv/_build_info*.so` then `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`) with the torch you mean to run"
)


class BuildMismatchError(ImportError):
    """``stoichconv._C`` was built against another torch (or CUDA) than the one running."""


def _release(version: str) -> Optional[tuple[int, int, int]]:
    """(major, minor, patch) of a version string such as ``2.13.0+cu130`` or ``2.13.0.dev20250101``."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def _public(version: str) -> str:
    """A version without its local label (``2.13.0+cu130`` -> ``2.13.0``)."""
    return (version or "").split("+", 1)[0].strip()


def _cuda_major(version: Optional[str]) -> Optional[int]:
    release = _release(version) if version else None
    return release[0] if release else None


def _describe(torch_version: str, cuda_version: Optional[str]) -> str:
    return f"torch {torch_version} ({'CUDA ' + cuda_version if cuda_version else 'CPU only'})"


def check_build_matches(build: dict, torch_version: str, cuda_version: Optional[str]) -> None:
    """Raise :class:`BuildMismatchError` (an ``ImportError``) when the build described by
    ``build`` (a :func:`build_info` dict) cannot run with the torch ``torch_version``
    (``torch.__version__``) and CUDA ``cuda_version`` (``torch.version.cuda``, None for a
    CPU-only torch).

    * torch: the major.minor.patch of the headers compiled against must equal the running
      one's, and so must the full version of the torch used to build, local label (``+cpu``,
      ``+cu130``) aside: the CPU and CUDA wheels of one release share the C++ ABI, while two
      nightlies of one release (``2.13.0.devYYYYMMDD``) need not.
    * CUDA (only when the CUDA kernels were built): the running torch must be a CUDA build
      of the same CUDA major version as the runtime compiled against (minor versions are
      compatible, as torch.utils.cpp_extension also only warns on them).
    """
    built = build.get("torch_version") or _public(build.get("torch_version_full", ""))
    built_full = build.get("torch_version_full") or built
    built_cuda = build.get("cuda_version") if build.get("with_cuda") else None
    problems = []
    if _release(built) != _release(torch_version) or _public(built_full) != _public(torch_version):
        problems.append("torch versions differ")
    if built_cuda is not None:
        if cuda_version is None:
            problems.append("its CUDA kernels need a CUDA build of torch")
        elif _cuda_major(built_cuda) != _cuda_major(cuda_version):
            problems.append("CUDA major versions differ")
    if problems:
        raise BuildMismatchError(
            f"stoichconv was built against {_describe(_public(built_full), built_cuda)} but "
            f"{_describe(torch_version, cuda_version)} is running ({'; '.join(problems)}), so its "
            f"compiled extension stoichconv._C cannot be loaded; {REBUILD_HINT}."
        )


def _load_build_info() -> Optional[dict]:
    try:
        from stoichconv import _build_info
    except ImportError:
        return None
    return dict(_build_info.build_info())


_BUILD_INFO = _load_build_info()
if _BUILD_INFO is not None:
    check_build_matches(_BUILD_INFO, torch.__version__, torch.version.cuda)

try:
    from stoichconv import _C  # noqa: F401  (importing registers the kernels)
except ImportError as _error:  # pragma: no cover - exercised by test_import_without_extension
    if "undefined symbol" in str(_error):
        built = f" (it was built against torch {_BUILD_INFO['torch_version_full']})" if _BUILD_INFO else ""
        raise ImportError(
            f"stoichconv: the compiled extension stoichconv._C does not match the running torch "
            f"{torch.__version__}{built}: loading it failed with an undefined symbol, which almost "
            f"certainly means it was compiled against another torch version; {REBUILD_HINT}. "
            f"(Original error: {_error})"
        ) from _error
    _C = None
    warnings.warn(
        f"stoichconv: the compiled extension stoichconv._C could not be loaded ({_error}); "
        f"falling back to the pure-PyTorch reference kernels, which are much slower. To fix, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> Optional[dict]:
    """How the compiled extension was built, or None when ``stoichconv._build_info`` is
    missing (no build, or one older than it). Keys: ``torch_version`` (major.minor.patch of
    the torch headers compiled against), ``torch_version_full`` and ``torch_cuda_version``
    (``torch.__version__`` / ``torch.version.cuda`` of the torch used to build),
    ``with_cuda`` (CUDA kernels compiled), ``cuda_version`` (CUDA runtime compiled against,
    None without CUDA), ``cuda_archs`` (``TORCH_CUDA_ARCH_LIST`` entries), ``cpu_isas``
    (instruction sets of the CPU stoich conv kernels), ``compiler``, ``cplusplus``."""
    return None if _BUILD_INFO is None else copy.deepcopy(_BUILD_INFO)


def has_compiled_kernels() -> bool:
    """Whether ``stoichconv._C`` (the C++ CPU kernels) is loaded."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """Whether CUDA kernels are registered for the compiled operators."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "stoichconv::stoich_conv_forward", "CUDA"
    )
