"""Pure-PyTorch reference of :func:`stoichconv.ops.incidence_attention` (semantics and dtypes
there): index gathers, ``leaky_relu`` and scatter ops over the incidence -> group map,
differentiated by autograd; runs on any device. float16 / bfloat16 scores are computed in
float32 and ``alpha`` is rounded back to their dtype."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["incidence_attention_reference"]


def incidence_attention_reference(score_v: Tensor, score_e: Tensor, metabolite_index: Tensor, reaction_index: Tensor,
                                  group: Tensor, num_groups: int, kept: Optional[Tensor] = None,
                                  negative_slope: float = 0.2) -> Tensor:
    """``alpha`` [B, nnz, H] with the softmax grouping given as ``group`` [nnz] (incidence ->
    group id) instead of a CSR ordering; in the dtype of ``score_v``, computed in float64 for
    float64 and float32 otherwise."""
    dtype = score_v.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sv, se = score_v.to(acc), score_e.to(acc)
    logits = F.leaky_relu(sv.index_select(1, metabolite_index) + se.index_select(1, reaction_index), negative_slope)
    B, nnz, H = sv.shape[0], metabolite_index.numel(), sv.shape[2]
    logits = logits.expand(B, nnz, H)
    if kept is not None:
        logits = logits.masked_fill(~kept.unsqueeze(-1), float("-inf"))
    index = group.view(1, nnz, 1).expand(B, nnz, H)
    group_max = torch.full((B, num_groups, H), float("-inf"), dtype=acc, device=sv.device)
    group_max = group_max.scatter_reduce(1, index, logits.detach(), reduce="amax", include_self=True)
    group_max = torch.nan_to_num(group_max, neginf=0.0)  # empty / fully masked groups
    exp = torch.exp(logits - group_max.index_select(1, group))
    denom = torch.zeros((B, num_groups, H), dtype=acc, device=sv.device).index_add(1, group, exp)
    return (exp / denom.index_select(1, group).clamp_min(torch.finfo(acc).tiny)).to(dtype)
