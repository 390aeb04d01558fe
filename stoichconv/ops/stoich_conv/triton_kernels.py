"""Triton kernels of the signed stoichiometric propagation.

The semantics (degree norms, the two stages, the hand-written backward) are
stated once, in :mod:`stoichconv.ops.stoich_conv`; this module computes exactly
that, mirroring the C++ CPU kernel ``csrc/cpu/stoich_conv.cpp``:

* ``_segment_reduce_kernel``: the one segment reduction behind both forward
  stages and both backward reductions,
  ``dst[b, r, h, :] = init[b, r, h, :] + row_norm(b, r) * sum_{j in CSR row r}
  coef(b, k_j, h) * src[b, other(k_j), h, :]`` with
  ``coef = w[b, k, h] * kept(b, k) * (coef_norm[b', idx(k)] or 1)``.
  Masked incidences are skipped, not multiplied by 0 (their ``w`` and ``src`` rows are
  not loaded), and a row whose degree norm is 0 writes exactly 0 (a select, not
  ``acc * 0``), so an inf/NaN in a masked or zero-degree row never becomes NaN: the
  CPU and CUDA kernels' and the reference's behaviour.
  In the forward the row's degree norm (``edge_norm`` in stage 1 over the
  reaction CSR, ``node_norm`` in stage 2 over the metabolite CSR: ``1 / sum``
  of ``|s_k|`` over the row's kept incidences, 0 for an empty or fully masked
  row) is summed in the same loop over the row and written out, so the
  forward is exactly two launches.
  One program per (sample x CSR row, channel block); the tile runs over the
  row's flattened H x C channels, ``BLOCK_HC = next_power_of_2(H * C)``
  (capped at 128; wider rows use more programs along grid axis 1). The row's
  incidences are read through the CSR pointers in tiles of ``BLOCK_K`` and a
  loop runs over the tiles, so a long row (a currency metabolite such as H2O
  or ATP with hundreds of incidences) is one program that loops, never a
  launch-size problem. Each output row is written by exactly one program with
  a fixed summation order: no atomics, bit-identical results run to run.
* ``_weight_grad_kernel``: ``dL/dw[b, k, h] = D_v <G_v, hidden_e> + B_e <R_e, y_v>``
  (0 for masked incidences), one program per (incidence tile, sample, head),
  looping over channel tiles; for a weight [1, nnz, H] shared by the batch, one
  program per (incidence tile, head) that loops over the samples in order and
  stores the batch sum once.
* A shared weight [1, nnz, H] is read with a sample stride of 0 (never expanded).

Dtypes (the policy: the "Dtypes" section of :mod:`stoichconv.ops.stoich_conv`):
float16, bfloat16, float32 and float64. The kernels take the accumulate dtype as
the constexpr ``ACC`` (float64 for float64 inputs, else float32): every loaded
value is converted to it, the running sums and dot products are ``ACC`` tiles
(so the float64 tests compare to ~1e-12 and float16 / bfloat16 sums keep
float32 precision), and the result is rounded to the output's dtype on store.
``abs_stoich`` and the norms are ``ACC`` tensors; ``hidden`` and the backward's
``R`` are stored in the input dtype.

On a GPU the same kernels run unchanged: rows map to CTAs, the channel tile to
the lanes of the CTA, and the incidence tile gathers ``BLOCK_K`` rows of ``y``
at once. Under ``TRITON_INTERPRET=1`` (set before this module is imported) they
run on CPU tensors through numpy, which is how the CPU-only test suite runs
them, in every dtype. One difference of the interpreter (Triton 3.7): it
converts float32 to bfloat16 by truncating the mantissa (round toward zero:
``1 + 2**-8 + 2**-9`` is stored as ``1.0``, where a GPU and torch round to
nearest even and give ``1 + 2**-7``), so interpreted bfloat16 results carry up
to one bfloat16 ulp per stored value instead of half of one; float16 is
rounded to nearest even (numpy).

Ops (``torch.library.custom_op``; fake kernels and the autograd formula are the
shared ones of :mod:`stoichconv.ops.stoich_conv.registration`):

* ``stoichconv::triton_stoich_conv_forward`` -- same schema as the compiled
  ``stoich_conv_forward``: ``(out, hidden, node_norm, edge_norm)``, ``hidden``
  an empty tensor [0] with ``save_hidden=False``.
* ``stoichconv::triton_stoich_conv_backward`` -- same schema as the compiled
  ``stoich_conv_backward``: ``(grad_y, grad_weight)``, an empty tensor for a
  gradient not asked for; an empty ``hidden`` is recomputed (stage 1 again).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from stoichconv.ops._dtypes import accumulate_dtype
from stoichconv.ops.stoich_conv import registration
from stoichconv.ops.stoich_conv.validation import check_structure_args, check_structure_values

__all__ = ["triton_stoich_conv_forward", "triton_stoich_conv_backward"]

_BLOCK_K = 16  # incidences gathered per loop iteration
_MAX_BLOCK_C = 128  # channel tile cap (H*C in the segment reductions, C in the weight grad)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _segment_reduce_kernel(
    src, dst, init,
    row_ptr, perm, other_index,
    w, keep, reaction_index,
    coef_norm, coef_norm_index, abs_stoich, row_norm,
    rows, src_rows, nnz, M, coef_norm_len, H, C, w_stride,
    HAS_INIT: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_COEF_NORM: tl.constexpr,
    ROW_NORM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HC: tl.constexpr, ACC: tl.constexpr,
):
    # dst[b, r, h, c] = init[b, r, h, c] + row_norm[b', r] *
    #     sum_{j in CSR row r} w[b, k, h] kept(b, k) coef_norm[b', idx(k)] src[b, other(k), h, c]
    # with k = perm[j], b' = b with a keep-mask (per-sample norms) else 0; w[b] starts at
    # b * w_stride (w_stride = 0: one weight [1, nnz, H] shared by every sample).
    # The tile runs over the flattened (h, c) row of H * C channels.
    # ROW_NORM: the row's degree norm 1 / sum_{j in row, kept} |s_k| (0 for an
    # empty sum) is computed in the same loop over the row and also written to
    # row_norm[b', r] (by the first channel block of sample b', once).
    # ACC: the accumulate dtype (that of abs_stoich, coef_norm and row_norm); src, w and init
    # are converted to it on load, the sum is rounded to dst's dtype on store.
    pid = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    b = pid // rows
    r = pid % rows
    if HAS_KEEP:
        nb = b
    else:
        nb = b * 0
    HC = H * C
    hc = tb * BLOCK_HC + tl.arange(0, BLOCK_HC)
    hcmask = hc < HC
    h = hc // C
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_HC], dtype=ACC)
    deg = tl.zeros([BLOCK_K], dtype=ACC)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + offs
        m = j < end
        k = tl.load(perm + j, mask=m, other=0)
        other = tl.load(other_index + k, mask=m, other=0)
        # Masked incidences (and, with a coefficient norm, those whose norm is 0) are skipped,
        # never multiplied by 0: their rows are not even loaded, so an inf/NaN there cannot
        # leak into the sum (as in the CPU and CUDA kernels).
        on = m
        if HAS_KEEP:
            e = tl.load(reaction_index + k, mask=m, other=0)
            on = on & (tl.load(keep + b * M + e, mask=m, other=0) != 0)
        if ROW_NORM:
            deg += tl.load(abs_stoich + k, mask=on, other=0.0)
        if HAS_COEF_NORM:
            ci = tl.load(coef_norm_index + k, mask=on, other=0)
            cn = tl.load(coef_norm + nb * coef_norm_len + ci, mask=on, other=0.0)
            on = on & (cn != 0)
        m2 = on[:, None] & hcmask[None, :]
        coef = tl.load(w + b * w_stride + k[:, None] * H + h[None, :], mask=m2, other=0.0).to(ACC)
        if HAS_COEF_NORM:
            coef = coef * cn[:, None]
        vals = tl.load(src + (b * src_rows + other)[:, None] * HC + hc[None, :], mask=m2, other=0.0).to(ACC)
        acc += tl.sum(coef * vals, axis=0)
    if ROW_NORM:
        total = tl.sum(deg, axis=0)
        norm = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        acc = tl.where(total > 0, acc * norm, 0.0)  # a zero-degree row is skipped: exactly 0
        tl.store(row_norm + nb * rows + r, norm, mask=(tb == 0) & (nb == b))
    out_off = (b * rows + r) * HC + hc
    if HAS_INIT:
        acc += tl.load(init + out_off, mask=hcmask, other=0.0).to(ACC)
    tl.store(dst + out_off, acc.to(dst.dtype.element_ty), mask=hcmask)


@triton.jit
def _weight_grad_kernel(
    grad_out, hidden, reaction_grad, y,
    metabolite_index, reaction_index, keep, node_norm, edge_norm, grad_weight,
    nnz, N, M, H, C, B,
    HAS_KEEP: tl.constexpr, SHARED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    # gw[b, k, h] = kept(b, k) * (D[b', v] <G[b, v, h], hidden[b, e, h]> + B[b', e] <R[b, e, h], y[b, v, h]>)
    # summed in ACC (the dtype of the norms), rounded to grad_weight's dtype on store.
    # SHARED (a weight [1, nnz, H] shared by the batch): one program per (incidence tile, head)
    # sums gw[b, k, h] over the samples b = 0 .. B-1 in that order, in ACC, and stores
    # grad_weight[0, k, h] once (no atomics).
    kb = tl.program_id(0).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    if SHARED:
        b_first = kb * 0
        b_count = B
    else:
        b_first = tl.program_id(1).to(tl.int64)
        b_count = 1
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    m = k < nnz
    v = tl.load(metabolite_index + k, mask=m, other=0)
    e = tl.load(reaction_index + k, mask=m, other=0)
    total = tl.zeros([BLOCK_K], dtype=ACC)
    for i in range(0, b_count):
        b = b_first + i
        if HAS_KEEP:
            nb = b
        else:
            nb = b * 0
        v_row = ((b * N + v) * H + h) * C
        e_row = ((b * M + e) * H + h) * C
        ld = m  # the incidences whose rows are read (a masked one's are not)
        if HAS_KEEP:
            kept = tl.load(keep + b * M + e, mask=m, other=0)
            ld = ld & (kept != 0)
        dot_gh = tl.zeros([BLOCK_K], dtype=ACC)
        dot_ry = tl.zeros([BLOCK_K], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m2 = ld[:, None] & (c < C)[None, :]
            g = tl.load(grad_out + v_row[:, None] + c[None, :], mask=m2, other=0.0).to(ACC)
            hd = tl.load(hidden + e_row[:, None] + c[None, :], mask=m2, other=0.0).to(ACC)
            rg = tl.load(reaction_grad + e_row[:, None] + c[None, :], mask=m2, other=0.0).to(ACC)
            yy = tl.load(y + v_row[:, None] + c[None, :], mask=m2, other=0.0).to(ACC)
            dot_gh += tl.sum(g * hd, axis=1)
            dot_ry += tl.sum(rg * yy, axis=1)
        dn = tl.load(node_norm + nb * N + v, mask=ld, other=0.0)
        en = tl.load(edge_norm + nb * M + e, mask=ld, other=0.0)
        # skip (select, never multiply by 0) the terms of zero-degree rows and masked incidences
        gw = tl.where(dn != 0, dn * dot_gh, 0.0) + tl.where(en != 0, en * dot_ry, 0.0)
        if HAS_KEEP:
            gw = tl.where(kept != 0, gw, 0.0)
        total += gw
    tl.store(grad_weight + (b_first * nnz + k) * H + h, total.to(grad_weight.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _check_args(y, weight, reaction_keep, mi, ri, rptr, rperm, mptr, mperm) -> tuple[int, int]:
    """The structural checks (as Python exceptions naming the argument); returns (nnz, M)."""
    nnz, M = check_structure_args(y, weight, reaction_keep, mi, ri, rptr, rperm, mptr, mperm)
    if y.device.type != "cuda":
        # The interpreter has no bounds protection: check the plan's values
        # (cheap on CPU). On a GPU the plan from build_stoich_plan is trusted,
        # which keeps the launch free of host syncs.
        check_structure_values(mi, ri, rptr, rperm, mptr, mperm, y.shape[1], M, nnz)
    return nnz, M


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tl_accumulate(dtype: torch.dtype):
    """The Triton dtype of :func:`~stoichconv.ops._dtypes.accumulate_dtype` of ``dtype``."""
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


def _block_c(C: int) -> int:
    return min(triton.next_power_of_2(max(C, 1)), _MAX_BLOCK_C)


def _keep_bytes(reaction_keep: Optional[Tensor]) -> Optional[Tensor]:
    return None if reaction_keep is None else reaction_keep.contiguous().view(torch.uint8)


def _degree_norm_torch(ptr, perm, abs_stoich, ri, keep, Bn, rows) -> Tensor:
    """Degree norms [Bn, rows] in torch, only for the degenerate launches
    (B = 0 or H * C = 0) where no kernel program runs."""
    row_of = torch.repeat_interleave(torch.arange(rows, device=ptr.device), ptr.diff())
    nnz = perm.numel()
    a = abs_stoich.index_select(0, perm).view(1, nnz).expand(Bn, nnz)
    if keep is not None:
        a = a * keep.bool().index_select(1, ri.index_select(0, perm))
    total = torch.zeros(Bn, rows, dtype=abs_stoich.dtype, device=ptr.device).index_add_(1, row_of, a)
    return torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def _segment_reduce(src, dst, ptr, perm, other_index, w, keep, ri, M,
                    init=None, coef_norm=None, coef_norm_index=None, abs_stoich=None, row_norm=None) -> None:
    """One launch of ``_segment_reduce_kernel``; with ``abs_stoich`` the row
    degree norms are computed in the same pass and written to ``row_norm``."""
    B, rows, H, C = dst.shape
    src_rows = src.shape[1]
    nnz = w.shape[1]
    if B * rows == 0 or H == 0 or C == 0:
        return
    dummy = dst
    block_hc = _block_c(H * C)
    grid = (B * rows, triton.cdiv(H * C, block_hc))
    _segment_reduce_kernel[grid](
        src, dst, init if init is not None else dummy,
        ptr, perm, other_index,
        w, keep if keep is not None else ptr, ri,
        coef_norm if coef_norm is not None else dummy,
        coef_norm_index if coef_norm_index is not None else ptr,
        abs_stoich if abs_stoich is not None else dummy,
        row_norm if row_norm is not None else dummy,
        rows, src_rows, nnz, M, coef_norm.shape[1] if coef_norm is not None else 0, H, C,
        0 if w.shape[0] == 1 else nnz * H,
        HAS_INIT=init is not None, HAS_KEEP=keep is not None, HAS_COEF_NORM=coef_norm is not None,
        ROW_NORM=abs_stoich is not None, BLOCK_K=_BLOCK_K, BLOCK_HC=block_hc, ACC=_tl_accumulate(dst.dtype),
    )


def _backward_launches(G, grad_hidden, y, weight, keep, hidden, node_norm, edge_norm, mi, ri, rptr, rperm,
                       mptr, mperm, grad_y, grad_weight) -> None:
    B, N, H, C = y.shape
    M, nnz = rptr.numel() - 1, mi.numel()
    # R[b, e] = grad_hidden[b, e] + kept(b, e) sum_{k in e} w_k D_{v_k} G[b, v_k]
    R = y.new_empty(B, M, H, C)
    _segment_reduce(G, R, rptr, rperm, mi, weight, keep, ri, M, init=grad_hidden,
                    coef_norm=node_norm, coef_norm_index=mi)
    if grad_y is not None:
        # dL/dy[b, u] = sum_{k: v_k = u, kept} w_k B_{e_k} R[b, e_k]
        _segment_reduce(R, grad_y, mptr, mperm, ri, weight, keep, ri, M,
                        coef_norm=edge_norm, coef_norm_index=ri)
    shared = weight.shape[0] == 1 and B != 1  # grad_weight [1, nnz, H]: the sum over the batch
    if grad_weight is not None and grad_weight.numel() > 0:
        if C == 0 or B == 0:
            grad_weight.zero_()
        else:
            grid = (triton.cdiv(nnz, _BLOCK_K), 1 if shared else B, H)
            _weight_grad_kernel[grid](
                G, hidden, R, y, mi, ri, keep if keep is not None else rptr, node_norm, edge_norm,
                grad_weight, nnz, N, M, H, C, B,
                HAS_KEEP=keep is not None, SHARED=shared, BLOCK_K=_BLOCK_K, BLOCK_C=_block_c(C),
                ACC=_tl_accumulate(y.dtype),
            )


@torch.library.custom_op("stoichconv::triton_stoich_conv_forward", mutates_args=())
def triton_stoich_conv_forward(
    y: Tensor,
    weight: Tensor,
    reaction_keep: Optional[Tensor],
    metabolite_index: Tensor,
    reaction_index: Tensor,
    abs_stoich: Tensor,
    reaction_ptr: Tensor,
    reaction_perm: Tensor,
    metabolite_ptr: Tensor,
    metabolite_perm: Tensor,
    save_hidden: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward of the stoich propagation: ``(out, hidden, node_norm, edge_norm)``;
    ``hidden`` is an empty tensor [0] with ``save_hidden=False``."""
    nnz, M = _check_args(y, weight, reaction_keep, metabolite_index, reaction_index, reaction_ptr,
                         reaction_perm, metabolite_ptr, metabolite_perm)
    acc = accumulate_dtype(y.dtype)
    if not isinstance(abs_stoich, Tensor) or tuple(abs_stoich.shape) != (nnz,) or abs_stoich.dtype != acc:
        raise ValueError(f"`abs_stoich` must be 1-D of length nnz = {nnz} in the accumulate dtype of `y` "
                         f"({acc} for {y.dtype})")
    if abs_stoich.device != y.device:
        raise ValueError(f"`abs_stoich` is on {abs_stoich.device} but `y` is on {y.device}")
    y = y.contiguous()
    weight = weight.contiguous()
    abs_stoich = abs_stoich.contiguous()
    mi, ri = metabolite_index.contiguous(), reaction_index.contiguous()
    rptr, rperm = reaction_ptr.contiguous(), reaction_perm.contiguous()
    mptr, mperm = metabolite_ptr.contiguous(), metabolite_perm.contiguous()
    keep = _keep_bytes(reaction_keep)
    B, N, H, C = y.shape
    Bn = B if keep is not None else 1

    out = torch.empty_like(y)
    hidden = y.new_empty(B, M, H, C)
    node_norm = y.new_empty(Bn, N, dtype=acc)
    edge_norm = y.new_empty(Bn, M, dtype=acc)
    if B == 0 or H * C == 0:  # no program would write the norms
        edge_norm.copy_(_degree_norm_torch(rptr, rperm, abs_stoich, ri, keep, Bn, M))
        node_norm.copy_(_degree_norm_torch(mptr, mperm, abs_stoich, ri, keep, Bn, N))
    # Stage 1, metabolite -> reaction: hidden[b, e] = B_e sum_k w_k y[b, v_k]  (+ edge_norm)
    with _device_guard(y.device):
        _segment_reduce(y, hidden, rptr, rperm, mi, weight, keep, ri, M, abs_stoich=abs_stoich, row_norm=edge_norm)
        # Stage 2, reaction -> metabolite: out[b, v] = D_v sum_k w_k hidden[b, e_k]  (+ node_norm)
        _segment_reduce(hidden, out, mptr, mperm, ri, weight, keep, ri, M, abs_stoich=abs_stoich,
                        row_norm=node_norm)
    return out, hidden if save_hidden else y.new_empty(0), node_norm, edge_norm


@torch.library.custom_op("stoichconv::triton_stoich_conv_backward", mutates_args=())
def triton_stoich_conv_backward(
    grad_out: Tensor,
    grad_hidden: Optional[Tensor],
    y: Tensor,
    weight: Tensor,
    reaction_keep: Optional[Tensor],
    hidden: Tensor,
    node_norm: Tensor,
    edge_norm: Tensor,
    metabolite_index: Tensor,
    reaction_index: Tensor,
    reaction_ptr: Tensor,
    reaction_perm: Tensor,
    metabolite_ptr: Tensor,
    metabolite_perm: Tensor,
    need_grad_y: bool,
    need_grad_weight: bool,
) -> tuple[Tensor, Tensor]:
    """Triton backward of the stoich propagation: ``(grad_y, grad_weight)``."""
    nnz, M = _check_args(y, weight, reaction_keep, metabolite_index, reaction_index, reaction_ptr,
                         reaction_perm, metabolite_ptr, metabolite_perm)
    B, N, H, C = y.shape
    Bn = B if reaction_keep is not None else 1
    saved = not (isinstance(hidden, Tensor) and tuple(hidden.shape) == (0,))  # else: recompute
    if not saved and grad_hidden is not None:
        raise ValueError("`grad_hidden` given but `hidden` was not saved")
    acc = accumulate_dtype(y.dtype)
    for name, t, shape, dtype in (
        ("grad_out", grad_out, (B, N, H, C), y.dtype), ("hidden", hidden if saved else None, (B, M, H, C), y.dtype),
        ("node_norm", node_norm, (Bn, N), acc), ("edge_norm", edge_norm, (Bn, M), acc),
        ("grad_hidden", grad_hidden, (B, M, H, C), y.dtype),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"`{name}` must have shape {list(shape)}, got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != dtype:
            raise TypeError(f"`{name}` has dtype {t.dtype} but must be {dtype} for `y` of {y.dtype}")
        if t.device != y.device:
            raise ValueError(f"`{name}` is on {t.device} but `y` is on {y.device}")
    grad_y = y.new_empty(y.shape) if need_grad_y else y.new_empty(0)  # contiguous, whatever y's strides
    grad_weight = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
    if not (need_grad_y or need_grad_weight):
        return grad_y, grad_weight
    y, weight, G = y.contiguous(), weight.contiguous(), grad_out.contiguous()
    hidden, node_norm, edge_norm = hidden.contiguous(), node_norm.contiguous(), edge_norm.contiguous()
    grad_hidden = grad_hidden.contiguous() if grad_hidden is not None else None
    mi, ri = metabolite_index.contiguous(), reaction_index.contiguous()
    rptr, rperm = reaction_ptr.contiguous(), reaction_perm.contiguous()
    mptr, mperm = metabolite_ptr.contiguous(), metabolite_perm.contiguous()
    keep = _keep_bytes(reaction_keep)

    with _device_guard(y.device):
        if not saved and need_grad_weight:
            # Stage 1 again, hidden[b, e] = B_e sum_k w_k y[b, v_k], with the
            # saved edge norms folded into the coefficients.
            hidden = y.new_empty(B, M, H, C)
            _segment_reduce(y, hidden, rptr, rperm, mi, weight, keep, ri, M, coef_norm=edge_norm, coef_norm_index=ri)
        _backward_launches(G, grad_hidden, y, weight, keep, hidden, node_norm, edge_norm, mi, ri, rptr, rperm,
                           mptr, mperm, grad_y if need_grad_y else None, grad_weight if need_grad_weight else None)
    return grad_y, grad_weight


registration.register("triton_stoich_conv_forward", "triton_stoich_conv_backward")
