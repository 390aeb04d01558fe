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

The fast HeteroCell's autograd function
(:func:`stoichconv.models.hetero_cell.gatv2_attention`) runs the two ops on
CPU. Both C++ kernels are deterministic for any thread count (every output
row written by one thread, sums in a fixed order, ``grad_att`` summed over
fixed blocks of source rows; no atomics). There is no CUDA kernel: on other
devices, and as the kernels' reference in the tests, the same function runs an
edge-chunked pure-PyTorch forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels

__all__ = ["gatv2_op_available", "gatv2_forward", "gatv2_backward"]


def gatv2_op_available(device: torch.device) -> bool:
    """Whether the compiled kernel serves tensors on ``device`` (CPU only)."""
    return (
        device.type == "cpu"
        and has_compiled_kernels()
        and torch._C._dispatch_has_kernel_for_dispatch_key("stoichconv::gatv2_forward", "CPU")
    )


def gatv2_forward(x_l: Tensor, x_r: Tensor, att: Tensor, src: Tensor, dst: Tensor, crow: Tensor,
                  negative_slope: float = 0.2) -> tuple[Tensor, Tensor]:
    """``(out [num_rows, H, C], alpha [E, H])`` of the module docstring on the
    compiled CPU kernel (not differentiable: see the module docstring)."""
    for name, t in (("x_l", x_l), ("x_r", x_r), ("att", att)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    for name, t in (("src", src), ("dst", dst), ("crow", crow)):
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise TypeError(f"`{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return torch.ops.stoichconv.gatv2_forward(x_l, x_r, att, src, dst, crow, float(negative_slope))


def gatv2_backward(grad_out: Tensor, x_l: Tensor, x_r: Tensor, att: Tensor, alpha: Tensor, src: Tensor,
                   dst: Tensor, crow: Tensor, negative_slope: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x_l, grad_x_r, grad_att)`` of :func:`gatv2_forward` from its saved
    ``alpha`` on the compiled CPU kernel."""
    for name, t in (("grad_out", grad_out), ("alpha", alpha)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    for name, t in (("src", src), ("dst", dst), ("crow", crow)):
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise TypeError(f"`{name}` must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return torch.ops.stoichconv.gatv2_backward(grad_out, x_l, x_r, att, alpha, src, dst, crow, float(negative_slope))


def _backward_fake(grad_out, x_l, x_r, att, alpha, src, dst, crow, negative_slope):
    return torch.empty_like(x_l), torch.empty_like(x_r), torch.empty_like(att)


def _forward_fake(x_l, x_r, att, src, dst, crow, negative_slope):
    _, H, C = x_l.shape
    return x_l.new_empty(crow.shape[0] - 1, H, C), x_l.new_empty(src.shape[0], H)


if has_compiled_kernels() and hasattr(torch.ops.stoichconv, "gatv2_forward"):
    torch.library.register_fake("stoichconv::gatv2_forward")(_forward_fake)
    torch.library.register_fake("stoichconv::gatv2_backward")(_backward_fake)
