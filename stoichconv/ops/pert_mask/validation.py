"""Argument validation of the pert-mask ops, shared by their public functions, their Triton
entry and :func:`stoichconv.perturb.perturb_batch` (the compiled kernels repeat the checks in
C++, ``csrc/include/stoichconv/pert_mask_checks.h``). Every error names the argument."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv.ops._checks import check_count, check_index_tensor

__all__ = ["as_index", "check_count", "check_edge_index", "check_keep", "check_perturbations"]


def as_index(name: str, t, device: Optional[torch.device] = None) -> Tensor:
    """An integer index tensor (on ``device`` when given) as int64, contiguous."""
    check_index_tensor(name, t)
    if device is not None and t.device != device:
        raise ValueError(f"`{name}` is on {t.device} but `pert` is on {device}")
    return t.long().contiguous()


def check_perturbations(pert, pert_ptr, num_nodes: Optional[int] = None, values: bool = True) -> tuple[Tensor, Tensor]:
    """Validate a CSR perturbation batch; returns int64 contiguous copies.

    ``num_nodes`` bounds the ids when given (otherwise they need only be >= 0);
    ``values=False`` checks types, shapes and devices only (no host sync)."""
    pert = as_index("pert", pert)
    pert_ptr = as_index("pert_ptr", pert_ptr, pert.device)
    if pert.dim() != 1:
        raise ValueError(f"`pert` must be 1-D [P], got shape {tuple(pert.shape)}")
    if pert_ptr.dim() != 1 or pert_ptr.numel() < 1:
        raise ValueError(f"`pert_ptr` must be 1-D [B + 1] with B >= 0, got shape {tuple(pert_ptr.shape)}")
    if not values:
        return pert, pert_ptr
    if int(pert_ptr[0]) != 0:
        raise ValueError(f"`pert_ptr` must start at 0, got {int(pert_ptr[0])}")
    if pert_ptr.numel() > 1 and bool((pert_ptr[1:] < pert_ptr[:-1]).any()):
        raise ValueError("`pert_ptr` must be non-decreasing")
    if int(pert_ptr[-1]) != pert.numel():
        raise ValueError(f"`pert_ptr` must end at len(pert) = {pert.numel()}, got {int(pert_ptr[-1])}")
    if pert.numel() > 0:
        low, high = int(pert.min()), int(pert.max())
        if low < 0:
            raise ValueError(f"`pert` has a negative gene id {low}")
        if num_nodes is not None and high >= num_nodes:
            raise ValueError(f"`pert` has gene id {high} outside [0, num_nodes={num_nodes})")
    return pert, pert_ptr


def check_edge_index(name: str, edge_index, num_src: int, num_dst: int, device: torch.device,
                      src_name: str = "num_nodes", dst_name: Optional[str] = None, values: bool = True) -> Tensor:
    edge_index = as_index(name, edge_index, device)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"`{name}` must have shape [2, E], got {tuple(edge_index.shape)}")
    if values and edge_index.size(1) > 0:
        if int(edge_index.min()) < 0:
            raise ValueError(f"`{name}` contains a negative id {int(edge_index.min())}")
        for row, bound, bound_name in ((0, num_src, src_name), (1, num_dst, dst_name or src_name)):
            if bound is None:
                continue
            high = int(edge_index[row].max())
            if high >= bound:
                raise ValueError(f"`{name}[{row}]` has id {high} >= {bound_name} = {bound}")
    return edge_index


def check_keep(name: str, keep, num_samples: int, num_nodes: int, device: torch.device) -> Optional[Tensor]:
    if keep is None:
        return None
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor or None, got {getattr(keep, 'dtype', type(keep).__name__)}")
    if tuple(keep.shape) != (num_samples, num_nodes):
        raise ValueError(f"`{name}` must have shape [B, N] = [{num_samples}, {num_nodes}], got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"`{name}` is on {keep.device} but `edge_index` is on {device}")
    return keep.contiguous()
