"""Triton kernels of the fused incidence attention.

The semantics are stated once, in :mod:`stoichconv.ops.incidence_attention`; this module
computes exactly that with the row-owned structure of the C++ CPU kernel
(``csrc/cpu/incidence_attention.cpp``) and of :mod:`stoichconv.ops.group_softmax.triton_kernels`:

* ``_forward_kernel``, one program per (sample x group, head block): the logits are gathered
  from the two scores through ``metabolite_index`` / ``reaction_index`` and passed through the
  leaky ReLU in registers; one pass keeps the running maximum and sum (online rescaling), a
  second writes ``alpha``. A group with no kept incidence or all-``-inf`` kept logits writes 0.
* ``_pre_grad_kernel``, same grid: ``d pre = alpha (g - dot) leaky_relu'(pre)`` into an
  accumulate-dtype [B, nnz, H] buffer.
* ``_row_sum_kernel``, one program per (output sample x row, head block) of the metabolite or
  the reaction grouping: the row's sum of ``d pre`` over its incidences in CSR order, over the
  samples it covers (the batch, ascending, when ``score_e`` is shared).

Every output entry is written by exactly one program, sums in a fixed order: no atomics.
Dtypes: every load is converted to the constexpr ``ACC`` dtype (float32, float64 for float64),
each store once to the output dtype (the interpreter's bfloat16 store truncates, see
:mod:`stoichconv.ops.group_softmax.triton_kernels`).

Ops (``torch.library.custom_op``, the schemas of the compiled ops; fake kernels and autograd
from :func:`stoichconv.ops.incidence_attention.register`): ``stoichconv::triton_incidence_attention``
and ``stoichconv::triton_incidence_attention_backward``.

Checks: shapes, dtypes and devices always (Python exceptions naming the argument); the values
of the indices and orderings on CPU tensors only (the interpreter has no bounds protection; on a
GPU the plan is trusted, no host sync).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from stoichconv.ops._dtypes import FLOAT_DTYPES, accumulate_dtype
from stoichconv.ops.group_softmax.triton_kernels import (_acc_dtype, _device_guard, group_tile,
                                                        online_softmax_update, softmax_grad_dot,
                                                        softmax_grad_tile, softmax_normaliser)
from stoichconv.ops.incidence_attention import register

__all__ = ["triton_incidence_attention", "triton_incidence_attention_backward"]

_BLOCK_J = 16  # incidences per tile
_MAX_BLOCK_H = 16  # heads per program


@triton.jit
def _logits(score_v, score_e, mi, ri, b, be, k, h, jm, m2, N, M, H, slope, ACC: tl.constexpr):
    v = tl.load(score_v + ((b * N + tl.load(mi + k, mask=jm, other=0)) * H)[:, None] + h[None, :],
                mask=m2, other=0.0).to(ACC)
    e = tl.load(score_e + ((be * M + tl.load(ri + k, mask=jm, other=0)) * H)[:, None] + h[None, :],
                mask=m2, other=0.0).to(ACC)
    pre = v + e
    return pre, tl.where(pre > 0, pre, pre * tl.load(slope))


@triton.jit
def _forward_kernel(score_v, score_e, mi, ri, kept, alpha, ptr, perm, G, N, M, nnz, H, slope,
                    SHARED_E: tl.constexpr, HAS_KEPT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    g = pid % G
    be = 0 if SHARED_E else b
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    start = tl.load(ptr + g)
    end = tl.load(ptr + g + 1)
    offs = tl.arange(0, BLOCK_J)
    run_max = tl.full([BLOCK_H], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_H], ACC)
    for j0 in range(start, end, BLOCK_J):
        k, jm, on = group_tile(perm, kept, b, j0, offs, end, nnz, HAS_KEPT)
        m2 = jm[:, None] & hm[None, :]
        _pre, l = _logits(score_v, score_e, mi, ri, b, be, k, h, jm, m2, N, M, H, slope, ACC)
        l = tl.where(on[:, None] & hm[None, :], l, float("-inf"))
        run_max, run_sum = online_softmax_update(run_max, run_sum, l, on[:, None] & hm[None, :])
    live, shift, denom = softmax_normaliser(run_max, run_sum)
    for j0 in range(start, end, BLOCK_J):
        k, jm, on = group_tile(perm, kept, b, j0, offs, end, nnz, HAS_KEPT)
        m2 = jm[:, None] & hm[None, :]
        _pre, l = _logits(score_v, score_e, mi, ri, b, be, k, h, jm, m2, N, M, H, slope, ACC)
        a = tl.where(on[:, None] & hm[None, :] & live[None, :], tl.exp(l - shift[None, :]) / denom[None, :], 0.0)
        tl.store(alpha + (b * nnz + k)[:, None] * H + h[None, :], a.to(alpha.dtype.element_ty), mask=m2)


@triton.jit
def _pre_grad_kernel(grad, alpha, score_v, score_e, mi, ri, dpre, ptr, perm, G, N, M, nnz, H, slope,
                     SHARED_E: tl.constexpr, ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    g = pid % G
    be = 0 if SHARED_E else b
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    start = tl.load(ptr + g)
    end = tl.load(ptr + g + 1)
    offs = tl.arange(0, BLOCK_J)
    dot = softmax_grad_dot(grad, alpha, perm, b, start, end, h, hm, nnz, H, ACC, BLOCK_J, BLOCK_H)
    for j0 in range(start, end, BLOCK_J):
        k, jm, m2, off, a, gg = softmax_grad_tile(grad, alpha, perm, b, j0, offs, end, h, hm, nnz, H, ACC)
        pre, _l = _logits(score_v, score_e, mi, ri, b, be, k, h, jm, m2, N, M, H, slope, ACC)
        d = a * (gg - dot[None, :]) * tl.where(pre > 0, 1.0, tl.load(slope))
        tl.store(dpre + off, d.to(dpre.dtype.element_ty), mask=m2)


@triton.jit
def _row_sum_kernel(src, out, ptr, perm, R, PER, nnz, H,
                    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    o = pid // R
    r = pid % R
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    start = tl.load(ptr + r)
    end = tl.load(ptr + r + 1)
    offs = tl.arange(0, BLOCK_J)
    acc = tl.zeros([BLOCK_H], ACC)
    for b in range(o * PER, o * PER + PER):
        for j0 in range(start, end, BLOCK_J):
            j = j0 + offs
            jm = j < end
            k = tl.load(perm + j, mask=jm, other=0)
            m2 = jm[:, None] & hm[None, :]
            acc += tl.sum(tl.load(src + (b * nnz + k)[:, None] * H + h[None, :], mask=m2, other=0.0).to(ACC), axis=0)
    tl.store(out + pid * H + h, acc.to(out.dtype.element_ty), mask=hm)


def _slope(negative_slope: float, like: Tensor) -> Tensor:
    """The slope as a one-element tensor of the accumulate dtype (a Python float argument would
    reach the kernel as float32, off by 3e-9 relative in float64)."""
    return torch.full((1,), float(negative_slope), dtype=accumulate_dtype(like.dtype), device=like.device)


def _check_int(op: str, name: str, t, like: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        raise TypeError(f"{op}: `{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != like.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `score_v` is on {like.device}")


def _check_grouping(op: str, ptr_name: str, perm_name: str, ptr: Tensor, perm: Tensor, rows: Optional[int],
                    nnz: int, like: Tensor) -> None:
    _check_int(op, ptr_name, ptr, like)
    _check_int(op, perm_name, perm, like)
    if rows is not None and ptr.numel() != rows + 1:
        raise ValueError(f"{op}: `{ptr_name}` must have length {rows + 1}, got {ptr.numel()}")
    if ptr.numel() < 1:
        raise ValueError(f"{op}: `{ptr_name}` must have length num_groups + 1 >= 1")
    if perm.numel() != nnz:
        raise ValueError(f"{op}: `{perm_name}` must have length nnz = {nnz}, got {perm.numel()}")
    if like.device.type != "cuda":  # the interpreter has no bounds protection
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
            raise ValueError(f"{op}: `{ptr_name}` must start at 0 and end at nnz = {nnz}")
        if ptr.numel() > 1 and bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"{op}: `{ptr_name}` must be non-decreasing")
        if nnz and (int(perm.min()) < 0 or int(perm.max()) >= nnz
                    or not bool((torch.bincount(perm, minlength=nnz) == 1).all())):
            raise ValueError(f"{op}: `{perm_name}` must be a permutation of [0, nnz)")


def _check_scores(op: str, score_v: Tensor, score_e: Tensor, mi: Tensor, ri: Tensor, ptr: Tensor, perm: Tensor):
    if not isinstance(score_v, Tensor) or score_v.dim() != 3:
        raise ValueError(f"{op}: `score_v` must be [B, N, H], got {tuple(getattr(score_v, 'shape', ()))}")
    if score_v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: `score_v` must be float16, bfloat16, float32 or float64, got {score_v.dtype}")
    B, N, H = score_v.shape
    if not isinstance(score_e, Tensor) or score_e.dim() != 3 or score_e.shape[0] not in (1, B) or score_e.shape[2] != H:
        raise ValueError(f"{op}: `score_e` must be [1 or B, M, H] with B = {B}, H = {H}, "
                         f"got {tuple(getattr(score_e, 'shape', ()))}")
    if score_e.dtype != score_v.dtype or score_e.device != score_v.device:
        raise ValueError(f"{op}: `score_e` must have the dtype and device of `score_v`")
    _check_int(op, "metabolite_index", mi, score_v)
    _check_int(op, "reaction_index", ri, score_v)
    nnz = mi.numel()
    if ri.numel() != nnz:
        raise ValueError(f"{op}: `reaction_index` must have length nnz = {nnz}, got {ri.numel()}")
    if score_v.device.type != "cuda" and nnz:
        for name, t, n, n_name in (("metabolite_index", mi, N, "N"), ("reaction_index", ri, score_e.shape[1], "M")):
            if int(t.min()) < 0 or int(t.max()) >= n:
                raise ValueError(f"{op}: `{name}` has an id outside [0, {n_name} = {n})")
    _check_grouping(op, "group_ptr", "group_perm", ptr, perm, None, nnz, score_v)
    return B, N, score_e.shape[1], H, nnz


def _grid(rows: int, H: int) -> tuple[tuple[int, int], int]:
    block_h = min(triton.next_power_of_2(max(H, 1)), _MAX_BLOCK_H)
    return (rows, triton.cdiv(H, block_h)), block_h


@torch.library.custom_op("stoichconv::triton_incidence_attention", mutates_args=())
def triton_incidence_attention(score_v: Tensor, score_e: Tensor, metabolite_index: Tensor, reaction_index: Tensor,
                               kept: Optional[Tensor], group_ptr: Tensor, group_perm: Tensor,
                               metabolite_ptr: Tensor, metabolite_perm: Tensor, reaction_ptr: Tensor,
                               reaction_perm: Tensor, negative_slope: float) -> Tensor:
    """Triton fused incidence attention ``alpha`` [B, nnz, H] (semantics:
    :mod:`stoichconv.ops.incidence_attention`)."""
    op = "triton_incidence_attention"
    B, N, M, H, nnz = _check_scores(op, score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm)
    if kept is not None:
        if not isinstance(kept, Tensor) or kept.dtype != torch.bool:
            raise TypeError(f"{op}: `kept` must be a bool tensor, got {getattr(kept, 'dtype', type(kept).__name__)}")
        if tuple(kept.shape) != (B, nnz):
            raise ValueError(f"{op}: `kept` must be [B, nnz] = [{B}, {nnz}], got {tuple(kept.shape)}")
        if kept.device != score_v.device:
            raise ValueError(f"{op}: `kept` is on {kept.device} but `score_v` is on {score_v.device}")
    alpha = score_v.new_empty((B, nnz, H))
    G = group_ptr.numel() - 1
    if B * G * H == 0:
        return alpha.zero_()
    grid, block_h = _grid(B * G, H)
    keep = kept.contiguous().view(torch.uint8) if kept is not None else group_ptr
    with _device_guard(score_v.device):
        _forward_kernel[grid](
            score_v.contiguous(), score_e.contiguous(), metabolite_index.contiguous(), reaction_index.contiguous(),
            keep, alpha, group_ptr.contiguous(), group_perm.contiguous(), G, N, M, nnz, H, _slope(negative_slope, score_v),
            SHARED_E=score_e.shape[0] == 1, HAS_KEPT=kept is not None, ACC=_acc_dtype(score_v.dtype),
            BLOCK_J=_BLOCK_J, BLOCK_H=block_h,
        )
    return alpha


@torch.library.custom_op("stoichconv::triton_incidence_attention_backward", mutates_args=())
def triton_incidence_attention_backward(grad: Tensor, alpha: Tensor, score_v: Tensor, score_e: Tensor,
                                        metabolite_index: Tensor, reaction_index: Tensor, group_ptr: Tensor,
                                        group_perm: Tensor, metabolite_ptr: Tensor, metabolite_perm: Tensor,
                                        reaction_ptr: Tensor, reaction_perm: Tensor,
                                        negative_slope: float) -> tuple[Tensor, Tensor]:
    """Triton ``(grad_score_v, grad_score_e)`` of the fused incidence attention."""
    op = "triton_incidence_attention_backward"
    B, N, M, H, nnz = _check_scores(op, score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm)
    if not isinstance(alpha, Tensor) or tuple(alpha.shape) != (B, nnz, H) or alpha.dtype != score_v.dtype \
            or alpha.device != score_v.device:
        raise ValueError(f"{op}: `alpha` must be [B, nnz, H] = [{B}, {nnz}, {H}] of the dtype and device of `score_v`")
    if not isinstance(grad, Tensor) or grad.shape != alpha.shape or grad.dtype != alpha.dtype \
            or grad.device != alpha.device:
        raise ValueError(f"{op}: `grad` must match `alpha` in shape, dtype and device")
    _check_grouping(op, "metabolite_ptr", "metabolite_perm", metabolite_ptr, metabolite_perm, N, nnz, score_v)
    _check_grouping(op, "reaction_ptr", "reaction_perm", reaction_ptr, reaction_perm, M, nnz, score_v)
    Be = score_e.shape[0]
    grad_v = score_v.new_empty((B, N, H))
    grad_e = score_e.new_empty((Be, M, H))
    G = group_ptr.numel() - 1
    if B * H == 0 or nnz == 0:
        return grad_v.zero_(), grad_e.zero_()
    acc = _acc_dtype(score_v.dtype)
    dpre = torch.empty((B, nnz, H), dtype=accumulate_dtype(score_v.dtype), device=score_v.device)
    with _device_guard(score_v.device):
        if G:
            grid, block_h = _grid(B * G, H)
            _pre_grad_kernel[grid](
                grad.contiguous(), alpha.contiguous(), score_v.contiguous(), score_e.contiguous(),
                metabolite_index.contiguous(), reaction_index.contiguous(), dpre, group_ptr.contiguous(),
                group_perm.contiguous(), G, N, M, nnz, H, _slope(negative_slope, score_v),
                SHARED_E=Be == 1, ACC=acc, BLOCK_J=_BLOCK_J, BLOCK_H=block_h,
            )
        for out, ptr, perm, outs, per, R in ((grad_v, metabolite_ptr, metabolite_perm, B, 1, N),
                                             (grad_e, reaction_ptr, reaction_perm, Be, B if Be == 1 else 1, M)):
            if outs * R == 0:
                continue
            grid, block_h = _grid(outs * R, H)
            _row_sum_kernel[grid](dpre, out, ptr.contiguous(), perm.contiguous(), R, per, nnz, H,
                                  ACC=acc, BLOCK_J=_BLOCK_J, BLOCK_H=block_h)
    return grad_v, grad_e


register("triton_incidence_attention", "triton_incidence_attention_backward")
