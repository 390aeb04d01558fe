"""Pure-PyTorch reference of :func:`stoichconv.ops.group_softmax` (semantics and dtypes there):
scatter and index ops over the incidence -> group map, differentiated by autograd; runs on any
device. float16 / bfloat16 logits are computed in float32 and ``alpha`` is rounded back to their
dtype (the gradient likewise, through autograd's casts)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["group_softmax_reference"]


def group_softmax_reference(logits: Tensor, group: Tensor, num_groups: int, kept: Optional[Tensor] = None) -> Tensor:
    """``alpha`` [B, nnz, H] with the grouping given as ``group`` [nnz] (incidence -> group id)
    instead of a CSR ordering; in the dtype of ``logits``, computed in float64 for float64 and
    float32 otherwise."""
    dtype = logits.dtype
    logits = logits.to(torch.float64 if dtype == torch.float64 else torch.float32)
    B, nnz, H = logits.shape
    if kept is not None:
        logits = logits.masked_fill(~kept.unsqueeze(-1), float("-inf"))
    index = group.view(1, nnz, 1).expand(B, nnz, H)
    group_max = torch.full((B, num_groups, H), float("-inf"), dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(1, index, logits.detach(), reduce="amax", include_self=True)
    group_max = torch.nan_to_num(group_max, neginf=0.0)  # empty / fully masked groups
    exp = torch.exp(logits - group_max.index_select(1, group))
    denom = torch.zeros((B, num_groups, H), dtype=logits.dtype, device=logits.device).index_add(1, group, exp)
    return (exp / denom.index_select(1, group).clamp_min(torch.finfo(logits.dtype).tiny)).to(dtype)
