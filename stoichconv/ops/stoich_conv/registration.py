"""Fake kernels and the autograd formula of the stoich conv, registered for the compiled
``stoichconv::stoich_conv_forward`` (here, on import) and the Triton
``stoichconv::triton_stoich_conv_forward`` (by its module). Semantics and backward formula:
:mod:`stoichconv.ops.stoich_conv`."""

from __future__ import annotations

import torch

from stoichconv._extension import has_compiled_kernels
from stoichconv.ops._dtypes import accumulate_dtype

__all__ = ["register"]


def forward_fake(y, weight, reaction_keep, metabolite_index, reaction_index, abs_stoich,
                 reaction_ptr, reaction_perm, metabolite_ptr, metabolite_perm, save_hidden=True):
    B, N, H, C = y.shape
    M = reaction_ptr.shape[0] - 1
    Bn = B if reaction_keep is not None else 1
    hidden = y.new_empty(B, M, H, C) if save_hidden else y.new_empty(0)
    acc = accumulate_dtype(y.dtype)  # the norms are statistics
    return y.new_empty(B, N, H, C), hidden, y.new_empty(Bn, N, dtype=acc), y.new_empty(Bn, M, dtype=acc)


def backward_fake(grad_out, grad_hidden, y, weight, reaction_keep, hidden, node_norm, edge_norm,
                  metabolite_index, reaction_index, reaction_ptr, reaction_perm, metabolite_ptr,
                  metabolite_perm, need_grad_y, need_grad_weight):
    grad_y = y.new_empty(y.shape) if need_grad_y else y.new_empty(0)
    # the weight's own shape: [1, nnz, H] for a weight shared by the batch (its batch sum)
    grad_weight = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
    return grad_y, grad_weight


def register(forward: str, backward: str) -> None:
    """Register the fake kernels of ``stoichconv::<forward>`` / ``stoichconv::<backward>`` and
    the hand-written backward of the forward. An empty ``hidden`` (not saved) is passed on as
    is; the backward op recomputes it."""
    torch.library.register_fake(f"stoichconv::{forward}")(forward_fake)
    torch.library.register_fake(f"stoichconv::{backward}")(backward_fake)
    backward_op = getattr(torch.ops.stoichconv, backward)

    def setup_context(ctx, inputs, output):
        y, weight, reaction_keep, mi, ri, _abs, rptr, rperm, mptr, mperm = inputs[:10]
        _out, hidden, node_norm, edge_norm = output
        ctx.num_inputs = len(inputs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(node_norm, edge_norm)
        ctx.save_for_backward(y, weight, reaction_keep, hidden, node_norm, edge_norm, mi, ri, rptr, rperm, mptr, mperm)

    def backward_fn(ctx, grad_out, grad_hidden, _grad_node_norm, _grad_edge_norm):
        y, weight, reaction_keep, hidden, node_norm, edge_norm, mi, ri, rptr, rperm, mptr, mperm = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_hidden is not None and hidden.numel() == 0:
            grad_hidden = None  # the empty placeholder of an unsaved hidden
        if (grad_out is None and grad_hidden is None) or not (need_y or need_w):
            return (None,) * ctx.num_inputs
        if grad_out is None:
            grad_out = torch.zeros_like(y)
        grad_y, grad_weight = backward_op(
            grad_out, grad_hidden, y, weight, reaction_keep, hidden, node_norm, edge_norm,
            mi, ri, rptr, rperm, mptr, mperm, need_y, need_w,
        )
        return (grad_y if need_y else None, grad_weight if need_w else None) + (None,) * (ctx.num_inputs - 2)

    torch.library.register_autograd(f"stoichconv::{forward}", backward_fn, setup_context=setup_context)


if has_compiled_kernels():
    register("stoich_conv_forward", "stoich_conv_backward")
