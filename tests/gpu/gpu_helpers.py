"""Helpers of the real-size GPU checks (``tests/gpu``; imported as ``gpu.gpu_helpers``, the
suite's ``pythonpath`` being ``tests``).

Tolerances: :func:`bound` gives the relative error allowed for a result of ``dtype`` whose
longest chain of sums has ``reduction_length`` terms. It is ``stoichconv.testing.tolerance``
when that module exists (its ``(rtol, atol)`` normalised to one relative factor, the larger of
the two), else the same derivation locally:
``ROUNDINGS * u(dtype) + reduction_length * u(accumulation dtype)`` with ``u = eps / 2``: each
rounding of a stored value to ``dtype`` along the chain (the degree norms, ``hidden``, the
reaction-side gradient, the result: at most ``ROUNDINGS``) costs ``u(dtype)`` relative to the
magnitude, and the fp32 accumulation (fp64 for fp64 inputs) of ``L`` terms at most ``L * u``.
The bound is applied element-wise against the *absolute-value propagation* ``S`` (the same
computation on ``|y|``, ``|w|``, ``|grad|``: the sum of the magnitudes of the terms), so that
cancellation cannot make it meaningless: ``|got - want| <= bound * S``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

CUDA = torch.cuda.is_available()
ROUNDINGS = 6

# every test of tests/gpu: ``pytestmark = GPU_MARKS``
GPU_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible")]
GPU_BACKENDS = ("cuda", "triton")


def _shared_tolerance():
    try:
        module = importlib.import_module("stoichconv.testing")
    except ImportError:
        return None
    return getattr(module, "tolerance", None)


def bound(dtype: torch.dtype, reduction_length: int) -> float:
    """Relative error bound (see the module docstring)."""
    shared = _shared_tolerance()
    if shared is not None:
        tol = shared(dtype, reduction_length)
        if isinstance(tol, dict):
            return max(float(tol.get("rtol", 0.0)), float(tol.get("atol", 0.0)))
        if isinstance(tol, (tuple, list)):
            return max(float(t) for t in tol)
        return float(tol)
    u = torch.finfo(dtype).eps / 2
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    return ROUNDINGS * u + reduction_length * torch.finfo(accumulate).eps / 2


def assert_within(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rel: float, what: str) -> float:
    """``|got - want| <= rel * scale`` element-wise (compared in float64 on ``want``'s device);
    returns the largest measured ``|got - want| / scale``."""
    got = got.detach().to(device=want.device, dtype=torch.float64)
    want = want.detach().double()
    scale = scale.detach().to(device=want.device, dtype=torch.float64).abs()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    if got.numel() == 0:
        return 0.0
    err = (got - want).abs()
    floor = 1e-30
    ratio = float((err / (scale + floor)).max())
    bad = err > rel * scale + floor
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements exceed the bound {rel:.3g} x |terms| "
            f"(max measured {ratio:.3g}); first at {idx}: got {float(got[idx]):.6g}, want {float(want[idx]):.6g}, "
            f"|terms| {float(scale[idx]):.3g}")
    return ratio


def reduction_length(plan) -> int:
    """The longest chain of sums of the stoich conv on ``plan``: a reaction row, then a metabolite row."""
    return int(plan.reaction_ptr.diff().max()) + int(plan.metabolite_ptr.diff().max())


def to_cpu(obj):
    """Tensors (nested in tuples/lists/dicts) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj
