"""Grouped softmax over incidences: the attention normalisation of the stoich
conv layer (over the incidences of each reaction in ``"node"`` mode, of each
metabolite in ``"edge"`` mode).

Semantics
---------
Inputs: ``logits`` [B, nnz, H], a grouping of the nnz incidences given as a
CSR ordering (``group_ptr`` [G + 1], ``group_perm`` [nnz] a permutation: incidence
``group_perm[j]`` belongs to group g iff ``group_ptr[g] <= j < group_ptr[g + 1]``;
a :class:`~stoichconv.ops.StoichPlan` holds both orderings), and an optional
``kept`` [B, nnz] bool. For every sample b, head h and incidence k of group g:

* ``alpha[b, k, h] = exp(l_k - m) / max(sum_{j in g, kept} exp(l_j - m), tiny)``
  with ``m = max_{j in g, kept} l_j``, for kept k;
* ``alpha[b, k, h] = 0`` for k not kept, and for every k of a group with no
  kept incidence.

The backward is ``dL/dl_k = alpha_k (g_k - sum_{j in g} alpha_j g_j)``.

:func:`group_softmax_reference` computes the same with scatter/index ops on
any device; it is the reference of the tests and the path the layer takes
where the kernel does not run. ``stoichconv::group_softmax`` (and its
``_backward``) is a C++ CPU kernel: one task per (sample, group), sums in the
CSR order, so results are bit-identical for any thread count (no atomics).
There is no CUDA kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels

__all__ = ["group_softmax", "group_softmax_op_available", "group_softmax_reference"]


def group_softmax_reference(logits: Tensor, group: Tensor, num_groups: int, kept: Optional[Tensor] = None) -> Tensor:
    """The module docstring's softmax with the grouping as ``group`` [nnz]
    (incidence -> group id) instead of a CSR ordering; differentiable by autograd."""
    B, nnz, H = logits.shape
    if kept is not None:
        logits = logits.masked_fill(~kept.unsqueeze(-1), float("-inf"))
    index = group.view(1, nnz, 1).expand(B, nnz, H)
    group_max = torch.full((B, num_groups, H), float("-inf"), dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(1, index, logits.detach(), reduce="amax", include_self=True)
    group_max = torch.nan_to_num(group_max, neginf=0.0)  # empty / fully masked groups
    exp = torch.exp(logits - group_max.index_select(1, group))
    denom = torch.zeros((B, num_groups, H), dtype=logits.dtype, device=logits.device).index_add(1, group, exp)
    return exp / denom.index_select(1, group).clamp_min(torch.finfo(logits.dtype).tiny)


def group_softmax_op_available(device: torch.device) -> bool:
    """Whether the compiled kernel serves tensors on ``device`` (CPU only)."""
    return (
        device.type == "cpu"
        and has_compiled_kernels()
        and torch._C._dispatch_has_kernel_for_dispatch_key("stoichconv::group_softmax", "CPU")
    )


def group_softmax(logits: Tensor, group_ptr: Tensor, group_perm: Tensor, kept: Optional[Tensor] = None) -> Tensor:
    """``alpha`` [B, nnz, H] of the module docstring on the compiled CPU
    kernel; differentiable w.r.t. ``logits``."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"`logits` must be a floating tensor [B, nnz, H], got {getattr(logits, 'shape', type(logits))}")
    for name, t in (("group_ptr", group_ptr), ("group_perm", group_perm)):
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise TypeError(f"`{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if kept is not None and (not isinstance(kept, Tensor) or kept.dtype != torch.bool):
        raise TypeError(f"`kept` must be a bool tensor, got {getattr(kept, 'dtype', type(kept).__name__)}")
    return torch.ops.stoichconv.group_softmax(logits, kept, group_ptr, group_perm)


def _forward_fake(logits, kept, group_ptr, group_perm):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _backward_fake(grad, alpha, group_ptr, group_perm):
    return torch.empty_like(alpha, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _logits, _kept, group_ptr, group_perm = inputs
    ctx.save_for_backward(output, group_ptr, group_perm)


def _backward(ctx, grad):
    alpha, group_ptr, group_perm = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return torch.ops.stoichconv.group_softmax_backward(grad, alpha, group_ptr, group_perm), None, None, None


if has_compiled_kernels() and hasattr(torch.ops.stoichconv, "group_softmax"):
    torch.library.register_fake("stoichconv::group_softmax")(_forward_fake)
    torch.library.register_fake("stoichconv::group_softmax_backward")(_backward_fake)
    torch.library.register_autograd("stoichconv::group_softmax", _backward, setup_context=_setup_context)
