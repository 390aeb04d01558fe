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
* ``alpha[b, k, h] = 0`` for k not kept, for every k of a group with no
  kept incidence, and for every k of a group whose kept logits are all
  ``-inf`` (``m = -inf``: treated as an empty group, never NaN).

The backward is ``dL/dl_k = alpha_k (g_k - sum_{j in g} alpha_j g_j)``.

Dtypes
------
``logits`` is float16, bfloat16, float32 or float64 (:data:`stoichconv.ops._dtypes.FLOAT_DTYPES`);
``alpha`` and the gradient come back in that dtype. On every backend the group maximum, the
exponentials and the sums (and the backward's ``sum alpha g``) are computed in the accumulate
dtype, float32 for float16 / bfloat16 / float32 and float64 for float64
(:func:`~stoichconv.ops._dtypes.accumulate_dtype`): values are converted on load and each entry
is rounded to the result dtype once, on store. Under ``torch.autocast`` on the device type of
``logits`` (``"cpu"`` or ``"cuda"``), :func:`group_softmax` first casts ``logits`` to the
autocast dtype, so the op runs in that lower precision (as ``torch.mm`` does under autocast)
and returns it; outside autocast the dtype is kept as given. The backward op takes ``grad``
and ``alpha`` of one dtype.

Backends (:data:`SPEC`): ``cpu`` and ``cuda`` run the compiled ``stoichconv::group_softmax``
(and its ``_backward``, ``csrc/cpu/group_softmax.cpp``, ``csrc/cuda/group_softmax.cpp``):
one task (on CUDA a team of threads) per (sample, group), sums in the CSR order, so results are bit-identical for any thread
count (no atomics). ``reference`` runs
:func:`stoichconv.reference.group_softmax.group_softmax_reference`, scatter and
index ops on any device. ``triton`` runs ``stoichconv::triton_group_softmax`` (and its
``_backward``, :mod:`.triton_kernels`): the same row-owned structure, one program per
(sample x group, head block), no atomics. Both kernel backends take the compiled op's
arguments and share the fake kernels and autograd formula of :func:`register`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels
from stoichconv.backends import OpSpec, register_op, select
from stoichconv.ops._dtypes import cast_for_autocast, check_float

__all__ = ["SPEC", "group_softmax", "register"]

SPEC = register_op(OpSpec(
    name="group_softmax",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="group_softmax",
    compiled_backward="group_softmax_backward",
    triton="stoichconv.ops.group_softmax.triton_kernels:triton_group_softmax",
    reference="stoichconv.reference.group_softmax:group_softmax_reference",
))


def _group_of(group_ptr: Tensor, group_perm: Tensor) -> Tensor:
    """incidence -> group id from the CSR ordering (no host sync)."""
    nnz = group_perm.numel()
    rows = torch.repeat_interleave(torch.arange(group_ptr.numel() - 1, device=group_ptr.device), group_ptr.diff(),
                                   output_size=nnz)
    return torch.empty_like(group_perm).scatter_(0, group_perm, rows)


def group_softmax(logits: Tensor, group_ptr: Tensor, group_perm: Tensor, kept: Optional[Tensor] = None,
                  backend: str = "auto") -> Tensor:
    """``alpha`` [B, nnz, H] of the module docstring, in the dtype of ``logits`` (under
    ``torch.autocast``: the autocast dtype; dtypes in the module docstring); differentiable
    w.r.t. ``logits``. ``backend`` as in :mod:`stoichconv.backends`."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"`logits` must be a floating tensor [B, nnz, H], got {getattr(logits, 'shape', type(logits))}")
    (logits,) = cast_for_autocast(logits.device, logits)
    check_float("logits", logits)
    for name, t in (("group_ptr", group_ptr), ("group_perm", group_perm)):
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise TypeError(f"`{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if kept is not None and (not isinstance(kept, Tensor) or kept.dtype != torch.bool):
        raise TypeError(f"`kept` must be a bool tensor, got {getattr(kept, 'dtype', type(kept).__name__)}")
    selected = select("group_softmax", backend, logits.device)
    if selected.backend == "reference":
        if group_perm.numel() != logits.shape[1]:
            raise ValueError(f"`group_perm` must have nnz = {logits.shape[1]} entries, got {group_perm.numel()}")
        return selected.fn(logits, _group_of(group_ptr, group_perm), group_ptr.numel() - 1, kept)
    return selected.fn(logits, kept, group_ptr, group_perm)


# --------------------------------------------------------------------------
# Fake kernels and autograd of the kernel ops (compiled and Triton)
# --------------------------------------------------------------------------


def _forward_fake(logits, kept, group_ptr, group_perm):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _backward_fake(grad, alpha, group_ptr, group_perm):
    return torch.empty_like(alpha, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _logits, _kept, group_ptr, group_perm = inputs
    ctx.save_for_backward(output, group_ptr, group_perm)


def register(forward: str, backward: str) -> None:
    """Register the fake kernels of ``stoichconv::<forward>`` / ``stoichconv::<backward>`` and
    the autograd formula of the forward (the compiled ops here, the Triton ones from
    :mod:`.triton_kernels`)."""
    torch.library.register_fake(f"stoichconv::{forward}")(_forward_fake)
    torch.library.register_fake(f"stoichconv::{backward}")(_backward_fake)
    backward_op = getattr(torch.ops.stoichconv, backward)

    def backward_fn(ctx, grad):
        alpha, group_ptr, group_perm = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        return backward_op(grad, alpha, group_ptr, group_perm), None, None, None

    torch.library.register_autograd(f"stoichconv::{forward}", backward_fn, setup_context=_setup_context)


if has_compiled_kernels():
    register("group_softmax", "group_softmax_backward")
