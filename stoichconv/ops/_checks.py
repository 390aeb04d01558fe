"""Argument checks shared by every op's validation module: each error names the argument."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_count", "check_index_tensor"]


def check_count(name: str, value) -> int:
    """A size argument: a non-negative Python int (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}")
    return value


def check_index_tensor(name: str, t) -> Tensor:
    """A tensor of integer indices (any integer width)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer indices, got dtype {t.dtype}")
    return t

