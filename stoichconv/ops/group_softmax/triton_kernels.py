"""Triton kernels of the grouped softmax over incidences.

The semantics are stated once, in :mod:`stoichconv.ops.group_softmax`; this module computes
exactly that with the row-owned structure of the C++ CPU kernel
(``csrc/cpu/group_softmax.cpp``):

* ``_group_softmax_kernel``, one program per (sample x group, head block): the group's
  incidences are read through the CSR ordering (``group_ptr``, ``group_perm``) in tiles of
  ``BLOCK_J``; one pass keeps the running maximum and the running sum of
  ``exp(l - max)`` over the kept incidences (online rescaling), a second pass writes
  ``alpha = exp(l - max) / sum``. A group with no kept incidence or whose kept logits are
  all ``-inf`` (max ``-inf``) writes 0, never NaN.
* ``_group_softmax_backward_kernel``, same grid: ``dot = sum_group alpha * g`` in one pass,
  ``grad = alpha * (g - dot)`` in a second.

Every output entry is written by exactly one program (``group_perm`` is a permutation), the
sums run over the tiles in CSR order with a fixed in-tile reduction: no atomics, results
bit-identical run to run.

Dtypes (the rules: :mod:`stoichconv.ops.group_softmax`): float16, bfloat16, float32 and
float64. Every load is converted to the constexpr ``ACC`` dtype (:func:`_acc_dtype`: float32
for float16 / bfloat16 / float32, float64 for float64), the running maximum, the sums and the
products stay in it, and each store is converted once to the output dtype. The interpreter
(``TRITON_INTERPRET=1``) runs all four dtypes, with one difference for bfloat16: its float32 ->
bfloat16 conversion truncates (rounds toward zero; Triton 3.7's ``interpreter.cast_impl`` calls
``_convert_float`` without a rounding mode), so bfloat16 results there lie within one unit in
the last place of the correctly rounded value, where compiled kernels round to nearest even.
float16 converts through numpy, rounded.

Ops (``torch.library.custom_op``, same schemas as the compiled ops; fake kernels and autograd
from :func:`stoichconv.ops.group_softmax.register`):

* ``stoichconv::triton_group_softmax(Tensor logits, Tensor? kept, Tensor group_ptr,
  Tensor group_perm) -> Tensor``
* ``stoichconv::triton_group_softmax_backward(Tensor grad, Tensor alpha, Tensor group_ptr,
  Tensor group_perm) -> Tensor``

Checks: shapes, dtypes and devices always (Python exceptions naming the argument). The
ordering's values (``group_ptr`` a CSR pointer over nnz, ``group_perm`` a permutation) are
checked on CPU tensors only, where the interpreter has no bounds protection and the check
costs no device sync; on a GPU the plan from ``build_stoich_plan`` is trusted, which keeps
the launch free of host syncs (as in the Triton stoich conv).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from stoichconv.ops._dtypes import FLOAT_DTYPES
from stoichconv.ops.group_softmax import register

__all__ = ["triton_group_softmax", "triton_group_softmax_backward"]

_BLOCK_J = 16  # incidences per tile
_MAX_BLOCK_H = 16  # heads per program


# Per-tile steps of a row-owned group softmax, shared with the fused incidence attention
# (:mod:`stoichconv.ops.incidence_attention.triton_kernels`).
@triton.jit
def group_tile(perm, kept, b, j0, offs, end, nnz, HAS_KEPT: tl.constexpr):
    """The tile ``j0 + offs`` of a group ending at ``end``: its incidences ``k``, the in-group
    mask ``jm`` and the kept mask ``on`` (``jm`` and, with ``HAS_KEPT``, ``kept[b, k]``)."""
    j = j0 + offs
    jm = j < end
    k = tl.load(perm + j, mask=jm, other=0)
    on = jm
    if HAS_KEPT:
        on = on & (tl.load(kept + b * nnz + k, mask=jm, other=0) != 0)
    return k, jm, on


@triton.jit
def online_softmax_update(run_max, run_sum, l, m2):
    """One tile of the running maximum and sum of ``exp(l - max)`` over the entries ``m2``
    (``l`` is ``-inf`` elsewhere); returns the new ``(run_max, run_sum)``."""
    new_max = tl.maximum(run_max, tl.max(l, axis=0))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.where(m2, tl.exp(l - safe[None, :]), 0.0)
    return new_max, run_sum * tl.exp(run_max - safe) + tl.sum(p, axis=0)


@triton.jit
def softmax_normaliser(run_max, run_sum):
    """``(live, shift, denom)`` of a finished group: a group with no kept entry or only ``-inf``
    logits is not live (its weights are 0)."""
    live = run_max != float("-inf")
    return live, tl.where(live, run_max, 0.0), tl.where(live & (run_sum > 0), run_sum, 1.0)


@triton.jit
def softmax_grad_tile(grad, alpha, perm, b, j0, offs, end, h, hm, nnz, H, ACC: tl.constexpr):
    """The tile's ``(k, jm, m2, off, alpha, grad)`` of the softmax backward (values in ``ACC``)."""
    k, jm, _on = group_tile(perm, perm, b, j0, offs, end, nnz, False)
    m2 = jm[:, None] & hm[None, :]
    off = (b * nnz + k)[:, None] * H + h[None, :]
    a = tl.load(alpha + off, mask=m2, other=0.0).to(ACC)
    gg = tl.load(grad + off, mask=m2, other=0.0).to(ACC)
    return k, jm, m2, off, a, gg


@triton.jit
def softmax_grad_dot(grad, alpha, perm, b, start, end, h, hm, nnz, H,
                     ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    """``sum_{e in group} alpha_e * grad_e`` per head (the softmax backward's row term)."""
    offs = tl.arange(0, BLOCK_J)
    dot = tl.zeros([BLOCK_H], ACC)
    for j0 in range(start, end, BLOCK_J):
        _k, _jm, _m2, _off, a, gg = softmax_grad_tile(grad, alpha, perm, b, j0, offs, end, h, hm, nnz, H, ACC)
        dot += tl.sum(a * gg, axis=0)
    return dot


@triton.jit
def _group_softmax_kernel(logits, kept, alpha, ptr, perm, G, nnz, H,
                          HAS_KEPT: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    g = pid % G
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    start = tl.load(ptr + g)
    end = tl.load(ptr + g + 1)
    offs = tl.arange(0, BLOCK_J)
    run_max = tl.full([BLOCK_H], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_H], ACC)
    # Pass 1: running max and sum of exp(l - max) over the kept incidences.
    for j0 in range(start, end, BLOCK_J):
        k, jm, on = group_tile(perm, kept, b, j0, offs, end, nnz, HAS_KEPT)
        m2 = on[:, None] & hm[None, :]
        l = tl.load(logits + (b * nnz + k)[:, None] * H + h[None, :], mask=m2, other=float("-inf")).to(ACC)
        run_max, run_sum = online_softmax_update(run_max, run_sum, l, m2)
    live, shift, denom = softmax_normaliser(run_max, run_sum)  # not live: empty, fully masked or all -inf -> 0
    # Pass 2: alpha = exp(l - max) / sum (0 where not kept or not live).
    for j0 in range(start, end, BLOCK_J):
        k, jm, on = group_tile(perm, kept, b, j0, offs, end, nnz, HAS_KEPT)
        m2 = on[:, None] & hm[None, :]
        off = (b * nnz + k)[:, None] * H + h[None, :]
        l = tl.load(logits + off, mask=m2, other=float("-inf")).to(ACC)
        a = tl.where(m2 & live[None, :], tl.exp(l - shift[None, :]) / denom[None, :], 0.0)
        tl.store(alpha + off, a.to(alpha.dtype.element_ty), mask=jm[:, None] & hm[None, :])


@triton.jit
def _group_softmax_backward_kernel(grad, alpha, grad_logits, ptr, perm, G, nnz, H,
                                   ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    g = pid % G
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    start = tl.load(ptr + g)
    end = tl.load(ptr + g + 1)
    offs = tl.arange(0, BLOCK_J)
    dot = softmax_grad_dot(grad, alpha, perm, b, start, end, h, hm, nnz, H, ACC, BLOCK_J, BLOCK_H)
    for j0 in range(start, end, BLOCK_J):
        _k, _jm, m2, off, a, gg = softmax_grad_tile(grad, alpha, perm, b, j0, offs, end, h, hm, nnz, H, ACC)
        tl.store(grad_logits + off, (a * (gg - dot[None, :])).to(grad_logits.dtype.element_ty), mask=m2)


def _acc_dtype(dtype: torch.dtype):
    """The accumulator of ``dtype`` inputs (float64 for float64, float32 otherwise)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(op: str, values: Tensor, name: str, group_ptr: Tensor, group_perm: Tensor) -> None:
    if not isinstance(values, Tensor) or values.dim() != 3:
        raise ValueError(f"{op}: `{name}` must be [B, nnz, H], got {tuple(getattr(values, 'shape', ()))}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be float16, bfloat16, float32 or float64, got {values.dtype}")
    for arg, t in (("group_ptr", group_ptr), ("group_perm", group_perm)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"{op}: `{arg}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != values.device:
            raise ValueError(f"{op}: `{arg}` is on {t.device} but `{name}` is on {values.device}")
    nnz = values.shape[1]
    if group_ptr.numel() < 1:
        raise ValueError(f"{op}: `group_ptr` must have length num_groups + 1 >= 1")
    if group_perm.numel() != nnz:
        raise ValueError(f"{op}: `group_perm` must have length nnz = {nnz}, got {group_perm.numel()}")
    if values.device.type != "cuda":  # the interpreter has no bounds protection
        if int(group_ptr[0]) != 0 or int(group_ptr[-1]) != nnz:
            raise ValueError(f"{op}: `group_ptr` must start at 0 and end at nnz = {nnz}")
        if group_ptr.numel() > 1 and bool((group_ptr[1:] < group_ptr[:-1]).any()):
            raise ValueError(f"{op}: `group_ptr` must be non-decreasing")
        if nnz and (int(group_perm.min()) < 0 or int(group_perm.max()) >= nnz
                    or not bool((torch.bincount(group_perm, minlength=nnz) == 1).all())):
            raise ValueError(f"{op}: `group_perm` must be a permutation of [0, nnz)")


def _grid(B: int, G: int, H: int) -> tuple[tuple[int, int], int]:
    block_h = min(triton.next_power_of_2(max(H, 1)), _MAX_BLOCK_H)
    return (B * G, triton.cdiv(H, block_h)), block_h


@torch.library.custom_op("stoichconv::triton_group_softmax", mutates_args=())
def triton_group_softmax(logits: Tensor, kept: Optional[Tensor], group_ptr: Tensor, group_perm: Tensor) -> Tensor:
    """Triton grouped softmax ``alpha`` [B, nnz, H] (semantics: :mod:`stoichconv.ops.group_softmax`)."""
    op = "triton_group_softmax"
    _check(op, logits, "logits", group_ptr, group_perm)
    B, nnz, H = logits.shape
    if kept is not None:
        if not isinstance(kept, Tensor) or kept.dtype != torch.bool:
            raise TypeError(f"{op}: `kept` must be a bool tensor, got {getattr(kept, 'dtype', type(kept).__name__)}")
        if tuple(kept.shape) != (B, nnz):
            raise ValueError(f"{op}: `kept` must be [B, nnz] = [{B}, {nnz}], got {tuple(kept.shape)}")
        if kept.device != logits.device:
            raise ValueError(f"{op}: `kept` is on {kept.device} but `logits` is on {logits.device}")
    logits = logits.contiguous()
    alpha = torch.empty_like(logits)
    G = group_ptr.numel() - 1
    if B * G * H == 0:
        return alpha.zero_()  # nothing to normalise (nnz = 0 when G = 0)
    grid, block_h = _grid(B, G, H)
    keep = kept.contiguous().view(torch.uint8) if kept is not None else group_ptr
    with _device_guard(logits.device):
        _group_softmax_kernel[grid](
            logits, keep, alpha, group_ptr.contiguous(), group_perm.contiguous(), G, nnz, H,
            HAS_KEPT=kept is not None, ACC=_acc_dtype(logits.dtype), BLOCK_J=_BLOCK_J, BLOCK_H=block_h,
        )
    return alpha


@torch.library.custom_op("stoichconv::triton_group_softmax_backward", mutates_args=())
def triton_group_softmax_backward(grad: Tensor, alpha: Tensor, group_ptr: Tensor, group_perm: Tensor) -> Tensor:
    """Triton ``grad_logits = alpha * (grad - sum_group alpha * grad)``."""
    op = "triton_group_softmax_backward"
    _check(op, alpha, "alpha", group_ptr, group_perm)
    if not isinstance(grad, Tensor) or grad.shape != alpha.shape or grad.dtype != alpha.dtype \
            or grad.device != alpha.device:
        raise ValueError(f"{op}: `grad` must match `alpha` in shape, dtype and device")
    grad, alpha = grad.contiguous(), alpha.contiguous()
    B, nnz, H = alpha.shape
    grad_logits = torch.empty_like(alpha)
    G = group_ptr.numel() - 1
    if B * G * H == 0:
        return grad_logits.zero_()
    grid, block_h = _grid(B, G, H)
    with _device_guard(alpha.device):
        _group_softmax_backward_kernel[grid](
            grad, alpha, grad_logits, group_ptr.contiguous(), group_perm.contiguous(), G, nnz, H,
            ACC=_acc_dtype(alpha.dtype), BLOCK_J=_BLOCK_J, BLOCK_H=block_h,
        )
    return grad_logits


register("triton_group_softmax", "triton_group_softmax_backward")
