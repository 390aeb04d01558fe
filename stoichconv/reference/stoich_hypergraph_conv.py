"""Pure-PyG reference implementation of the signed stoichiometric hypergraph convolution.

Every fast backend of this package is checked against :class:`StoichHypergraphConv`. It keeps the
parameter layout and the arithmetic of the seed layer; the propagation's math is stated once, in
:mod:`stoichconv.ops.stoich_conv`, and the layer's in the class docstring.
"""

import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter
from torch_geometric.experimental import disable_dynamic_shapes
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.nn.inits import glorot, zeros
from torch_geometric.utils import scatter, softmax

ATTENTION_MODES = ("node", "edge")
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _inverse_degree(abs_stoich: Tensor, index: Tensor, size: int) -> Tensor:
    """``1 / Σ |s_k|`` per segment of ``index``, and 0 where the segment sum is 0 (or empty)."""
    inv = scatter(abs_stoich, index, dim=0, dim_size=size, reduce="sum").reciprocal()
    return inv.masked_fill(inv == math.inf, 0.0)


class StoichHypergraphConv(MessagePassing):
    r"""Signed stoichiometric hypergraph convolution (metabolite → reaction → metabolite).

    With incidences :math:`k = (v_k, e_k)` carrying signed stoichiometric coefficients :math:`s_k`,
    :math:`Y = x\Theta` viewed as ``[N, H, C]`` and per-incidence weights
    :math:`w_{k,h} = s_k \, g_{v_k} \, \alpha_{k,h}` (gate and attention factors are 1 when off):

    .. math::
        h_{e,h} = B_e \sum_{k: e_k = e} w_{k,h} Y_{v_k,h}, \qquad
        o_{v,h} = D_v \sum_{k: v_k = v} w_{k,h} h_{e_k,h},

    with :math:`D_v = 1/\sum_{k: v_k=v}|s_k|` and :math:`B_e = 1/\sum_{k: e_k=e}|s_k|` (0 for an
    empty sum). Heads are concatenated (``concat=True``) or averaged, then ``bias`` is added. With
    one head and no attention this is :math:`D S_g B S_g^\top X \Theta + b`. See
    :mod:`stoichconv.ops.stoich_conv`.

    * Gate (``is_stoich_gated``): :math:`g_v = \sigma(\mathrm{gate\_lin}(x_v))`, from the
      untransformed input, shared by all heads.
    * Attention (``use_attention``): :math:`Z = \mathrm{lin}(\text{hyperedge\_attr})`,
      :math:`a_{k,h} = \mathrm{LeakyReLU}(\langle att_h, [Y_{v_k,h} \| Z_{e_k,h}] \rangle)`, softmax
      over the incidences of the same reaction (``attention_mode="node"``) or of the same metabolite
      (``"edge"``), then dropout (training only).

    Stage 5 happens in :meth:`message`, which receives ``stoich``, the per-incidence gate
    ``[nnz, 1]`` and ``alpha`` ``[nnz, H]`` (``None`` when off): a hook registered with
    :meth:`register_message_forward_pre_hook` observes them.

    Decisions relative to the seed layer:

    * Parity kept: the attention coefficients, normalised per reaction in ``"node"`` mode, are
      reused unchanged in the reaction → metabolite step (they do not sum to 1 per metabolite
      there), with one dropout mask for both steps. ``hyperedge_attr`` is used as given (which
      reaction embeddings to feed is the caller's business).
    * Fixed: the bias has ``self.heads * out_channels`` entries when ``concat``. Without attention
      ``self.heads`` is 1, so the seed's ``heads * out_channels`` bias did not match the output.
    * ``num_edges`` is the number of reactions M (the seed's caller passed the number of
      incidences).
    * :math:`D` and :math:`B` are computed from ``stoich.detach()``: stoichiometry is data, no
      gradient flows through the normalisers.

    Args:
        in_channels: size of each input feature vector (``-1`` for lazy initialisation).
        out_channels: size of each output feature vector per head.
        is_stoich_gated: multiply each incidence by a learned per-metabolite sigmoid gate.
        use_attention: weight each incidence by attention coefficients (needs ``hyperedge_attr``).
        attention_mode: ``"node"`` (softmax per reaction) or ``"edge"`` (softmax per metabolite).
        heads: number of attention heads; ignored (``self.heads = 1``) without attention.
        concat: concatenate the heads (``[N, heads * out_channels]``) or average them.
        negative_slope: LeakyReLU slope of the attention scores.
        dropout: dropout probability on the attention coefficients.
        bias: add a learnable bias.
        **kwargs: forwarded to :class:`torch_geometric.nn.MessagePassing` (``aggr`` defaults to
            ``"add"``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        is_stoich_gated: bool = False,
        use_attention: bool = False,
        attention_mode: str = "node",
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        bias: bool = True,
        **kwargs,
    ):
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(
                f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}"
            )
        if heads < 1:
            raise ValueError(f"heads must be a positive integer, got {heads}")
        kwargs.setdefault("aggr", "add")
        super().__init__(flow="source_to_target", node_dim=0, **kwargs)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.is_stoich_gated = is_stoich_gated
        self.use_attention = use_attention
        self.attention_mode = attention_mode
        self.heads = heads if use_attention else 1
        self.concat = concat
        self.negative_slope = negative_slope
        self.dropout = dropout

        self.lin = Linear(
            in_channels, self.heads * out_channels, bias=False, weight_initializer="glorot"
        )
        if is_stoich_gated:
            self.gate_lin = Linear(in_channels, 1, bias=True, weight_initializer="glorot")
        if use_attention:
            self.att = Parameter(torch.empty(1, self.heads, 2 * out_channels))
        else:
            self.register_parameter("att", None)
        if bias:
            width = self.heads * out_channels if concat else out_channels
            self.bias = Parameter(torch.empty(width))
        else:
            self.register_parameter("bias", None)

        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin.reset_parameters()
        if self.is_stoich_gated:
            self.gate_lin.reset_parameters()
        if self.att is not None:
            glorot(self.att)
        if self.bias is not None:
            zeros(self.bias)

    @disable_dynamic_shapes(required_args=["num_edges"])
    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        stoich: Tensor,
        hyperedge_attr: Optional[Tensor] = None,
        num_edges: Optional[int] = None,
    ) -> Tensor:
        """Run the convolution.

        Args:
            x: metabolite features ``[N, in_channels]``.
            edge_index: incidences ``[2, nnz]``, row 0 metabolite ids, row 1 reaction ids.
            stoich: signed coefficients ``[nnz]`` (floating, finite).
            hyperedge_attr: reaction features ``[M, in_channels]``; required with attention and
                ignored otherwise.
            num_edges: number of reactions M; defaults to ``edge_index[1].max() + 1`` (0 when there
                are no incidences).

        Returns:
            ``[N, heads * out_channels]`` if ``concat`` else ``[N, out_channels]``.
        """
        num_edges = self._check_inputs(x, edge_index, stoich, hyperedge_attr, num_edges)
        num_nodes = x.size(0)
        edge_index = edge_index.long()
        metabolite, reaction = edge_index[0], edge_index[1]

        y = self.lin(x).view(-1, self.heads, self.out_channels)  # stage 1: [N, H, C]

        abs_stoich = stoich.detach().abs()  # stage 2
        inv_deg_node = _inverse_degree(abs_stoich, metabolite, num_nodes)  # D: [N]
        inv_deg_edge = _inverse_degree(abs_stoich, reaction, num_edges)  # B: [M]

        gate = None
        if self.is_stoich_gated:  # stage 3, g_k: [nnz, 1]
            gate = torch.sigmoid(self.gate_lin(x))[metabolite]
        alpha = None
        if self.use_attention:  # stage 4, α: [nnz, H]
            alpha = self._attention(y, hyperedge_attr, edge_index, num_nodes, num_edges)

        # Stage 6, metabolite -> reaction: [M, H, C].
        out = self.propagate(
            edge_index, x=y, norm=inv_deg_edge, stoich=stoich, gate=gate, alpha=alpha,
            size=(num_nodes, num_edges),
        )
        # Stage 7, reaction -> metabolite, with the same gate and α: [N, H, C].
        out = self.propagate(
            edge_index.flip([0]), x=out, norm=inv_deg_node, stoich=stoich, gate=gate, alpha=alpha,
            size=(num_edges, num_nodes),
        )

        # Stage 8.
        out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(dim=1)
        if self.bias is not None:
            out = out + self.bias
        return out

    def message(
        self,
        x_j: Tensor,
        norm_i: Tensor,
        stoich: Tensor,
        gate: Optional[Tensor],
        alpha: Optional[Tensor],
    ) -> Tensor:
        """Message of incidence k: ``norm[target_k] · w_k,h · x[source_k, h]`` (stage 5 gives w)."""
        weight = stoich.view(-1, 1)
        if gate is not None:
            weight = weight * gate
        if alpha is not None:
            weight = weight * alpha
        return norm_i.view(-1, 1, 1) * weight.unsqueeze(-1) * x_j

    def _attention(
        self, y: Tensor, hyperedge_attr: Tensor, edge_index: Tensor, num_nodes: int, num_edges: int
    ) -> Tensor:
        """Attention coefficients α ``[nnz, H]`` after softmax and dropout."""
        z = self.lin(hyperedge_attr).view(-1, self.heads, self.out_channels)
        pair = torch.cat([y[edge_index[0]], z[edge_index[1]]], dim=-1)  # [nnz, H, 2C]
        score = F.leaky_relu((pair * self.att).sum(dim=-1), self.negative_slope)
        if self.attention_mode == "node":
            alpha = softmax(score, edge_index[1], num_nodes=num_edges)
        else:
            alpha = softmax(score, edge_index[0], num_nodes=num_nodes)
        return F.dropout(alpha, p=self.dropout, training=self.training)

    def _check_inputs(
        self,
        x: Tensor,
        edge_index: Tensor,
        stoich: Tensor,
        hyperedge_attr: Optional[Tensor],
        num_edges: Optional[int],
    ) -> int:
        """Validate the forward inputs and return the number of reactions M."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor")
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [num_nodes, in_channels], got shape {tuple(x.shape)}")
        if self.in_channels > 0 and x.size(1) != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} columns, got {x.size(1)}")

        if not isinstance(edge_index, Tensor) or edge_index.dtype not in _INDEX_DTYPES:
            raise TypeError("edge_index must be an integer tensor")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(
                f"edge_index must have shape [2, nnz], got {tuple(edge_index.shape)}"
            )
        nnz = edge_index.size(1)

        if not isinstance(stoich, Tensor) or not stoich.is_floating_point():
            raise TypeError("stoich must be a floating-point tensor")
        if stoich.dim() != 1 or stoich.numel() != nnz:
            raise ValueError(
                f"stoich must have shape [nnz] = [{nnz}], got {tuple(stoich.shape)}"
            )
        if not bool(torch.isfinite(stoich).all()):
            raise ValueError("stoich must not contain NaN or infinite values")

        if num_edges is None:
            num_edges = int(edge_index[1].max()) + 1 if nnz > 0 else 0
        else:
            num_edges = operator.index(num_edges)
            if num_edges < 0:
                raise ValueError(f"num_edges must be non-negative, got {num_edges}")

        if nnz > 0:
            if int(edge_index.min()) < 0:
                raise ValueError("edge_index must not contain negative indices")
            if int(edge_index[0].max()) >= x.size(0):
                raise ValueError(
                    f"edge_index[0] (metabolite ids) must be < num_nodes = {x.size(0)}"
                )
            if int(edge_index[1].max()) >= num_edges:
                raise ValueError(
                    f"edge_index[1] (reaction ids) must be < num_edges = {num_edges}"
                )

        if self.use_attention:
            if hyperedge_attr is None:
                raise ValueError("hyperedge_attr is required when use_attention=True")
            if not isinstance(hyperedge_attr, Tensor) or not hyperedge_attr.is_floating_point():
                raise TypeError("hyperedge_attr must be a floating-point tensor")
            if hyperedge_attr.shape != (num_edges, x.size(1)):
                raise ValueError(
                    f"hyperedge_attr must have shape [num_edges, in_channels] = "
                    f"[{num_edges}, {x.size(1)}], got {tuple(hyperedge_attr.shape)}"
                )
        return num_edges

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"heads={self.heads}, is_stoich_gated={self.is_stoich_gated}, "
            f"use_attention={self.use_attention}, attention_mode={self.attention_mode!r})"
        )
