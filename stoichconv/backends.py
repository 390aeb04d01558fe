"""The backend table and the one backend selector shared by every operator, layer and model.

``backend`` is one of:

* ``"auto"`` (default): CUDA tensors -> the op's CUDA kernel (its Triton kernel when the CUDA
  part was not built, the reference when neither is there); CPU tensors -> the op's C++ kernel
  (the reference when ``stoichconv._C`` is missing);
* ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``: force one; raises
  :class:`BackendUnavailableError` saying why when it cannot run the given tensors.

The environment variable ``STOICHCONV_BACKEND`` replaces the default ``"auto"`` (an explicit
``backend=`` argument other than ``"auto"`` still wins).

Every op declares one :class:`OpSpec` (:func:`register_op`): the backends it has, the name of
its compiled operator in ``torch.ops.stoichconv``, its Triton entry and its reference, the last
two as ``"module:function"`` strings imported on first use. :func:`select` picks the backend
for one call and returns the callable to run; it asks the dispatcher once per (op, device type)
whether a compiled kernel is registered. Layers and models that pass one ``backend=`` down to
several ops use :func:`resolve` with ``strict=False``: an op that lacks the requested backend
then runs its reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from stoichconv._extension import BUILD_HINT, has_compiled_kernels

__all__ = [
    "BACKENDS",
    "KERNEL_BACKENDS",
    "BackendUnavailableError",
    "OpSpec",
    "OPS",
    "Selected",
    "available_backends",
    "check_backend_name",
    "load_entries",
    "register_op",
    "resolve",
    "select",
    "triton_available",
    "triton_interpreted",
]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
KERNEL_BACKENDS = ("cpu", "cuda", "triton")
ENV_VAR = "STOICHCONV_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, not written for this op, or wrong device)."""


@dataclass(frozen=True)
class OpSpec:
    """Declared backends of one operator.

    Attributes:
        name: the op's name (its folder ``stoichconv/ops/<name>/``).
        backends: the backends that exist for it, a subset of ``("cpu", "cuda", "triton",
            "reference")``.
        compiled: its operator in ``torch.ops.stoichconv`` (the forward, for an op with a
            backward), registered under ``CPU`` / ``CUDA`` by ``stoichconv._C``.
        compiled_backward: the compiled backward operator, for a differentiable op.
        compiled_out: the compiled variant that writes into caller buffers (``out=``), if any.
        triton: ``"module:function"`` of its Triton entry (a ``stoichconv::triton_*`` custom op).
        reference: ``"module:function"`` of its pure-PyTorch reference.
    """

    name: str
    backends: tuple[str, ...]
    compiled: Optional[str] = None
    compiled_backward: Optional[str] = None
    compiled_out: Optional[str] = None
    triton: Optional[str] = None
    reference: Optional[str] = None

    def __post_init__(self) -> None:
        unknown = set(self.backends) - set(BACKENDS[1:])
        if unknown:
            raise ValueError(f"OpSpec {self.name!r}: unknown backends {sorted(unknown)}")
        for backend, field in (("cpu", self.compiled), ("cuda", self.compiled), ("triton", self.triton),
                               ("reference", self.reference)):
            if backend in self.backends and field is None:
                raise ValueError(f"OpSpec {self.name!r} lists backend {backend!r} but names no entry for it")


@dataclass(frozen=True)
class Selected:
    """What :func:`select` picked: the backend name and the callable that runs it."""

    backend: str
    fn: Callable


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the table (once per op name)."""
    if spec.name in OPS and OPS[spec.name] != spec:
        raise ValueError(f"op {spec.name!r} is already registered with another spec")
    OPS[spec.name] = spec
    return spec


# Looked up once: Dynamo (torch 2.11) refuses to trace importlib.util.find_spec.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package is importable."""
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend_name(backend: str) -> str:
    """``backend`` itself, or ``ValueError`` when it is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    return backend


_REGISTERED: dict[tuple[str, str], bool] = {}


def _has_compiled_kernel(compiled: str, device_type: str) -> bool:
    """Asks the dispatcher (once per op and device type) for a registered kernel."""
    key = (compiled, device_type)
    if key not in _REGISTERED:
        _REGISTERED[key] = has_compiled_kernels() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"stoichconv::{compiled}", "CUDA" if device_type == "cuda" else "CPU")
    return _REGISTERED[key]


def _why_not(spec: OpSpec, backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run ``spec`` on tensors of ``device`` (None: it can)."""
    if backend not in spec.backends:
        have = ", ".join(repr(b) for b in spec.backends)
        return f"{spec.name} has no {backend} kernel (its backends: {have})"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend={backend!r} runs {backend.upper() if backend == 'cuda' else 'CPU'} tensors, got tensors on {device}"
        if not has_compiled_kernels():
            return f"backend={backend!r} needs stoichconv._C; {BUILD_HINT}"
        if not _has_compiled_kernel(spec.compiled, backend):
            if backend == "cuda":
                return ("stoichconv._C was built without CUDA kernels; rebuild with a CUDA build of torch and nvcc "
                        "on the PATH (FORCE_CUDA=1 makes that an error if missing)")
            return f"no CPU kernel registered for stoichconv::{spec.compiled}"
    elif backend == "triton":
        if not triton_available():
            return "backend='triton' needs the `triton` package"
        if spec.name in _TRITON_IMPORT_ERRORS:
            return f"its Triton kernels failed to import ({_TRITON_IMPORT_ERRORS[spec.name]})"
        if device.type != "cuda" and not triton_interpreted():
            return (f"backend='triton' runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                    f"import), got tensors on {device}")
    return None


def _auto(spec: OpSpec, device: torch.device) -> str:
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for backend in order:
        if _why_not(spec, backend, device) is None:
            return backend
    raise BackendUnavailableError(f"{spec.name}: no backend can run tensors on {device}")


def resolve(op: str, backend: str, device: torch.device, *, strict: bool = True) -> str:
    """The backend that runs ``op`` on tensors of ``device`` for the requested ``backend``.

    ``strict=False`` (layers and models passing one choice down to several ops): when the
    requested backend cannot run this op, run its reference instead of raising (so that
    ``backend="triton"`` never runs a C++ kernel)."""
    spec = OPS[op]
    check_backend_name(backend)
    if backend == "auto":
        backend = check_backend_name(os.environ.get(ENV_VAR, "auto"))
    if backend == "auto":
        return _auto(spec, torch.device(device))
    reason = _why_not(spec, backend, torch.device(device))
    if reason is None:
        return backend
    if not strict:
        return "reference"
    raise BackendUnavailableError(f"{spec.name}: {reason}")


def _load(entry: str) -> Callable:
    """The callable named by ``"module:function"``. Modules already imported are looked up in
    ``sys.modules``, which Dynamo can trace (it refuses ``importlib``); :func:`load_entries`
    imports every op's modules when the package is imported, so a first call under
    ``torch.compile(fullgraph=True)`` never needs an import."""
    module, _, name = entry.partition(":")
    loaded = sys.modules.get(module)
    if loaded is None:
        loaded = importlib.import_module(module)
    return getattr(loaded, name)


_TRITON_IMPORT_ERRORS: dict[str, str] = {}


def load_entries() -> None:
    """Import the reference and Triton modules of every registered op and look its compiled
    kernels up in the dispatcher (``stoichconv.ops`` does,
    once, after registering all ops): the Triton ``stoichconv::triton_*`` custom ops are then
    registered whatever the user imported. A Triton module that fails to import makes only
    ``backend="triton"`` unavailable, with the import error as the reason."""
    for spec in OPS.values():
        if spec.compiled is not None:  # ask the dispatcher now, not inside a torch.compile trace
            for device_type in ("cpu", "cuda"):
                _has_compiled_kernel(spec.compiled, device_type)
        if spec.reference is not None:
            _load(spec.reference)
        if spec.triton is not None and triton_available():
            try:
                _load(spec.triton)
            except Exception as error:  # noqa: BLE001  (a broken triton install must not break import)
                _TRITON_IMPORT_ERRORS[spec.name] = f"{type(error).__name__}: {error}"


def select(op: str, backend: str, device: torch.device, *, strict: bool = True) -> Selected:
    """Resolve ``backend`` for ``op`` on ``device`` and return it with its callable: the
    compiled operator (``torch.ops.stoichconv.<compiled>``), the Triton entry or the
    reference function."""
    spec = OPS[op]
    name = resolve(op, backend, device, strict=strict)
    if name in ("cpu", "cuda"):
        return Selected(name, getattr(torch.ops.stoichconv, spec.compiled))
    if name == "triton":
        try:
            return Selected(name, _load(spec.triton))
        except ImportError as error:  # triton present but its import fails
            raise BackendUnavailableError(f"{spec.name}: the Triton entry {spec.triton} could not be imported ({error})") from error
    return Selected(name, _load(spec.reference))


def available_backends(device: torch.device, op: Optional[str] = None) -> dict[str, tuple[str, ...]]:
    """``{op: backends that run on device}`` for every registered op (or one)."""
    device = torch.device(device)
    names = [op] if op is not None else sorted(OPS)
    return {n: tuple(b for b in OPS[n].backends if _why_not(OPS[n], b, device) is None) for n in names}
