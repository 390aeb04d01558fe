"""Argument checks shared by every op's validation module: each error names the argument."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_count", "check_index_tensor", "check_size_product", "require"]


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



INT64_MAX = 2**63 - 1


def check_size_product(output: str, unit: str = "entries", **factors: int) -> None:
    """The size (or id range) of an output ``output``, the product of ``factors``, must fit
    int64, else a ValueError naming the factors (Python ints do not overflow; the kernels'
    int64 arithmetic would)."""
    total = 1
    for value in factors.values():
        total *= value
    if total > INT64_MAX:
        named = " * ".join(f"{name} = {value}" for name, value in factors.items())
        raise ValueError(f"`{output}` would have {named} = {total} {unit}, more than int64 can index")


def require(cond: Tensor, error: type, message: str) -> None:
    """Raise ``error(message)`` unless the 0-d bool tensor ``cond`` holds. Under
    ``torch.compile`` the check becomes an in-graph assertion (no graph break, no host sync
    traced), raising ``RuntimeError(message)`` when it fails."""
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise error(message)
