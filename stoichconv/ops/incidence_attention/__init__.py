"""Fused incidence attention: the score gathers, the leaky ReLU and the grouped softmax of the
stoich conv layer's attention (:meth:`StoichHypergraphConv._attention`) as one op.

Semantics
---------
Inputs: per-metabolite scores ``score_v`` [B, N, H], per-reaction scores ``score_e``
[1 or B, M, H] (1: shared by the batch), the incidences as ``metabolite_index`` and
``reaction_index`` [nnz], the softmax grouping as a CSR ordering (``group_ptr`` [G + 1],
``group_perm`` [nnz], as in :mod:`stoichconv.ops.group_softmax`: the reaction grouping of a
:class:`~stoichconv.ops.StoichPlan` in ``"node"`` mode, the metabolite one in ``"edge"``
mode), an optional ``kept`` [B, nnz] bool and ``negative_slope``. With

* ``l[b, k, h] = leaky_relu(score_v[b, metabolite_index[k], h] + score_e[b or 0, reaction_index[k], h])``,

``alpha`` [B, nnz, H] is :func:`~stoichconv.ops.group_softmax` of ``l`` (its docstring: masked
incidences, groups with no kept incidence and groups whose kept logits are all ``-inf`` give
0, never NaN), without materialising ``l``.

The backward, from the saved ``alpha`` (the leaky ReLU's sign is recomputed from the scores):
``d pre_k = alpha_k (g_k - sum_{j in k's group} alpha_j g_j) * leaky_relu'(pre_k)``, then
``grad_score_v[b, n] = sum_{k: metabolite k = n} d pre[b, k]`` and ``grad_score_e[., m] = sum_{k:
reaction k = m} d pre[b, k]``, summed over the batch too when ``score_e`` is [1, M, H]
(``grad_score_e`` has ``score_e``'s shape). These sums run over the metabolite and reaction
groupings of the plan (``metabolite_grouping``, ``reaction_grouping``: (ptr, perm) pairs, which
must group the incidences by ``metabolite_index`` / ``reaction_index``), one row per
(sample, metabolite) and per (sample or batch, reaction), in CSR order, the batch outer:
deterministic, no atomics.

Dtypes
------
``score_v`` and ``score_e`` are one of float16, bfloat16, float32, float64
(:data:`stoichconv.ops._dtypes.FLOAT_DTYPES`); ``alpha`` and the gradients come back in that
dtype. The logits, maxima, exponentials and sums (and in the backward the dot sums and the
metabolite / reaction sums) are in the accumulate dtype (float32, float64 for float64),
rounded once on store. Under ``torch.autocast`` on the scores' device type,
:func:`incidence_attention` first casts both scores to the autocast dtype (as
:func:`~stoichconv.ops.group_softmax` does).

Backends (:data:`SPEC`): ``cpu`` and ``cuda`` run the compiled ``stoichconv::incidence_attention``
(and ``_backward``; ``csrc/cpu/incidence_attention.cpp``, ``csrc/cuda/incidence_attention.cpp``),
one task (CUDA: one thread per head) per (sample, group) row; ``triton`` runs
``stoichconv::triton_incidence_attention`` (:mod:`.triton_kernels`), one program per (row, head
block); ``reference`` runs :func:`stoichconv.reference.incidence_attention.incidence_attention_reference`.
The kernel backends share the fake kernels and the autograd formula of :func:`register`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels
from stoichconv.backends import OpSpec, register_op, select
from stoichconv.ops._dtypes import cast_for_autocast, check_float, check_same_dtype
from stoichconv.ops.group_softmax import _group_of

__all__ = ["SPEC", "incidence_attention", "register"]

SPEC = register_op(OpSpec(
    name="incidence_attention",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="incidence_attention",
    compiled_backward="incidence_attention_backward",
    triton="stoichconv.ops.incidence_attention.triton_kernels:triton_incidence_attention",
    reference="stoichconv.reference.incidence_attention:incidence_attention_reference",
))


def _check_index(name: str, t) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
        raise TypeError(f"`{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def incidence_attention(score_v: Tensor, score_e: Tensor, metabolite_index: Tensor, reaction_index: Tensor,
                        group_ptr: Tensor, group_perm: Tensor, kept: Optional[Tensor] = None,
                        negative_slope: float = 0.2, *, metabolite_grouping: tuple[Tensor, Tensor],
                        reaction_grouping: tuple[Tensor, Tensor], backend: str = "auto") -> Tensor:
    """``alpha`` [B, nnz, H] of the module docstring, in the dtype of the scores (under
    ``torch.autocast``: the autocast dtype); differentiable w.r.t. ``score_v`` and ``score_e``.
    ``metabolite_grouping`` / ``reaction_grouping``: the (ptr, perm) CSR orderings of the plan
    by metabolite and by reaction (the backward's sums). ``backend`` as in :mod:`stoichconv.backends`."""
    if not isinstance(score_v, Tensor) or score_v.dim() != 3 or not score_v.is_floating_point():
        raise ValueError(f"`score_v` must be a floating tensor [B, N, H], got {getattr(score_v, 'shape', type(score_v))}")
    if not isinstance(score_e, Tensor) or score_e.dim() != 3 or not score_e.is_floating_point():
        raise ValueError(f"`score_e` must be a floating tensor [1 or B, M, H], got {getattr(score_e, 'shape', type(score_e))}")
    score_v, score_e = cast_for_autocast(score_v.device, score_v, score_e)
    check_float("score_v", score_v)
    check_same_dtype("score_v", score_v, score_e=score_e)
    if score_e.shape[0] not in (1, score_v.shape[0]) or score_e.shape[2] != score_v.shape[2]:
        raise ValueError(f"`score_e` must be [1 or B, M, H] with B = {score_v.shape[0]}, H = {score_v.shape[2]}, "
                         f"got {tuple(score_e.shape)}")
    for name, t in (("metabolite_index", metabolite_index), ("reaction_index", reaction_index),
                    ("group_ptr", group_ptr), ("group_perm", group_perm)):
        _check_index(name, t)
    groupings = {}
    for kind, grouping in (("metabolite", metabolite_grouping), ("reaction", reaction_grouping)):
        if not isinstance(grouping, (tuple, list)) or len(grouping) != 2:
            raise TypeError(f"`{kind}_grouping` must be a (ptr, perm) pair of 1-D int64 tensors")
        for name, t in zip((f"{kind}_ptr", f"{kind}_perm"), grouping):
            _check_index(name, t)
        groupings[kind] = tuple(grouping)
    if kept is not None and (not isinstance(kept, Tensor) or kept.dtype != torch.bool):
        raise TypeError(f"`kept` must be a bool tensor, got {getattr(kept, 'dtype', type(kept).__name__)}")
    selected = select("incidence_attention", backend, score_v.device)
    if selected.backend == "reference":
        nnz = metabolite_index.numel()
        if group_perm.numel() != nnz:
            raise ValueError(f"`group_perm` must have nnz = {nnz} entries, got {group_perm.numel()}")
        return selected.fn(score_v, score_e, metabolite_index, reaction_index, _group_of(group_ptr, group_perm),
                           group_ptr.numel() - 1, kept, float(negative_slope))
    return selected.fn(score_v, score_e, metabolite_index, reaction_index, kept, group_ptr, group_perm,
                       *groupings["metabolite"], *groupings["reaction"], float(negative_slope))


# --------------------------------------------------------------------------
# Fake kernels and autograd of the kernel ops (compiled and Triton)
# --------------------------------------------------------------------------


def _forward_fake(score_v, score_e, metabolite_index, reaction_index, kept, group_ptr, group_perm,
                  metabolite_ptr, metabolite_perm, reaction_ptr, reaction_perm, negative_slope):
    B, _, H = score_v.shape
    return score_v.new_empty((B, metabolite_index.shape[0], H))


def _backward_fake(grad, alpha, score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm,
                   metabolite_ptr, metabolite_perm, reaction_ptr, reaction_perm, negative_slope):
    return (torch.empty_like(score_v, memory_format=torch.contiguous_format),
            torch.empty_like(score_e, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    (score_v, score_e, metabolite_index, reaction_index, _kept, group_ptr, group_perm,
     metabolite_ptr, metabolite_perm, reaction_ptr, reaction_perm, negative_slope) = inputs
    ctx.save_for_backward(output, score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm,
                          metabolite_ptr, metabolite_perm, reaction_ptr, reaction_perm)
    ctx.negative_slope = negative_slope


def register(forward: str, backward: str) -> None:
    """Register the fake kernels of ``stoichconv::<forward>`` / ``stoichconv::<backward>`` and
    the autograd formula of the forward (the compiled ops here, the Triton ones from
    :mod:`.triton_kernels`)."""
    torch.library.register_fake(f"stoichconv::{forward}")(_forward_fake)
    torch.library.register_fake(f"stoichconv::{backward}")(_backward_fake)
    backward_op = getattr(torch.ops.stoichconv, backward)

    def backward_fn(ctx, grad):
        none = (None,) * 10
        if grad is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None, None) + none
        grad_v, grad_e = backward_op(grad, *ctx.saved_tensors, ctx.negative_slope)
        return ((grad_v if ctx.needs_input_grad[0] else None), (grad_e if ctx.needs_input_grad[1] else None)) + none

    torch.library.register_autograd(f"stoichconv::{forward}", backward_fn, setup_context=_setup_context)


if has_compiled_kernels():
    register("incidence_attention", "incidence_attention_backward")
