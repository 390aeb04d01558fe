"""Pure-PyTorch reference of :func:`stoichconv.ops.stoich_conv` (the
semantics are stated once, in :mod:`stoichconv.ops.stoich_conv`). Gather and
``index_add`` over the raw incidence list, differentiated by autograd: the
baseline every backend is tested and benchmarked against, and the fallback
when ``stoichconv._C`` is missing.

Every dtype of the op is taken: float16 / bfloat16 inputs are computed in float32 (the
accumulate dtype of the op's dtype policy, stated in :mod:`stoichconv.ops.stoich_conv`) and the
result is rounded to the input dtype once, so the reference and the kernels give the same answer
up to rounding; float32 and float64 are computed in themselves."""

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
    """``out`` [B, N, H, C] (dtype of ``y``) from ``y`` [B, N, H, C], ``weight`` [B, nnz, H]
    (or [1, nnz, H], shared by the batch: broadcast, never expanded; autograd sums its
    gradient over the batch), the incidence list and optional ``reaction_keep`` [B, M]."""
    if weight.dim() == 2:  # [nnz, H], shared by the batch
        weight = weight.unsqueeze(0)
    dtype = y.dtype
    compute = torch.promote_types(dtype, torch.float32)  # float32 for float16 / bfloat16
    y, weight = y.to(compute), weight.to(compute)
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
    # Masked incidences and zero-degree rows are skipped (selected away), never multiplied by
    # 0: an inf/NaN in a masked or zero-degree row gives 0, as on every kernel backend.
    on = None if reaction_keep is None else reaction_keep[:, reaction_index].view(B, reaction_index.numel(), 1, 1)
    w = weight.unsqueeze(-1)  # [B, nnz, H, 1]
    if on is not None:  # masked factors replaced by 0 before the product (gradients 0 too)
        w = torch.where(on, w, 0.0)
    gathered = y[:, metabolite_index]
    message = w * (gathered if on is None else torch.where(on, gathered, 0.0))
    hidden = torch.zeros(B, num_reactions, H, C, dtype=y.dtype, device=y.device).index_add(1, reaction_index, message)
    hidden = _scale_rows(hidden, edge_norm)
    message = w * hidden[:, reaction_index]  # masked reactions' hidden rows are 0 (zero degree)
    out = torch.zeros_like(y).index_add(1, metabolite_index, message)
    return _scale_rows(out, node_norm).to(dtype)


def _scale_rows(rows: Tensor, norm: Tensor) -> Tensor:
    """``rows * norm`` per row, exactly 0 (whatever ``rows`` holds) where ``norm`` is 0."""
    norm = norm[:, :, None, None]
    return torch.where(norm != 0, rows * norm, 0.0)


stoich_propagate_reference = stoich_conv_reference  # the name of earlier releases
