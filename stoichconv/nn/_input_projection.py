"""The input projections of :class:`stoichconv.nn.StoichHypergraphConv` from one read of ``x``.

``input_projection(x, weight, side_weight)`` returns ``y = x Wᵀ`` [R, O] and ``side = x Sᵀ``
[R, k] for a few side rows ``S`` [k, F] (the layer's per-head attention score of the node,
``<att_h[:C], lin(x)_h> = x · (W_hᵀ att_h[:C])``, and its gate logit ``gate_lin.weight · x``), with
a hand-written backward: ``dL/dx = dL/dy W + dL/dside S`` in one output (one product, then a
rank-k update in place) instead of one [R, F] product per projection and their sums, and the
weight gradients as ``dL/dyᵀ x`` and ``dL/dsideᵀ x`` (the orientation that reads ``x`` once),
each a product over the R rows with few output rows, as a batch of row-block products summed in
block order (:func:`tall_product`).
Large CPU outputs (``y`` is the largest tensor the layer allocates, ``dL/dx`` the next) come from
the host block cache, or are advised into huge pages with the cache off
(:mod:`stoichconv._host_pages`). Same values as ``F.linear`` up to summation order.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from stoichconv import _host_pages


# Rows per block of tall_product: a block of x (F = 64 float32 features: 512 KiB) stays in L2.
TALL_PRODUCT_BLOCK_ROWS = 2048


def tall_product(a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` [k, F] for tall ``a`` [R, k] with few columns and ``b`` [R, F]: the rows in
    blocks of :data:`TALL_PRODUCT_BLOCK_ROWS`, one batched product over the whole blocks and one
    product for the rest, summed in block order (a fixed order: deterministic). One plain
    product of this shape (a reduction over all R rows into k output rows) runs at a fraction
    of the speed of the batched one on CPU, 2 threads, R = 81,088, F = 64: k = 3 (the side
    rows) 3.1-3.4 against 1.2-1.4 ms, k = 64 (the plain layer's weight) 10.4 against 7.3 ms
    (6.7 against 5.5 in a quieter hour), k = 128 (two heads) 12.4 against 11.7 ms."""
    rows = a.size(0)
    block = TALL_PRODUCT_BLOCK_ROWS
    whole = rows // block
    if whole < 2:
        return torch.mm(a.t(), b)
    cut = whole * block
    parts = torch.bmm(a[:cut].reshape(whole, block, -1).transpose(1, 2), b[:cut].reshape(whole, block, -1))
    out = parts.sum(0)
    if cut < rows:
        out.addmm_(a[cut:].t(), b[cut:])
    return out


class _InputProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, side_weight: Optional[Tensor]):
        rows, out_features = x.size(0), weight.size(0)
        y = torch.mm(x, weight.t(), out=_host_pages.empty(rows, out_features, dtype=x.dtype, device=x.device))
        side = None if side_weight is None else torch.mm(x, side_weight.t())
        ctx.save_for_backward(x, weight, side_weight)
        return y, side

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Optional[Tensor], grad_side: Optional[Tensor]):
        x, weight, side_weight = ctx.saved_tensors
        need_x, need_w, need_s = ctx.needs_input_grad
        grad_x = grad_w = grad_s = None
        if need_x:
            grad_x = _host_pages.empty(*x.shape, dtype=x.dtype, device=x.device)
            if grad_y is not None:
                torch.mm(grad_y, weight, out=grad_x)
            else:
                grad_x.zero_()
            if grad_side is not None:
                grad_x.addmm_(grad_side, side_weight)
        if need_w:
            grad_w = torch.zeros_like(weight) if grad_y is None else tall_product(grad_y, x)
        if need_s:
            grad_s = torch.zeros_like(side_weight) if grad_side is None else tall_product(grad_side, x)
        return grad_x, grad_w, grad_s


def input_projection(x: Tensor, weight: Tensor, side_weight: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``(x @ weight.T, x @ side_weight.T)`` (the second None without ``side_weight``) for
    ``x`` [R, F], ``weight`` [O, F], ``side_weight`` [k, F], all of one floating dtype and
    device; differentiable once in every argument (see the module docstring)."""
    for name, t in (("x", x), ("weight", weight), ("side_weight", side_weight)):
        if t is None and name == "side_weight":
            continue
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a 2-D floating tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.size(1) != x.size(1) or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"`{name}` must be [*, {x.size(1)}] {x.dtype} on {x.device} like `x`, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return _InputProjection.apply(x, weight, side_weight)
