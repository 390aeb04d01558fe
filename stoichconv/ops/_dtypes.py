"""The floating dtypes of the ops, written once.

* Every op takes float16, bfloat16, float32 and float64 features on every backend; outputs
  come back in the input dtype.
* Accumulation, degree normalisers and softmax statistics are float32 for float16 / bfloat16 /
  float32 inputs and float64 for float64 inputs (:func:`accumulate_dtype`); the per-op
  side outputs that are statistics (the stoich conv's ``node_norm`` / ``edge_norm``) are in that
  dtype too, and the stoich conv takes its degree weights ``abs_stoich`` in it.
* Mixed dtypes within one call: under ``torch.autocast`` on the tensors' device type, the
  float32 / float16 / bfloat16 features and weights of an op are cast to the autocast dtype first
  (float64 is left alone, as autocast leaves it) (the op then runs in lower
  precision, as ``torch.mm`` does under autocast); outside autocast they must agree, and a
  mismatch is refused with an error naming both arguments (never truncated silently).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)
AUTOCAST_ELIGIBLE = (torch.float32,) + LOW_PRECISION

__all__ = ["FLOAT_DTYPES", "LOW_PRECISION", "accumulate_dtype", "autocast_dtype", "cast_for_autocast",
           "check_float", "check_same_dtype"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None outside autocast."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_for_autocast(device: torch.device, *tensors: Optional[Tensor]) -> tuple:
    """``tensors`` cast to the autocast dtype of ``device`` when autocast is on, else unchanged.
    As ``torch.autocast`` does for its own ops, only float32 / float16 / bfloat16 tensors are
    cast; float64, integer tensors and None pass through (so float64 mixed with cast tensors is
    then refused by :func:`check_same_dtype`)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in AUTOCAST_ELIGIBLE else t for t in tensors)


def check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_dtype(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"`{name}` has dtype {t.dtype} but `{reference_name}` has {reference.dtype} "
                            f"(mixed dtypes are cast only under torch.autocast)")
