"""Pure-PyTorch reference of :func:`stoichconv.ops.stoich_conv` (the
semantics are stated once, in :mod:`stoichconv.ops.stoich_conv`). Gather and
``index_add`` over the raw incidence list, differentiated by autograd: the
baseline every backend is tested and benchmarked against, and the fallback
when ``stoichconv._C`` is missing."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _reciprocal_or_zero(total: Tensor) -> Tensor:
    return torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def stoich_conv_reference(
    y: Tensor,
    weight: Tensor,
    metabolite_index: Tensor,
    reaction_index: Tensor,
    stoich: Tensor,
    num_reactions: int,
    reaction_keep: Optional[Tensor] = None,
) -> Tensor:
    """``out`` [B, N, H, C] from ``y`` [B, N, H, C], ``weight`` [B, nnz, H],
    the incidence list and optional ``reaction_keep`` [B, M]."""
    B, N, H, C = y.shape
    abs_stoich = stoich.detach().abs().to(y.dtype)
    if reaction_keep is None:
        kept = torch.ones(B, metabolite_index.numel(), dtype=y.dtype, device=y.device)
    else:
        kept = reaction_keep[:, reaction_index].to(y.dtype)
    degree_weight = abs_stoich.unsqueeze(0) * kept  # [B, nnz]
    node_norm = _reciprocal_or_zero(
        torch.zeros(B, N, dtype=y.dtype, device=y.device).index_add_(1, metabolite_index, degree_weight)
    )
    edge_norm = _reciprocal_or_zero(
        torch.zeros(B, num_reactions, dtype=y.dtype, device=y.device).index_add_(1, reaction_index, degree_weight)
    )
    w = (weight * kept.unsqueeze(-1)).unsqueeze(-1)  # [B, nnz, H, 1]
    hidden = torch.zeros(B, num_reactions, H, C, dtype=y.dtype, device=y.device).index_add(
        1, reaction_index, w * y[:, metabolite_index]
    ) * edge_norm[:, :, None, None]
    out = torch.zeros_like(y).index_add(1, metabolite_index, w * hidden[:, reaction_index])
    return out * node_norm[:, :, None, None]


stoich_propagate_reference = stoich_conv_reference  # the name of earlier releases
