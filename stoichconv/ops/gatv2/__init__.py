"""Fused GATv2 attention + aggregation (the part of ``torch_geometric.nn.GATv2Conv``
between its two linear maps and its bias), as used by the fast HeteroCell.

Semantics
---------
Inputs: ``x_l`` [N_src, H, C] (``lin_l`` of the sources), ``x_r`` [N_dst, H, C]
(``lin_r`` of the destinations), ``att`` [H, C], and E edges sorted by output
row: ``src`` [E] (row of ``x_l``), ``dst`` [E] (row of ``x_r``), ``crow``
[num_rows + 1] the CSR pointer of the output rows (edge e belongs to row i iff
``crow[i] <= e < crow[i + 1]``). ``dst`` and the output row differ when the
destination features are shared by all samples of a batch.

* logit ``a_e,h = sum_c att[h, c] * leaky_relu(x_l[src_e, h, c] + x_r[dst_e, h, c])``;
* ``alpha_e,h = exp(a_e,h - max_row a) / (sum_row exp(a - max_row a) + 1e-16)``
  over the edges of e's row (PyG's ``softmax``, its ``1e-16`` included);
* ``out[i, h] = sum_{e in row i} alpha_e,h * x_l[src_e, h]`` (0 for a row without edges).

``stoichconv::gatv2_forward`` returns ``(out [num_rows, H, C], alpha [E, H])``;
``stoichconv::gatv2_backward`` takes ``grad_out`` and the saved ``alpha`` and
returns ``(grad_x_l, grad_x_r, grad_att)``, with
``dL/da_e = alpha_e (<g_row, x_l[src_e]> - sum_{e' in row} alpha_e' <g_row, x_l[src_e']>)``
pushed through the leaky ReLU (pre-activations recomputed, never stored).

Dtypes
------
``x_l``, ``x_r`` and ``att`` (and in the backward ``grad_out`` and ``alpha``) share one dtype,
float16, bfloat16, float32 or float64 (:data:`stoichconv.ops._dtypes.FLOAT_DTYPES`); ``out``,
``alpha`` and the gradients come back in it. On every backend the logits (the channel sums),
the row maximum and softmax denominator, the aggregation and every gradient sum are computed
in the accumulate dtype, float32 for float16 / bfloat16 / float32 and float64 for float64
(:func:`~stoichconv.ops._dtypes.accumulate_dtype`; ``negative_slope`` is taken in it too):
values are converted on load and each result entry is rounded to the result dtype once, on
store (the backward reads the stored, rounded ``alpha``). Under ``torch.autocast`` on the
tensors' device type (``"cpu"`` or ``"cuda"``), the public functions first cast their floating
arguments to the autocast dtype, so the op runs in that lower precision (as ``torch.mm`` does
under autocast) and returns it; outside autocast, arguments of different dtypes are refused
with a ``TypeError`` naming both, never cast.

:func:`gatv2_attention` is the differentiable op on an
:class:`~stoichconv.types.EdgeSet` (``src``, ``dst``, ``crow``), used by the fast
HeteroCell. Backends (:data:`SPEC`): ``cpu`` and ``cuda`` run the two compiled ops
(``csrc/cpu/gatv2.cpp``, ``csrc/cuda/gatv2.cpp``; on CUDA a team of threads owns each
(row, head), the groupings by a stable sort), deterministic for any thread count (every output row
written by one thread, sums in a fixed order, ``grad_att`` summed over fixed
blocks of rows: of output rows on the CPU, of source rows on CUDA; no atomics; the CPU backward
is two passes over the edges, by output row then by source, the edges' softmax gradients
written in source order by the first); ``triton`` runs
``stoichconv::triton_gatv2_forward`` / ``_backward`` (:mod:`.triton_kernels`, the same
row-owned structure, the per-source and per-destination groupings by a stable sort in the
launcher); ``reference`` runs the edge-chunked pure-PyTorch forward and backward of
:func:`stoichconv.reference.gatv2.gatv2_attention_reference`. Both kernel backends go
through one autograd function (``_CompiledGATv2``, given the backend's forward and backward
ops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels
from stoichconv.backends import OpSpec, register_op, select
from stoichconv.ops._dtypes import cast_for_autocast, check_float, check_same_dtype
from stoichconv.types import EdgeSet

__all__ = ["SPEC", "EdgeSet", "gatv2_attention", "gatv2_backward", "gatv2_forward"]

SPEC = register_op(OpSpec(
    name="gatv2",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="gatv2_forward",
    triton="stoichconv.ops.gatv2.triton_kernels:triton_gatv2_forward",
    compiled_backward="gatv2_backward",
    reference="stoichconv.reference.gatv2:gatv2_attention_reference",
))


def _check_floats(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def _prepare_floats(**tensors: Tensor) -> tuple[Tensor, ...]:
    """The floating arguments, in order (the first one is the dtype others are compared
    with): cast to the autocast dtype under ``torch.autocast``, then checked to share one
    dtype of the module docstring."""
    _check_floats(**tensors)
    names = list(tensors)
    cast = cast_for_autocast(tensors[names[0]].device, *tensors.values())
    for name, t in zip(names, cast):
        check_float(name, t)
    check_same_dtype(names[0], cast[0], **dict(zip(names[1:], cast[1:])))
    return cast


def _check_indices(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise TypeError(f"`{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def gatv2_forward(x_l: Tensor, x_r: Tensor, att: Tensor, src: Tensor, dst: Tensor, crow: Tensor,
                  negative_slope: float = 0.2) -> tuple[Tensor, Tensor]:
    """``(out [num_rows, H, C], alpha [E, H])`` of the module docstring on the compiled
    kernel, in the dtype of the features (dtypes in the module docstring; not
    differentiable: :func:`gatv2_attention` is)."""
    x_l, x_r, att = _prepare_floats(x_l=x_l, x_r=x_r, att=att)
    _check_indices(src=src, dst=dst, crow=crow)
    return torch.ops.stoichconv.gatv2_forward(x_l, x_r, att, src, dst, crow, float(negative_slope))


def gatv2_backward(grad_out: Tensor, x_l: Tensor, x_r: Tensor, att: Tensor, alpha: Tensor, src: Tensor,
                   dst: Tensor, crow: Tensor, negative_slope: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x_l, grad_x_r, grad_att)`` of :func:`gatv2_forward` from its saved ``alpha``
    on the compiled kernel (dtypes in the module docstring)."""
    grad_out, x_l, x_r, att, alpha = _prepare_floats(grad_out=grad_out, x_l=x_l, x_r=x_r, att=att, alpha=alpha)
    _check_indices(src=src, dst=dst, crow=crow)
    return torch.ops.stoichconv.gatv2_backward(grad_out, x_l, x_r, att, alpha, src, dst, crow, float(negative_slope))


# The (forward, backward) operators of each kernel backend, looked up in torch.ops at call
# time (the Triton ones exist once stoichconv.ops has imported the Triton modules).
_KERNEL_OPS = {
    "cpu": ("gatv2_forward", "gatv2_backward"),
    "cuda": ("gatv2_forward", "gatv2_backward"),
    "triton": ("triton_gatv2_forward", "triton_gatv2_backward"),
}


class _CompiledGATv2(torch.autograd.Function):
    """The kernels' forward and hand-written backward; ``backend`` (a key of
    :data:`_KERNEL_OPS`) names the pair of ``torch.ops.stoichconv`` operators to run."""

    @staticmethod
    def forward(ctx, x_l: Tensor, x_r: Tensor, att: Tensor, edges: EdgeSet, negative_slope: float,
                backend: str = "cpu"):
        ctx.edges, ctx.negative_slope, ctx.backend = edges, negative_slope, backend
        forward_op = getattr(torch.ops.stoichconv, _KERNEL_OPS[backend][0])
        _check_indices(src=edges.src, dst=edges.dst, crow=edges.crow)
        out, alpha = forward_op(x_l, x_r, att, edges.src, edges.dst, edges.crow, float(negative_slope))
        ctx.save_for_backward(x_l, x_r, att, alpha)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x_l, x_r, att, alpha = ctx.saved_tensors
        edges = ctx.edges
        backward_op = getattr(torch.ops.stoichconv, _KERNEL_OPS[ctx.backend][1])
        grad_x_l, grad_x_r, grad_att = backward_op(grad_out.contiguous(), x_l, x_r, att, alpha, edges.src,
                                                   edges.dst, edges.crow, float(ctx.negative_slope))
        return grad_x_l, grad_x_r, grad_att, None, None, None


def gatv2_attention(x_l: Tensor, x_r: Tensor, att: Tensor, edges: EdgeSet, negative_slope: float = 0.2,
                    backend: str = "auto") -> Tensor:
    """GATv2 attention and aggregation ``out`` [num_rows, H, C'] of the module docstring:
    ``x_l`` [N_src, H, C'] (= ``lin_l(x_src)``), ``x_r`` [N_dst, H, C'] (= ``lin_r(x_dst)``),
    ``att`` [H, C'] of one dtype, the edges sorted by output row; ``out`` in that dtype (under
    ``torch.autocast``: the autocast dtype; dtypes in the module docstring). Differentiable
    w.r.t. ``x_l``, ``x_r`` and ``att`` (hand-written backward on every backend). ``backend``
    as in :mod:`stoichconv.backends`."""
    if not isinstance(x_l, Tensor) or not isinstance(x_r, Tensor) or x_l.dim() != 3 or x_r.dim() != 3 \
            or x_l.shape[1:] != x_r.shape[1:]:
        raise ValueError(f"`x_l` and `x_r` must be [N, H, C'] with equal H, C'; got "
                         f"{tuple(getattr(x_l, 'shape', ()))}, {tuple(getattr(x_r, 'shape', ()))}")
    if not isinstance(att, Tensor) or tuple(att.shape) != tuple(x_l.shape[1:]):
        raise ValueError(f"`att` must have shape [H, C'] = {tuple(x_l.shape[1:])}, got {tuple(getattr(att, 'shape', ()))}")
    if not isinstance(edges, EdgeSet):
        raise TypeError(f"`edges` must be a stoichconv.types.EdgeSet, got {type(edges).__name__}")
    x_l, x_r, att = _prepare_floats(x_l=x_l, x_r=x_r, att=att)
    selected = select("gatv2", backend, x_l.device)
    if selected.backend == "reference":
        return selected.fn(x_l, x_r, att, edges, negative_slope)
    return _CompiledGATv2.apply(x_l.contiguous(), x_r.contiguous(), att.contiguous(), edges, negative_slope,
                                selected.backend)


# --------------------------------------------------------------------------
# Fake kernels of the compiled ops
# --------------------------------------------------------------------------


def _backward_fake(grad_out, x_l, x_r, att, alpha, src, dst, crow, negative_slope):
    return torch.empty_like(x_l), torch.empty_like(x_r), torch.empty_like(att)


def _forward_fake(x_l, x_r, att, src, dst, crow, negative_slope):
    _, H, C = x_l.shape
    return x_l.new_empty(crow.shape[0] - 1, H, C), x_l.new_empty(src.shape[0], H)


if has_compiled_kernels():
    torch.library.register_fake("stoichconv::gatv2_forward")(_forward_fake)
    torch.library.register_fake("stoichconv::gatv2_backward")(_backward_fake)
