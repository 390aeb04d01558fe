"""Triton kernels of the fused GATv2 attention + aggregation, forward and backward.

The semantics are stated once, in :mod:`stoichconv.ops.gatv2`; this module computes exactly
that with the row-owned structure of the C++ CPU kernels (``csrc/cpu/gatv2.cpp``):

* ``_forward_kernel``, one program per (output row, block of up to 16 heads): the row's
  edges in tiles of ``BLOCK_E`` x ``BLOCK_H`` x ``BLOCK_C`` (the ``x_l[src]`` and ``x_r[dst]``
  feature rows of the block's heads gathered per tile), the logits
  ``<att_h, leaky_relu(x_l[src] + x_r[dst])>``, the running max and softmax denominator and the
  running aggregation ``sum exp(a - max) x_l[src]`` in one pass (online rescaling), then
  ``out = acc / (denom + 1e-16)``; the raw logits go to ``logits`` (an accumulator-dtype
  [E, H] scratch, ``alpha`` itself for float32 / float64) and a second, light pass (after a
  CTA barrier) writes ``alpha = exp(a - max) / (denom + 1e-16)``.
* backward (``dL/da_e = alpha_e (<g_row, x_l[src_e]> - sum_{e' in row} alpha_e' <g_row, x_l[src_e']>)``):
  ``_row_grad_kernel`` per (output row, head block) gives the logit gradients ``gl`` [E, H];
  ``_source_grad_kernel`` per (block of ``_SRC_BLOCK`` source rows, head block) writes
  ``grad_x_l`` rows from the edges grouped by source and the block's partial ``grad_att``;
  ``_destination_grad_kernel`` per (destination row, head block) writes ``grad_x_r`` from the
  edges grouped by destination; ``_sum_blocks_kernel`` adds the ``grad_att`` partials over
  the blocks in order. The groupings are a stable counting sort done in the launcher with
  torch ops (``argsort(stable=True)`` + ``searchsorted``; no host sync).

Every output row is written by one program, every sum runs in a fixed order (edges in CSR
or sorted order, tiles in order, blocks in order): no atomics, results bit-identical run to
run.

Dtypes (the rules: :mod:`stoichconv.ops.gatv2`): float16, bfloat16, float32 and float64. Every
load is converted to the constexpr ``ACC`` dtype (:func:`_acc_dtype`: float32 for float16 /
bfloat16 / float32, float64 for float64); logits, softmax statistics, the aggregation and the
gradient sums stay in it (the forward's logits in the ``logits`` scratch, the backward's logit
gradients ``gl`` and ``grad_att`` partials in ACC tensors), and each store to an output is
converted once to the output dtype. The negative slope travels as a one-element tensor of the
accumulator dtype (a Python float kernel argument would be rounded to float32). The interpreter
(``TRITON_INTERPRET=1``) runs all four dtypes, with one difference for bfloat16: its float32 ->
bfloat16 conversion truncates (rounds toward zero; Triton 3.7's ``interpreter.cast_impl`` calls
``_convert_float`` without a rounding mode), so bfloat16 results there lie within one unit in
the last place of the correctly rounded value, where compiled kernels round to nearest even.
float16 converts through numpy, rounded.

Ops (``torch.library.custom_op``, same schemas as the compiled ops; fake kernels those of
:mod:`stoichconv.ops.gatv2`):

* ``stoichconv::triton_gatv2_forward(Tensor x_l, Tensor x_r, Tensor att, Tensor src,
  Tensor dst, Tensor crow, float negative_slope) -> (Tensor out, Tensor alpha)``,
  differentiable w.r.t. ``x_l``, ``x_r``, ``att`` through ``out`` (``alpha`` is not);
* ``stoichconv::triton_gatv2_backward(Tensor grad_out, Tensor x_l, Tensor x_r, Tensor att,
  Tensor alpha, Tensor src, Tensor dst, Tensor crow, float negative_slope)
  -> (Tensor grad_x_l, Tensor grad_x_r, Tensor grad_att)``.

Checks: shapes, dtypes and devices always; edge values (``crow`` a CSR pointer over E,
``src``/``dst`` in range) on CPU tensors only, where the interpreter has no bounds
protection; on a GPU the edges built by the model are trusted (no host syncs).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from stoichconv.ops._dtypes import FLOAT_DTYPES
from stoichconv.ops.gatv2 import _backward_fake, _forward_fake

__all__ = ["triton_gatv2_backward", "triton_gatv2_forward"]

_MAX_TILE = 4096  # BLOCK_E * BLOCK_H * BLOCK_C elements per gathered tile
_MAX_BLOCK_E = 32
_MAX_BLOCK_H = 16  # heads per program (grid axis 1 runs over head blocks beyond)
_SRC_BLOCK = 16  # source rows per program of the x_l / att pass


@triton.jit
def _lrelu(x, slope):
    return tl.where(x > 0, x, x * slope)


@triton.jit
def _forward_kernel(xl, xr, att, src, dst, crow, slope_ptr, out, alpha, logits, H, C,
                    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per (output row, head block); tiles [BLOCK_E edges, BLOCK_H heads, BLOCK_C channels].
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    W = H * C
    hc = h[:, None] * C + c[None, :]  # [BLOCK_H, BLOCK_C] offsets within a feature row
    hcm = (h < H)[:, None] & (c < C)[None, :]
    hm = h < H
    slope = tl.load(slope_ptr).to(ACC)
    a_h = tl.load(att + hc, mask=hcm, other=0.0).to(ACC)
    e0 = tl.load(crow + i)
    e1 = tl.load(crow + i + 1)
    offs = tl.arange(0, BLOCK_E)
    run_max = tl.full([BLOCK_H], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_H], ACC)
    acc = tl.zeros([BLOCK_H, BLOCK_C], ACC)
    for t in range(e0, e1, BLOCK_E):
        e = t + offs
        em = e < e1
        s = tl.load(src + e, mask=em, other=0)
        d = tl.load(dst + e, mask=em, other=0)
        m3 = em[:, None, None] & hcm[None, :, :]
        xs = tl.load(xl + s[:, None, None] * W + hc[None, :, :], mask=m3, other=0.0).to(ACC)
        xd = tl.load(xr + d[:, None, None] * W + hc[None, :, :], mask=m3, other=0.0).to(ACC)
        logit = tl.sum(_lrelu(xs + xd, slope) * a_h[None, :, :], axis=2)  # [BLOCK_E, BLOCK_H]
        m2 = em[:, None] & hm[None, :]
        logit = tl.where(m2, logit, float("-inf"))
        tl.store(logits + e[:, None] * H + h[None, :], logit, mask=m2)
        new_max = tl.maximum(run_max, tl.max(logit, axis=0))
        scale = tl.exp(run_max - new_max)
        p = tl.where(m2, tl.exp(logit - new_max[None, :]), 0.0)
        run_sum = run_sum * scale + tl.sum(p, axis=0)
        acc = acc * scale[:, None] + tl.sum(p[:, :, None] * xs, axis=0)
        run_max = new_max
    denom = run_sum + 1e-16
    tl.store(out + i * W + hc, (acc / denom[:, None]).to(out.dtype.element_ty), mask=hcm)
    tl.debug_barrier()  # the logits stored above are read back by other lanes
    for t in range(e0, e1, BLOCK_E):
        e = t + offs
        m2 = (e < e1)[:, None] & hm[None, :]
        off = e[:, None] * H + h[None, :]
        logit = tl.load(logits + off, mask=m2, other=0.0)
        tl.store(alpha + off, (tl.exp(logit - run_max[None, :]) / denom[None, :]).to(alpha.dtype.element_ty),
                 mask=m2)


@triton.jit
def _row_grad_kernel(g, xl, alpha, src, crow, gl, H, C,
                     ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    # gl_e = alpha_e (ga_e - sum_{e' in row} alpha_e' ga_e'), ga_e = <g_row, x_l[src_e]>
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    W = H * C
    hc = h[:, None] * C + c[None, :]
    hcm = (h < H)[:, None] & (c < C)[None, :]
    hm = h < H
    g_i = tl.load(g + i * W + hc, mask=hcm, other=0.0).to(ACC)
    e0 = tl.load(crow + i)
    e1 = tl.load(crow + i + 1)
    offs = tl.arange(0, BLOCK_E)
    dot = tl.zeros([BLOCK_H], ACC)
    for t in range(e0, e1, BLOCK_E):
        e = t + offs
        em = e < e1
        s = tl.load(src + e, mask=em, other=0)
        xs = tl.load(xl + s[:, None, None] * W + hc[None, :, :], mask=em[:, None, None] & hcm[None, :, :],
                     other=0.0).to(ACC)
        ga = tl.sum(xs * g_i[None, :, :], axis=2)  # [BLOCK_E, BLOCK_H]
        m2 = em[:, None] & hm[None, :]
        off = e[:, None] * H + h[None, :]
        a = tl.load(alpha + off, mask=m2, other=0.0).to(ACC)
        dot += tl.sum(a * ga, axis=0)
        tl.store(gl + off, ga, mask=m2)
    tl.debug_barrier()  # ga stored above is read back by other lanes
    for t in range(e0, e1, BLOCK_E):
        e = t + offs
        m2 = (e < e1)[:, None] & hm[None, :]
        off = e[:, None] * H + h[None, :]
        ga = tl.load(gl + off, mask=m2, other=0.0)
        a = tl.load(alpha + off, mask=m2, other=0.0).to(ACC)
        tl.store(gl + off, a * (ga - dot[None, :]), mask=m2)


@triton.jit
def _source_grad_kernel(g, xl, xr, att, alpha, gl, dst, row_of, by_src, src_ptr, slope_ptr,
                        grad_xl, att_partial, Ns, H, C,
                        ACC: tl.constexpr, SRC_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    # grad_x_l[s] = sum_{e: src_e = s} alpha_e g_{row_e} + gl_e att * lrelu'(pre_e);
    # att_partial[blk] = sum over the block's edges of gl_e lrelu(pre_e)
    blk = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    W = H * C
    hc = h[:, None] * C + c[None, :]
    hcm = (h < H)[:, None] & (c < C)[None, :]
    hm = h < H
    slope = tl.load(slope_ptr).to(ACC)
    a_h = tl.load(att + hc, mask=hcm, other=0.0).to(ACC)
    offs = tl.arange(0, BLOCK_E)
    part = tl.zeros([BLOCK_H, BLOCK_C], ACC)
    s0 = blk * SRC_BLOCK
    s1 = tl.minimum(s0 + SRC_BLOCK, Ns)
    for s in range(s0, s1):
        xs = tl.load(xl + s * W + hc, mask=hcm, other=0.0).to(ACC)
        j0 = tl.load(src_ptr + s)
        j1 = tl.load(src_ptr + s + 1)
        acc = tl.zeros([BLOCK_H, BLOCK_C], ACC)
        for t in range(j0, j1, BLOCK_E):
            j = t + offs
            jm = j < j1
            e = tl.load(by_src + j, mask=jm, other=0)
            d = tl.load(dst + e, mask=jm, other=0)
            r = tl.load(row_of + e, mask=jm, other=0)
            m2 = jm[:, None] & hm[None, :]
            m3 = jm[:, None, None] & hcm[None, :, :]
            a = tl.load(alpha + e[:, None] * H + h[None, :], mask=m2, other=0.0).to(ACC)
            gle = tl.load(gl + e[:, None] * H + h[None, :], mask=m2, other=0.0)
            gr = tl.load(g + r[:, None, None] * W + hc[None, :, :], mask=m3, other=0.0).to(ACC)
            xd = tl.load(xr + d[:, None, None] * W + hc[None, :, :], mask=m3, other=0.0).to(ACC)
            pre = xs[None, :, :] + xd
            grad_pre = tl.where(pre > 0, 1.0, slope)
            acc += tl.sum(a[:, :, None] * gr + gle[:, :, None] * a_h[None, :, :] * grad_pre, axis=0)
            part += tl.sum(tl.where(m3, gle[:, :, None] * _lrelu(pre, slope), 0.0), axis=0)
        tl.store(grad_xl + s * W + hc, acc.to(grad_xl.dtype.element_ty), mask=hcm)
    tl.store(att_partial + blk * W + hc, part, mask=hcm)


@triton.jit
def _destination_grad_kernel(xl, xr, att, gl, src, by_dst, dst_ptr, slope_ptr, grad_xr, H, C,
                             ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    # grad_x_r[d] = sum_{e: dst_e = d} gl_e att * lrelu'(x_l[src_e] + x_r[d])
    d = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    W = H * C
    hc = h[:, None] * C + c[None, :]
    hcm = (h < H)[:, None] & (c < C)[None, :]
    hm = h < H
    slope = tl.load(slope_ptr).to(ACC)
    a_h = tl.load(att + hc, mask=hcm, other=0.0).to(ACC)
    xd = tl.load(xr + d * W + hc, mask=hcm, other=0.0).to(ACC)
    j0 = tl.load(dst_ptr + d)
    j1 = tl.load(dst_ptr + d + 1)
    offs = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_H, BLOCK_C], ACC)
    for t in range(j0, j1, BLOCK_E):
        j = t + offs
        jm = j < j1
        e = tl.load(by_dst + j, mask=jm, other=0)
        s = tl.load(src + e, mask=jm, other=0)
        gle = tl.load(gl + e[:, None] * H + h[None, :], mask=jm[:, None] & hm[None, :], other=0.0)
        xs = tl.load(xl + s[:, None, None] * W + hc[None, :, :], mask=jm[:, None, None] & hcm[None, :, :],
                     other=0.0).to(ACC)
        grad_pre = tl.where(xs + xd[None, :, :] > 0, 1.0, slope)
        acc += tl.sum(gle[:, :, None] * a_h[None, :, :] * grad_pre, axis=0)
    tl.store(grad_xr + d * W + hc, acc.to(grad_xr.dtype.element_ty), mask=hcm)


@triton.jit
def _sum_blocks_kernel(partial, out, num_blocks, W, BLOCK: tl.constexpr):
    # out[w] = sum_{blk in order} partial[blk, w]
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wm = w < W
    acc = tl.zeros([BLOCK], partial.dtype.element_ty)
    for blk in range(0, num_blocks):
        acc += tl.load(partial + blk * W + w, mask=wm, other=0.0)
    tl.store(out + w, acc.to(out.dtype.element_ty), mask=wm)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> tuple:
    """(Triton, torch) accumulator dtype of ``dtype`` inputs."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _blocks(H: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_E, BLOCK_H, BLOCK_C): every channel of a head in one tile, up to ``_MAX_BLOCK_H``
    heads per program, as many edges as fit ``_MAX_TILE`` elements."""
    block_c = triton.next_power_of_2(max(C, 1))
    block_h = min(triton.next_power_of_2(max(H, 1)), _MAX_BLOCK_H)
    block_e = max(1, min(_MAX_BLOCK_E, _MAX_TILE // (block_h * block_c)))
    return block_e, block_h, block_c


def _check_args(op: str, x_l, x_r, att, src, dst, crow) -> None:
    """The compiled op's checks as Python exceptions (edge values on CPU tensors only)."""
    for name, t in (("x_l", x_l), ("x_r", x_r), ("att", att)):
        if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: `{name}` must be a float16, bfloat16, float32 or float64 tensor, "
                            f"got {getattr(t, 'dtype', type(t).__name__)}")
    if x_l.dim() != 3 or x_r.dim() != 3 or x_l.shape[1:] != x_r.shape[1:]:
        raise ValueError(f"{op}: `x_l` [N_src, H, C] and `x_r` [N_dst, H, C] must agree in H, C; got "
                         f"{tuple(x_l.shape)} and {tuple(x_r.shape)}")
    if tuple(att.shape) != tuple(x_l.shape[1:]):
        raise ValueError(f"{op}: `att` must be [H, C] = {list(x_l.shape[1:])}, got {tuple(att.shape)}")
    if x_r.dtype != x_l.dtype or att.dtype != x_l.dtype:
        raise TypeError(f"{op}: `x_l`, `x_r` and `att` must share one dtype, got {x_l.dtype}, {x_r.dtype} "
                        f"and {att.dtype}")
    device = x_l.device
    for name, t in (("x_r", x_r), ("att", att)):
        if t.device != device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `x_l` is on {device}")
    for name, t in (("src", src), ("dst", dst), ("crow", crow)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"{op}: `{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `x_l` is on {device}")
    if src.numel() != dst.numel():
        raise ValueError(f"{op}: `src` and `dst` must have the same length")
    if crow.numel() < 1:
        raise ValueError(f"{op}: `crow` must have length num_rows + 1 >= 1")
    if device.type == "cuda":
        return  # trusted on the GPU: no host syncs
    E = src.numel()
    if int(crow[0]) != 0 or int(crow[-1]) != E:
        raise ValueError(f"{op}: `crow` must start at 0 and end at E = {E}")
    if crow.numel() > 1 and bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"{op}: `crow` must be non-decreasing")
    for name, t, bound in (("src", src, x_l.shape[0]), ("dst", dst, x_r.shape[0])):
        if E and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"{op}: `{name}` has ids outside [0, {bound})")


def _slope(negative_slope: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((1,), float(negative_slope), dtype=_acc_dtype(dtype)[1], device=device)


@torch.library.custom_op("stoichconv::triton_gatv2_forward", mutates_args=())
def triton_gatv2_forward(x_l: Tensor, x_r: Tensor, att: Tensor, src: Tensor, dst: Tensor, crow: Tensor,
                         negative_slope: float) -> tuple[Tensor, Tensor]:
    """Triton GATv2 forward: ``(out [num_rows, H, C], alpha [E, H])``."""
    _check_args("triton_gatv2_forward", x_l, x_r, att, src, dst, crow)
    x_l, x_r, att = x_l.contiguous(), x_r.contiguous(), att.contiguous()
    src, dst, crow = src.contiguous(), dst.contiguous(), crow.contiguous()
    R, E = crow.numel() - 1, src.numel()
    _, H, C = x_l.shape
    out = x_l.new_empty(R, H, C)
    alpha = x_l.new_empty(E, H)
    if R * H == 0:
        return out, alpha  # E = 0 (crow ends at E) or nothing to write
    acc, acc_torch = _acc_dtype(x_l.dtype)
    # the logits between the kernel's two passes, unrounded: alpha itself when it is in ACC
    logits = alpha if alpha.dtype == acc_torch else torch.empty(E, H, dtype=acc_torch, device=x_l.device)
    block_e, block_h, block_c = _blocks(H, C)
    with _device_guard(x_l.device):
        _forward_kernel[(R, triton.cdiv(H, block_h))](
            x_l, x_r, att, src, dst, crow, _slope(negative_slope, x_l.dtype, x_l.device), out, alpha, logits, H, C,
            ACC=acc, BLOCK_E=block_e, BLOCK_H=block_h, BLOCK_C=block_c,
        )
    return out, alpha


def _group(key: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """Stable counting sort of the edges by ``key``: (edge ids in key order, ptr [num_keys + 1])."""
    order = torch.argsort(key, stable=True)
    boundaries = torch.arange(num_keys + 1, dtype=key.dtype, device=key.device)
    return order, torch.searchsorted(key[order], boundaries)


@torch.library.custom_op("stoichconv::triton_gatv2_backward", mutates_args=())
def triton_gatv2_backward(grad_out: Tensor, x_l: Tensor, x_r: Tensor, att: Tensor, alpha: Tensor, src: Tensor,
                          dst: Tensor, crow: Tensor, negative_slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """Triton GATv2 backward: ``(grad_x_l, grad_x_r, grad_att)`` from the saved ``alpha``."""
    op = "triton_gatv2_backward"
    _check_args(op, x_l, x_r, att, src, dst, crow)
    R, E = crow.numel() - 1, src.numel()
    Ns, Nd = x_l.shape[0], x_r.shape[0]
    _, H, C = x_l.shape
    for name, t, shape in (("grad_out", grad_out, (R, H, C)), ("alpha", alpha, (E, H))):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != x_l.dtype or t.device != x_l.device:
            raise ValueError(f"{op}: `{name}` must be a tensor {list(shape)} of the dtype and device of `x_l`")
    if E == 0 or H * C == 0:  # no edge: every gradient is 0
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (x_l, x_r, att))
    # every row of grad_x_l / grad_x_r / grad_att is written by one program below
    grad_x_l = torch.empty_like(x_l, memory_format=torch.contiguous_format)
    grad_x_r = torch.empty_like(x_r, memory_format=torch.contiguous_format)
    grad_att = torch.empty_like(att, memory_format=torch.contiguous_format)
    g, x_l, x_r, att, alpha = (t.contiguous() for t in (grad_out, x_l, x_r, att, alpha))
    src, dst, crow = src.contiguous(), dst.contiguous(), crow.contiguous()
    acc, acc_torch = _acc_dtype(x_l.dtype)
    block_e, block_h, block_c = _blocks(H, C)
    head_blocks = triton.cdiv(H, block_h)
    blocks = dict(ACC=acc, BLOCK_E=block_e, BLOCK_H=block_h, BLOCK_C=block_c)
    slope = _slope(negative_slope, x_l.dtype, x_l.device)
    row_of = torch.repeat_interleave(torch.arange(R, device=crow.device), crow.diff(), output_size=E)
    by_src, src_ptr = _group(src, Ns)
    by_dst, dst_ptr = _group(dst, Nd)
    gl = torch.empty(E, H, dtype=acc_torch, device=x_l.device)
    num_blocks = triton.cdiv(Ns, _SRC_BLOCK)
    att_partial = torch.empty(num_blocks, H * C, dtype=acc_torch, device=x_l.device)
    with _device_guard(x_l.device):
        _row_grad_kernel[(R, head_blocks)](g, x_l, alpha, src, crow, gl, H, C, **blocks)
        _source_grad_kernel[(num_blocks, head_blocks)](
            g, x_l, x_r, att, alpha, gl, dst, row_of, by_src, src_ptr, slope, grad_x_l, att_partial, Ns, H, C,
            SRC_BLOCK=_SRC_BLOCK, **blocks,
        )
        _destination_grad_kernel[(Nd, head_blocks)](
            x_l, x_r, att, gl, src, by_dst, dst_ptr, slope, grad_x_r, H, C, **blocks,
        )
        W = H * C
        block = min(triton.next_power_of_2(W), 1024)
        _sum_blocks_kernel[(triton.cdiv(W, block),)](att_partial, grad_att, num_blocks, W, BLOCK=block)
    return grad_x_l, grad_x_r, grad_att


triton_gatv2_forward.register_fake(_forward_fake)
triton_gatv2_backward.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    x_l, x_r, att, src, dst, crow, negative_slope = inputs
    _out, alpha = output
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(alpha)
    ctx.save_for_backward(x_l, x_r, att, alpha, src, dst, crow)


def _backward(ctx, grad_out, _grad_alpha):
    x_l, x_r, att, alpha, src, dst, crow = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None
    grad_x_l, grad_x_r, grad_att = torch.ops.stoichconv.triton_gatv2_backward(
        grad_out, x_l, x_r, att, alpha, src, dst, crow, ctx.negative_slope)
    need = ctx.needs_input_grad
    return (grad_x_l if need[0] else None, grad_x_r if need[1] else None, grad_att if need[2] else None,
            None, None, None, None)


triton_gatv2_forward.register_autograd(_backward, setup_context=_setup_context)
