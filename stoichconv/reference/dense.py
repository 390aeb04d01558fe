"""Dense float64 ground truth for the propagation of the stoichiometric hypergraph convolution.

An independent formulation of the layer (:class:`stoichconv.reference.StoichHypergraphConv`) with dense
matrices instead of message passing; meant for tests on small graphs (memory ``H · N · M``).
"""

from typing import Optional

import torch
from torch import Tensor


def _inverse_or_zero(total: Tensor) -> Tensor:
    """``1 / total`` elementwise, 0 where ``total`` is 0."""
    safe = torch.where(total == 0, torch.ones_like(total), total)
    return torch.where(total == 0, torch.zeros_like(total), 1.0 / safe)


def dense_stoich_conv(
    x_transformed: Tensor,
    edge_index: Tensor,
    stoich: Tensor,
    num_nodes: int,
    num_edges: int,
    gate: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None,
) -> Tensor:
    r"""Propagate ``x_transformed`` through the signed, normalised incidence, densely in float64.

    Per head h, with :math:`W_h[v, e] = \sum_{k: (v_k, e_k) = (v, e)} s_k g_{v_k} \alpha_{k,h}`,
    :math:`D = \mathrm{diag}(1 / \sum_{k: v_k = v} |s_k|)` and
    :math:`B = \mathrm{diag}(1 / \sum_{k: e_k = e} |s_k|)` (0 for an empty sum):

    .. math:: \mathrm{out}_h = D \, W_h \, B \, W_h^\top \, Y_h.

    No lin, heads combination or bias: those are stages 1 and 8. ``D`` and ``B`` are built from
    ``stoich.detach()``, so gradients flow only through ``W`` and ``Y``, as in the layer.

    Args:
        x_transformed: ``Y`` as ``[N, H, C]`` (or ``[N, C]`` for one head).
        edge_index: ``[2, nnz]`` incidences (metabolite row, reaction row).
        stoich: ``[nnz]`` signed coefficients.
        num_nodes: N.
        num_edges: M.
        gate: per-metabolite gate ``g_v``, ``[N]`` or ``[N, 1]``; all ones if None.
        alpha: per-incidence attention ``[nnz, H]`` (or ``[nnz]`` for one head); all ones if None.

    Returns:
        ``[N, H, C]`` float64.
    """
    y = x_transformed.to(torch.float64)
    if y.dim() == 2:
        y = y.unsqueeze(1)
    heads = y.size(1)
    metabolite, reaction = edge_index[0].long(), edge_index[1].long()
    s = stoich.to(torch.float64)

    weight = s.unsqueeze(1).expand(-1, heads)  # [nnz, H]
    if gate is not None:
        weight = weight * gate.to(torch.float64).reshape(num_nodes)[metabolite].unsqueeze(1)
    if alpha is not None:
        weight = weight * alpha.to(torch.float64).reshape(-1, heads)

    incidence = torch.zeros(heads, num_nodes, num_edges, dtype=torch.float64, device=y.device)
    head_ids = torch.arange(heads, device=y.device).repeat(len(s))
    incidence = incidence.index_put(
        (head_ids, metabolite.repeat_interleave(heads), reaction.repeat_interleave(heads)),
        weight.reshape(-1),
        accumulate=True,
    )  # W: [H, N, M]

    magnitude = torch.zeros(num_nodes, num_edges, dtype=torch.float64, device=y.device)
    magnitude = magnitude.index_put((metabolite, reaction), s.detach().abs(), accumulate=True)
    d = torch.diag(_inverse_or_zero(magnitude.sum(dim=1)))  # [N, N]
    b = torch.diag(_inverse_or_zero(magnitude.sum(dim=0)))  # [M, M]

    out = d @ incidence @ b @ incidence.transpose(1, 2) @ y.transpose(0, 1)  # [H, N, C]
    return out.transpose(0, 1)
