"""Reference HeteroCell ("difference" version) in plain PyTorch + PyG: the original torchcell
model, every configuration it accepts, and its checkpoints.

Forward
-------
* ``ForwardSingle(G)``: learnable embeddings per node type (gathered with ``G[t].n_id`` on a
  compacted perturbation batch, all rows on the wildtype); genes go through the
  :class:`PreProcessor` (2 x [Linear(C, C) -> norm -> act -> Dropout] with **one** norm instance
  at both positions, so the two share parameters and, for ``"batch"``, running statistics); then
  ``num_layers`` x ``HeteroConv(aggr="sum")`` over four relations, each wrapped by
  :class:`RelationWrapper` as ``conv -> proj -> norm -> act -> dropout`` (proj = Linear(width, C)
  where the conv's output width is not C, else identity):

  - ``(gene, physical_interaction, gene)`` and ``(gene, regulatory_interaction, gene)``:
    ``GATv2Conv(C, C // H, heads=H, concat=gene_concat, add_self_loops=gene_add_self_loops)``:
    width ``H * (C // H)`` with concat (hidden 64, 10 heads: 60, projected to 64), ``C // H``
    without;
  - ``(gene, gpr, reaction)``: bipartite ``GATv2Conv((C, C), C, heads=gpr_heads,
    concat=gpr_concat, add_self_loops=gpr_add_self_loops)`` (PyG's self-loops on a bipartite
    relation pair gene i with reaction i of the compacted numbering; the original does that);
  - ``(metabolite, reaction, metabolite)``: the reference
    :class:`~stoichconv.reference.StoichHypergraphConv` ``(C, C, is_stoich_gated=metabolism_gated,
    use_attention=metabolism_attention, heads=metabolism_heads, concat=metabolism_concat,
    dropout=dropout)`` with ``hyperedge_attr`` = the *layer-0* reaction embeddings at every layer
    (the original's quirk, kept) and ``num_edges`` = the number of reaction nodes of ``G``.

  The relation norm is ``torch_geometric.nn.LayerNorm(C)`` in graph mode called without a batch
  vector (one mean and one std over all rows x channels of the tensor: on a compacted batch, over
  the kept nodes of *all* samples together) for ``norm="layer"``, ``torch_geometric.nn.BatchNorm``
  (statistics over all rows) for ``"batch"``; ``torch.nn.LayerNorm`` / ``torch.nn.BatchNorm1d`` in
  the preprocessor and the head. In train mode BatchNorm running statistics (momentum 0.1,
  unbiased variance) update in forward order: the shared preprocessor norm 4 times per forward,
  each relation norm twice (wildtype, batch), each head norm once.
* ``forward(cell_graph, batch)``: ``z_w = pool(ForwardSingle(cell_graph))`` [1, C],
  ``z_i = pool(ForwardSingle(batch), batch["gene"].batch)`` [B, C], ``z_p = z_w - z_i``,
  ``predictions = head(z_p)`` [B, 2] (fitness, gene interaction). ``pool`` is
  ``AttentionalAggregation(gate_nn = Linear(C, C // 2) -> ReLU -> Dropout -> Linear(C // 2, 1),
  nn = Linear(C, C) -> ReLU -> Dropout)`` (always ReLU); ``head`` is
  ``[Linear -> norm -> act -> Dropout] x (head_num_layers - 1)`` (``[Linear -> act -> Dropout]``
  with ``head_norm=None``) then ``Linear(-> 2)``; depth 0 is the identity (predictions = z_p).

Dropout ``p = dropout`` applies where the original applies it: preprocessor, relation wrappers,
pool, metabolism attention (``head_dropout`` in the head). Every dropout is an ``nn.Dropout`` /
``F.dropout`` call in the order of the forward above, so that a model with the same seed draws
the same masks as the original.

Activations (:data:`ACTIVATIONS`, the original's registry): ``relu``, ``gelu`` (exact),
``leaky_relu`` (slope 0.01), ``tanh``, ``sigmoid``.

A fact of this design (kept on purpose, it is the original's): genes receive messages only from
the gene-gene relations and only genes are pooled, so the GPR and metabolism relations and the
reaction / metabolite embeddings never reach the prediction; their parameters get no gradient
(``.grad`` stays ``None``). DDP then needs ``find_unused_parameters=True``.

``metabolism_to_gene=True`` (off by default; no torchcell equivalent) lets metabolism reach the
prediction: every layer gets a fifth relation ``(reaction, rev_gpr, gene)``, a ``GATv2Conv((C, C),
C // H, heads=H, concat=gene_concat, add_self_loops=False)`` along the reversed GPR edges, wrapped
like the others and summed into the genes. Its source features are the layer's new reaction
features plus a parameter-free summary of the layer's new metabolite features,
``r'_e + B_e * sum_{k: e_k = e} s_k m'_{v_k}`` (``B_e = 1 / sum |s_k|``, signed incidences), so the
metabolism conv, the GPR conv and both embeddings of the *same* layer reach the genes and every
parameter gets a gradient.

torchcell checkpoints
---------------------
:meth:`HeteroCell.from_torchcell` takes a torchcell ``HeteroCell`` ``state_dict`` and that
model's constructor arguments (their meaning and defaults); :meth:`HeteroCell.to_torchcell_state_dict`
is its inverse (loads strictly into the original); :meth:`HeteroCell.torchcell_kwargs` gives the
constructor arguments. Configuration (torchcell keyword (its default) -> this constructor):

* ``gene_num``, ``reaction_num``, ``metabolite_num`` -> ``num_genes``, ``num_reactions``,
  ``num_metabolites``; ``hidden_channels``, ``num_layers``, ``dropout`` (0.1), ``norm``
  ("layer"), ``activation`` ("relu") -> the same names;
* ``gene_encoder_config`` (required): ``heads`` (1), ``concat`` (True), ``add_self_loops``
  (False) -> ``heads``, ``gene_concat``, ``gene_add_self_loops``;
* ``gpr_conv_config``: ``heads`` (1), ``concat`` (False), ``add_self_loops`` (False) ->
  ``gpr_heads``, ``gpr_concat``, ``gpr_add_self_loops``;
* ``metabolism_config`` (required): ``is_stoich_gated`` (False), ``use_attention`` (True),
  ``heads`` (1), ``concat`` (True) -> ``metabolism_gated``, ``metabolism_attention``,
  ``metabolism_heads``, ``metabolism_concat``;
* ``prediction_head_config``: ``head_num_layers`` (1), ``hidden_channels`` (C), ``head_norm``
  (``norm``; None: no norm), ``activation``, ``dropout`` (the model's) -> ``head_num_layers``,
  ``head_hidden_channels``, ``head_norm``, ``head_activation``, ``head_dropout``;
* never read by the original, so ignored: ``out_channels``, ``residual`` (head),
  ``bias`` and ``share_weights`` (gene encoder); other unknown keys warn.

Parameter names (this model -> torchcell; everything not listed is named alike):

* ``pool.gate_nn.{0,3}.*`` -> ``global_aggregator.gate_nn.{0,3}.*`` and its alias
  ``global_aggregator.aggregator.gate_nn.{0,3}.*``;
* ``pool.nn.0.*`` -> ``global_aggregator.transform_nn.0.*`` and its alias
  ``global_aggregator.aggregator.nn.0.*``;
* ``head.{i}.*`` -> ``prediction_head.{i}.*`` (same indices: both keep their Dropout modules in the
  Sequential, so hidden layer k's Linear is ``4k`` with a norm, ``3k`` without);
* ``preprocessor.mlp.1.*`` and ``preprocessor.mlp.5.*`` are one norm under two names in both;
* ``rev_gpr_convs.*`` (``metabolism_to_gene``) has no torchcell counterpart.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import AttentionalAggregation, GATv2Conv, HeteroConv
from torch_geometric.nn import BatchNorm as GraphBatchNorm
from torch_geometric.nn import LayerNorm as GraphLayerNorm
from torch_geometric.utils import scatter

from stoichconv.data.relations import GPR, METABOLISM, PHYSICAL, REGULATORY
from stoichconv.reference.stoich_hypergraph_conv import StoichHypergraphConv

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "HeteroCell",
    "PreProcessor",
    "RelationWrapper",
    "make_activation",
    "nan_mse_loss",
    "torchcell_config",
]

#: The original's activation registry (torchcell ``act_register``): name -> module class.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}
#: Norms the original accepts (its preprocessor raises on anything else).
NORMS = ("layer", "batch")
_SAME = "same"  # head_norm default: the model's norm


def nan_mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the entries of ``target`` that are not NaN (0 if all are NaN)."""
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} must have one shape")
    valid = ~torch.isnan(target)
    diff = torch.where(valid, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return diff.pow(2).sum() / valid.sum().clamp_min(1)


def make_activation(name: str) -> nn.Module:
    """A fresh module of the original's activation ``name`` (see :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; the original's registry has {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _node_norm(kind: str, channels: int) -> nn.Module:
    """Per-node norm of the preprocessor and the head (``torch.nn``)."""
    if kind == "layer":
        return nn.LayerNorm(channels)
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _relation_norm(kind: Optional[str], channels: int) -> nn.Module:
    """Relation norm (PyG, graph mode without a batch vector) or identity for ``None``."""
    if kind is None:
        return nn.Identity()
    if kind == "layer":
        return GraphLayerNorm(channels)
    if kind == "batch":
        return GraphBatchNorm(channels)
    raise ValueError(f"norm must be one of {NORMS} or None, got {kind!r}")


class PreProcessor(nn.Module):
    """``num_layers`` x [Linear(C, C) -> norm -> act -> Dropout] with one norm instance (and one
    activation) at every position, as the original builds it: ``mlp.1`` and ``mlp.5`` are the
    same module, so its ``state_dict`` lists that norm under both names."""

    def __init__(self, channels: int, num_layers: int = 2, dropout: float = 0.0, norm: str = "layer",
                 activation: str = "relu"):
        super().__init__()
        norm_layer = _node_norm(norm, channels)
        act = make_activation(activation)
        layers = []
        for _ in range(num_layers):
            layers += [nn.Linear(channels, channels), norm_layer, act, nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class RelationWrapper(nn.Module):
    """``conv -> proj -> norm -> act -> dropout``; proj is Linear(out_width, C) or identity,
    norm a PyG graph-mode LayerNorm / BatchNorm or identity."""

    def __init__(self, conv: nn.Module, out_width: int, channels: int, norm: Optional[str], dropout: float,
                 activation: str = "relu"):
        super().__init__()
        self.conv = conv
        self.proj = nn.Linear(out_width, channels) if out_width != channels else nn.Identity()
        self.norm = _relation_norm(norm, channels)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def post(self, out: Tensor) -> Tensor:
        return self.dropout(self.act(self.norm(self.proj(out))))

    def forward(self, *args, **kwargs) -> Tensor:
        return self.post(self.conv(*args, **kwargs))


def _gat_width(heads: int, out_channels: int, concat: bool) -> int:
    return heads * out_channels if concat else out_channels


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")


class HeteroCell(nn.Module):
    """The reference HeteroCell (see the module docstring for the forward and the configuration).

    Args:
        num_genes, num_reactions, num_metabolites: embedding table sizes (the wildtype's).
        hidden_channels: C (default 64).
        num_layers: L, the number of HeteroConv layers (default 3).
        heads: H of the gene-gene convs (default 2), 1 <= H <= C; the width is ``H * (C // H)``
            (concat) or ``C // H``, projected to C when it differs.
        dropout: dropout probability of the preprocessor, the relations, the pool and the
            metabolism attention (default 0).
        norm: ``"layer"`` (default), ``"batch"`` or ``None`` (no relation norm; the preprocessor
            and the head then use ``"layer"``: an extension, the original requires a norm).
        metabolism_to_gene: add the ``(reaction, rev_gpr, gene)`` relation (default False).

    Keyword-only (defaults: this package's configuration; :meth:`from_torchcell` maps the
    original's):
        activation: name in :data:`ACTIVATIONS` (default ``"relu"``).
        gene_concat, gene_add_self_loops: gene-gene GATv2Conv options (True, False).
        gpr_heads, gpr_concat, gpr_add_self_loops: GPR GATv2Conv (``heads``, True, False).
        metabolism_heads, metabolism_concat, metabolism_gated, metabolism_attention: metabolism
            conv (``heads``, True, True, True); without attention it has one head.
        head_num_layers: Linear layers of the prediction head (default ``num_layers``; 0 = identity).
        head_hidden_channels: their width (default C).
        head_norm: ``"layer"``, ``"batch"``, ``None`` (no norm) or ``"same"`` (default: ``norm``,
            ``"layer"`` when ``norm`` is None).
        head_activation, head_dropout: default ``activation``, ``dropout``.

    ``model.config`` holds every constructor argument (``type(model)(**model.config)`` rebuilds it).
    """

    stoich_conv_class = StoichHypergraphConv

    def __init__(
        self,
        num_genes: int,
        num_reactions: int,
        num_metabolites: int,
        hidden_channels: int = 64,
        num_layers: int = 3,
        heads: int = 2,
        dropout: float = 0.0,
        norm: Optional[str] = "layer",
        metabolism_to_gene: bool = False,
        *,
        activation: str = "relu",
        gene_concat: bool = True,
        gene_add_self_loops: bool = False,
        gpr_heads: Optional[int] = None,
        gpr_concat: bool = True,
        gpr_add_self_loops: bool = False,
        metabolism_heads: Optional[int] = None,
        metabolism_concat: bool = True,
        metabolism_gated: bool = True,
        metabolism_attention: bool = True,
        head_num_layers: Optional[int] = None,
        head_hidden_channels: Optional[int] = None,
        head_norm: Optional[str] = _SAME,
        head_activation: Optional[str] = None,
        head_dropout: Optional[float] = None,
    ):
        super().__init__()
        gpr_heads = heads if gpr_heads is None else gpr_heads
        metabolism_heads = heads if metabolism_heads is None else metabolism_heads
        head_num_layers = num_layers if head_num_layers is None else head_num_layers
        head_hidden_channels = hidden_channels if head_hidden_channels is None else head_hidden_channels
        if head_norm == _SAME:
            head_norm = "layer" if norm is None else norm
        head_activation = activation if head_activation is None else head_activation
        head_dropout = dropout if head_dropout is None else head_dropout
        for name, value in (("num_genes", num_genes), ("num_reactions", num_reactions),
                            ("num_metabolites", num_metabolites), ("hidden_channels", hidden_channels),
                            ("num_layers", num_layers), ("heads", heads), ("gpr_heads", gpr_heads),
                            ("metabolism_heads", metabolism_heads), ("head_hidden_channels", head_hidden_channels)):
            _check_positive_int(name, value)
        _check_positive_int("head_num_layers", head_num_layers, 0)
        if hidden_channels < 2:
            raise ValueError(f"`hidden_channels` must be >= 2 (the pool's gate is C // 2 wide), got {hidden_channels}")
        if heads > hidden_channels:
            raise ValueError(f"`heads` ({heads}) must be <= `hidden_channels` ({hidden_channels}): the gene-gene "
                             f"convs have hidden_channels // heads channels per head")
        if norm not in NORMS + (None,):
            raise ValueError(f"`norm` must be one of {NORMS} or None, got {norm!r}")
        if head_norm not in NORMS + (None,):
            raise ValueError(f"`head_norm` must be one of {NORMS}, None or 'same', got {head_norm!r}")
        for name, value in (("activation", activation), ("head_activation", head_activation)):
            if value not in ACTIVATIONS:
                raise ValueError(f"`{name}` must be one of {sorted(ACTIVATIONS)}, got {value!r}")
        for name, value in (("dropout", dropout), ("head_dropout", head_dropout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1), got {value!r}")
        dropout, head_dropout = float(dropout), float(head_dropout)
        C, H = hidden_channels, heads
        self.config = dict(
            num_genes=num_genes, num_reactions=num_reactions, num_metabolites=num_metabolites,
            hidden_channels=C, num_layers=num_layers, heads=H, dropout=dropout, norm=norm,
            metabolism_to_gene=bool(metabolism_to_gene), activation=activation, gene_concat=bool(gene_concat),
            gene_add_self_loops=bool(gene_add_self_loops), gpr_heads=gpr_heads, gpr_concat=bool(gpr_concat),
            gpr_add_self_loops=bool(gpr_add_self_loops), metabolism_heads=metabolism_heads,
            metabolism_concat=bool(metabolism_concat), metabolism_gated=bool(metabolism_gated),
            metabolism_attention=bool(metabolism_attention), head_num_layers=head_num_layers,
            head_hidden_channels=head_hidden_channels, head_norm=head_norm, head_activation=head_activation,
            head_dropout=head_dropout,
        )
        self.hidden_channels, self.num_layers, self.heads = C, num_layers, H
        self.dropout, self.norm = dropout, norm
        self.metabolism_to_gene = bool(metabolism_to_gene)
        self.num_nodes = {"gene": num_genes, "reaction": num_reactions, "metabolite": num_metabolites}

        self.gene_embedding = nn.Embedding(num_genes, C)
        self.reaction_embedding = nn.Embedding(num_reactions, C)
        self.metabolite_embedding = nn.Embedding(num_metabolites, C)
        self.preprocessor = PreProcessor(C, num_layers=2, dropout=dropout, norm=norm or "layer",
                                         activation=activation)

        def wrap(conv, width):
            return RelationWrapper(conv, width, C, norm, dropout, activation)

        gene_width = _gat_width(H, C // H, gene_concat)
        gpr_width = _gat_width(gpr_heads, C, gpr_concat)
        met_heads = metabolism_heads if metabolism_attention else 1
        met_width = _gat_width(met_heads, C, metabolism_concat)
        self.convs = nn.ModuleList()
        self.rev_gpr_convs = nn.ModuleList()
        for _ in range(num_layers):
            self.convs.append(HeteroConv({
                PHYSICAL: wrap(GATv2Conv(C, C // H, heads=H, concat=gene_concat,
                                         add_self_loops=gene_add_self_loops), gene_width),
                REGULATORY: wrap(GATv2Conv(C, C // H, heads=H, concat=gene_concat,
                                           add_self_loops=gene_add_self_loops), gene_width),
                GPR: wrap(GATv2Conv((C, C), C, heads=gpr_heads, concat=gpr_concat,
                                    add_self_loops=gpr_add_self_loops), gpr_width),
                METABOLISM: wrap(self.stoich_conv_class(C, C, is_stoich_gated=metabolism_gated,
                                                        use_attention=metabolism_attention, heads=met_heads,
                                                        concat=metabolism_concat, dropout=dropout), met_width),
            }, aggr="sum"))
            if metabolism_to_gene:
                self.rev_gpr_convs.append(
                    wrap(GATv2Conv((C, C), C // H, heads=H, concat=gene_concat, add_self_loops=False), gene_width))

        self.pool = AttentionalAggregation(
            gate_nn=nn.Sequential(nn.Linear(C, C // 2), nn.ReLU(), nn.Dropout(dropout), nn.Linear(C // 2, 1)),
            nn=nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Dropout(dropout)),
        )
        self.head = self._build_head(C, head_hidden_channels, head_num_layers, head_norm, head_activation,
                                     head_dropout)

    @staticmethod
    def _build_head(C: int, width: int, depth: int, norm: Optional[str], activation: str,
                    dropout: float) -> nn.Module:
        if depth == 0:
            return nn.Identity()
        dims = [C] + [width] * (depth - 1) + [2]
        layers = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                if norm is not None:
                    layers.append(_node_norm(norm, dims[i + 1]))
                layers += [make_activation(activation), nn.Dropout(dropout)]
        return nn.Sequential(*layers)

    # ------------------------------------------------------------------
    @classmethod
    def from_cell_graph(cls, cell_graph: HeteroData, **kwargs) -> "HeteroCell":
        """Size the embedding tables from a wildtype cell graph."""
        return cls(int(cell_graph["gene"].num_nodes), int(cell_graph["reaction"].num_nodes),
                   int(cell_graph["metabolite"].num_nodes), **kwargs)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs) -> "HeteroCell":
        """``cls(**config, **kwargs)`` (``config`` as in ``model.config``)."""
        return cls(**dict(config), **kwargs)

    # -- torchcell ------------------------------------------------------
    @classmethod
    def from_torchcell(cls, state_dict: Optional[Mapping[str, Tensor]], *, gene_num: int, reaction_num: int,
                       metabolite_num: int, hidden_channels: int, num_layers: int, out_channels: Any = None,
                       dropout: float = 0.1, norm: str = "layer", activation: str = "relu",
                       gene_encoder_config: Optional[Mapping] = None, metabolism_config: Optional[Mapping] = None,
                       prediction_head_config: Optional[Mapping] = None, gpr_conv_config: Optional[Mapping] = None,
                       **model_kwargs) -> "HeteroCell":
        """The model of a torchcell ``HeteroCell(gene_num, ..., gpr_conv_config)`` (its keyword
        arguments, meanings and defaults; see the module docstring for the mapping) with the
        original's ``state_dict`` loaded, so that ``forward`` gives the original's predictions.

        ``state_dict`` may be the model's own, a Lightning checkpoint (its ``"state_dict"``) or a
        ``state_dict`` whose keys carry a prefix such as ``"model."``; ``None`` builds the model
        without loading weights. The model takes the ``state_dict``'s floating dtype. Aliased entries (``preprocessor.mlp.5``,
        ``global_aggregator.aggregator.*``) must equal their canonical twins. ``model_kwargs`` go
        to the constructor (e.g. ``backend=`` of the fast model).
        """
        config = torchcell_config(gene_num=gene_num, reaction_num=reaction_num, metabolite_num=metabolite_num,
                                  hidden_channels=hidden_channels, num_layers=num_layers, out_channels=out_channels,
                                  dropout=dropout, norm=norm, activation=activation,
                                  gene_encoder_config=gene_encoder_config, metabolism_config=metabolism_config,
                                  prediction_head_config=prediction_head_config, gpr_conv_config=gpr_conv_config)
        model = cls(**config, **model_kwargs)
        if state_dict is not None:
            state_dict = _unwrap_state_dict(state_dict)
            weight = state_dict.get("gene_embedding.weight")
            if isinstance(weight, Tensor) and weight.is_floating_point():
                model = model.to(weight.dtype)  # the checkpoint's precision
            model.load_torchcell_state_dict(state_dict)
        return model

    def torchcell_kwargs(self) -> dict:
        """The torchcell ``HeteroCell`` constructor arguments of this model (inverse of
        :func:`torchcell_config`); raises for a configuration the original cannot express."""
        c = self.config
        self._check_torchcell_expressible()
        return {
            "gene_num": c["num_genes"], "reaction_num": c["num_reactions"], "metabolite_num": c["num_metabolites"],
            "hidden_channels": c["hidden_channels"], "out_channels": 2, "num_layers": c["num_layers"],
            "dropout": c["dropout"], "norm": c["norm"], "activation": c["activation"],
            "gene_encoder_config": {"heads": c["heads"], "concat": c["gene_concat"],
                                    "add_self_loops": c["gene_add_self_loops"]},
            "metabolism_config": {"is_stoich_gated": c["metabolism_gated"], "use_attention": c["metabolism_attention"],
                                  "heads": c["metabolism_heads"], "concat": c["metabolism_concat"]},
            "prediction_head_config": {"head_num_layers": c["head_num_layers"],
                                       "hidden_channels": c["head_hidden_channels"], "head_norm": c["head_norm"],
                                       "activation": c["head_activation"], "dropout": c["head_dropout"]},
            "gpr_conv_config": {"heads": c["gpr_heads"], "concat": c["gpr_concat"],
                                "add_self_loops": c["gpr_add_self_loops"]},
        }

    def _check_torchcell_expressible(self) -> None:
        c = self.config
        if c["metabolism_to_gene"]:
            raise ValueError("`metabolism_to_gene=True` has no torchcell counterpart (the original has no "
                             "reaction -> gene relation)")
        if c["norm"] is None:
            raise ValueError("`norm=None` has no torchcell counterpart (the original's preprocessor needs a norm)")
        if not c["metabolism_attention"] and c["metabolism_heads"] > 1 and c["metabolism_concat"]:
            raise ValueError("the original cannot run a metabolism conv without attention with heads > 1 and "
                             "concat (its bias has heads * C entries for a C-wide output)")

    def to_torchcell_state_dict(self) -> "OrderedDict[str, Tensor]":
        """This model's ``state_dict`` under the original's names, aliases included, in the
        original's order: loads strictly into the torchcell ``HeteroCell`` built from
        :meth:`torchcell_kwargs`."""
        self._check_torchcell_expressible()
        own = self.state_dict()
        out = OrderedDict()
        for key, value in own.items():
            if key.startswith(("pool.", "head.", "rev_gpr_convs.")):
                continue
            out[key] = value
        for suffix in ("gate_nn", "nn"):
            for key, value in own.items():
                if key.startswith(f"pool.{suffix}."):
                    rest = key[len(f"pool.{suffix}."):]
                    out[f"global_aggregator.{'transform_nn' if suffix == 'nn' else 'gate_nn'}.{rest}"] = value
        for suffix in ("gate_nn", "nn"):
            for key, value in own.items():
                if key.startswith(f"pool.{suffix}."):
                    out[f"global_aggregator.aggregator.{key[len('pool.'):]}"] = value
        for key, value in own.items():
            if key.startswith("head."):
                out["prediction_head." + key[len("head."):]] = value
        return out

    def _torchcell_aliases(self) -> dict:
        """torchcell key -> (own key, canonical torchcell key) for every torchcell entry."""
        own_keys = list(self.state_dict().keys())
        mapping = {}
        for key in own_keys:
            if key.startswith("rev_gpr_convs."):
                continue
            if key.startswith("pool.gate_nn."):
                rest = key[len("pool.gate_nn."):]
                canonical = f"global_aggregator.gate_nn.{rest}"
                mapping[canonical] = (key, canonical)
                mapping[f"global_aggregator.aggregator.gate_nn.{rest}"] = (key, canonical)
            elif key.startswith("pool.nn."):
                rest = key[len("pool.nn."):]
                canonical = f"global_aggregator.transform_nn.{rest}"
                mapping[canonical] = (key, canonical)
                mapping[f"global_aggregator.aggregator.nn.{rest}"] = (key, canonical)
            elif key.startswith("head."):
                mapping["prediction_head." + key[len("head."):]] = (key, "prediction_head." + key[len("head."):])
            elif key.startswith("preprocessor.mlp.5."):
                mapping[key] = (key, "preprocessor.mlp.1." + key[len("preprocessor.mlp.5."):])
            else:
                mapping[key] = (key, key)
        return mapping

    def load_torchcell_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a torchcell ``HeteroCell`` ``state_dict`` (strict: every key of the original's
        configuration, nothing else, shapes checked, aliases equal to their canonical twins)."""
        self._check_torchcell_expressible()
        state_dict = _unwrap_state_dict(state_dict)
        mapping = self._torchcell_aliases()
        missing = [k for k in mapping if k not in state_dict]
        unexpected = [k for k in state_dict if k not in mapping]
        own = self.state_dict()
        wrong = [f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(own[mapping[k][0]].shape)})"
                 for k in mapping if k in state_dict and tuple(state_dict[k].shape) != tuple(own[mapping[k][0]].shape)]
        if missing or unexpected or wrong:
            def show(items):
                return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            parts = []
            if missing:
                parts.append(f"missing keys: {show(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {show(unexpected)}")
            if wrong:
                parts.append(f"shape mismatches: {show(wrong)}")
            raise ValueError("the state_dict does not match the torchcell configuration given ("
                             + "; ".join(parts) + ")")
        for key, (_, canonical) in mapping.items():
            if key != canonical and not torch.equal(state_dict[key], state_dict[canonical]):
                raise ValueError(f"torchcell alias {key!r} differs from {canonical!r}: not a torchcell state_dict "
                                 f"(the original stores one tensor under both names)")
        converted = OrderedDict()
        for key, (own_key, canonical) in mapping.items():
            if key == canonical:
                converted[own_key] = state_dict[key]
        for key, (own_key, canonical) in mapping.items():  # the preprocessor alias: one module, two names
            if key != canonical and own_key not in converted:
                converted[own_key] = state_dict[canonical]
        for key in own:
            if key.startswith("rev_gpr_convs."):
                converted[key] = own[key]
        self.load_state_dict(converted, strict=True)

    # ------------------------------------------------------------------
    def _node_ids(self, graph: HeteroData, node_type: str) -> Tensor:
        store = graph[node_type]
        if "n_id" in store:
            return store.n_id
        return torch.arange(int(store.num_nodes), device=self.gene_embedding.weight.device)

    def forward_single(self, graph: HeteroData) -> Tensor:
        """Gene embeddings [n_genes, C] of one graph (the wildtype or a compacted batch)."""
        x = {
            "gene": self.preprocessor(self.gene_embedding(self._node_ids(graph, "gene"))),
            "reaction": self.reaction_embedding(self._node_ids(graph, "reaction")),
            "metabolite": self.metabolite_embedding(self._node_ids(graph, "metabolite")),
        }
        reaction_attr = x["reaction"]  # layer-0 reaction embeddings, every layer (the original's quirk)
        metabolism = graph[METABOLISM]
        edge_index_dict = {
            PHYSICAL: graph[PHYSICAL].edge_index,
            REGULATORY: graph[REGULATORY].edge_index,
            GPR: graph[GPR].edge_index,
            METABOLISM: metabolism.hyperedge_index,
        }
        num_reactions = x["reaction"].size(0)
        for layer, conv in enumerate(self.convs):
            out = conv(
                x, edge_index_dict,
                stoich_dict={METABOLISM: metabolism.stoichiometry},
                hyperedge_attr_dict={METABOLISM: reaction_attr},
                num_edges_dict={METABOLISM: num_reactions},
            )
            if self.metabolism_to_gene:
                summary = self._metabolite_summary(out["metabolite"], metabolism, num_reactions)
                rev = self.rev_gpr_convs[layer]
                out["gene"] = out["gene"] + rev((out["reaction"] + summary, x["gene"]), graph[GPR].edge_index.flip(0))
            x = out
        return x["gene"]

    @staticmethod
    def _metabolite_summary(m: Tensor, metabolism, num_reactions: int) -> Tensor:
        """``B_e * sum_{k: e_k = e} s_k m[v_k]`` per reaction (parameter free)."""
        met, rxn = metabolism.hyperedge_index[0], metabolism.hyperedge_index[1]
        s = metabolism.stoichiometry.to(m.dtype)
        inv = scatter(s.abs(), rxn, dim=0, dim_size=num_reactions, reduce="sum").reciprocal()
        inv = inv.masked_fill(torch.isinf(inv), 0.0)
        return inv.unsqueeze(-1) * scatter(s.unsqueeze(-1) * m[met], rxn, dim=0, dim_size=num_reactions, reduce="sum")

    def forward(self, cell_graph: HeteroData, batch: HeteroData) -> tuple[Tensor, dict]:
        """``(predictions [B, 2], {"z_w": [1, C], "z_i": [B, C], "z_p": [B, C], "fitness": [B, 1],
        "gene_interaction": [B, 1]})`` for a wildtype ``cell_graph`` and a compacted perturbation
        ``batch`` (:func:`stoichconv.perturb.perturb_batch` with ``layout="compacted"``)."""
        z_w = self.pool(self.forward_single(cell_graph))
        num_samples = int(batch.num_samples) if "num_samples" in batch else int(batch["gene"].ptr.numel() - 1)
        z_i = self.pool(self.forward_single(batch), batch["gene"].batch, dim_size=num_samples)
        z_p = z_w - z_i
        predictions = self.head(z_p)
        return predictions, {"z_w": z_w, "z_i": z_i, "z_p": z_p, "fitness": predictions[:, 0:1],
                             "gene_interaction": predictions[:, 1:2]}


# ----------------------------------------------------------------------------------------------
# torchcell configuration
# ----------------------------------------------------------------------------------------------
_GENE_KEYS = {"heads", "concat", "add_self_loops"}
_GENE_IGNORED = {"bias", "share_weights"}
_GPR_KEYS = {"heads", "concat", "add_self_loops"}
_METABOLISM_KEYS = {"is_stoich_gated", "use_attention", "heads", "concat"}
_HEAD_KEYS = {"head_num_layers", "hidden_channels", "head_norm", "activation", "dropout"}
_HEAD_IGNORED = {"residual"}


def _config_dict(name: str, value, required: bool, known: set, ignored: set) -> dict:
    if value is None:
        if required:
            raise TypeError(f"`{name}` must be a dict: the original calls `{name}.get(...)` (None crashes it)")
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a dict, got {type(value).__name__}")
    unknown = set(value) - known - ignored
    if unknown:
        warnings.warn(f"`{name}` keys {sorted(unknown)} are never read by the original model; ignored",
                      UserWarning, stacklevel=3)
    return dict(value)


def torchcell_config(*, gene_num: int, reaction_num: int, metabolite_num: int, hidden_channels: int,
                     num_layers: int, out_channels: Any = None, dropout: float = 0.1, norm: str = "layer",
                     activation: str = "relu", gene_encoder_config: Optional[Mapping] = None,
                     metabolism_config: Optional[Mapping] = None, prediction_head_config: Optional[Mapping] = None,
                     gpr_conv_config: Optional[Mapping] = None) -> dict:
    """This package's :class:`HeteroCell` keyword arguments for a torchcell ``HeteroCell`` built
    with these arguments (the original's names, meanings and defaults; ``out_channels`` and the
    ``bias`` / ``share_weights`` / ``residual`` keys are never read by the original)."""
    gene = _config_dict("gene_encoder_config", gene_encoder_config, True, _GENE_KEYS, _GENE_IGNORED)
    met = _config_dict("metabolism_config", metabolism_config, True, _METABOLISM_KEYS, set())
    gpr = _config_dict("gpr_conv_config", gpr_conv_config, False, _GPR_KEYS, set())
    head = _config_dict("prediction_head_config", prediction_head_config, False, _HEAD_KEYS, _HEAD_IGNORED)
    if norm not in NORMS:
        raise ValueError(f"torchcell `norm` must be one of {NORMS} (the original's preprocessor raises on "
                         f"anything else), got {norm!r}")
    met_attention = bool(met.get("use_attention", True))
    met_heads = met.get("heads", 1)
    met_concat = bool(met.get("concat", True))
    if not met_attention and met_heads > 1 and met_concat:
        raise ValueError("metabolism_config without attention, heads > 1 and concat: the original cannot run it "
                         "(its bias has heads * C entries for a C-wide output)")
    return dict(
        num_genes=gene_num, num_reactions=reaction_num, num_metabolites=metabolite_num,
        hidden_channels=hidden_channels, num_layers=num_layers, heads=gene.get("heads", 1), dropout=dropout,
        norm=norm, metabolism_to_gene=False, activation=activation,
        gene_concat=bool(gene.get("concat", True)), gene_add_self_loops=bool(gene.get("add_self_loops", False)),
        gpr_heads=gpr.get("heads", 1), gpr_concat=bool(gpr.get("concat", False)),
        gpr_add_self_loops=bool(gpr.get("add_self_loops", False)),
        metabolism_heads=met_heads if met_attention else 1, metabolism_concat=met_concat,
        metabolism_gated=bool(met.get("is_stoich_gated", False)), metabolism_attention=met_attention,
        head_num_layers=head.get("head_num_layers", 1), head_hidden_channels=head.get("hidden_channels", hidden_channels),
        head_norm=head.get("head_norm", norm), head_activation=head.get("activation", activation),
        head_dropout=head.get("dropout", dropout),
    )


def _unwrap_state_dict(obj: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """A model ``state_dict`` from a state_dict, a Lightning checkpoint (``"state_dict"``) or a
    state_dict whose keys share a prefix before ``gene_embedding.weight`` (e.g. ``"model."``)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if "gene_embedding.weight" in obj:
        return obj
    anchors = [k for k in obj if isinstance(k, str) and k.endswith(".gene_embedding.weight")]
    if len(anchors) == 1:
        prefix = anchors[0][: -len("gene_embedding.weight")]
        return OrderedDict((k[len(prefix):], v) for k, v in obj.items() if k.startswith(prefix))
    return obj
