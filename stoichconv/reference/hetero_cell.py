"""Reference HeteroCell ("difference" version) in plain PyTorch + PyG.

The model of ``shared/spec/hetero_cell.md`` (seeds 002/003, "Current (Difference) Version"):

* ``ForwardSingle(G)``: learnable embeddings per node type (gathered with ``G[t].n_id`` on a
  compacted perturbation batch, all rows on the wildtype); genes go through the
  :class:`PreProcessor` (2 x [Linear(C, C) -> ``torch.nn.LayerNorm`` (per node) -> ReLU ->
  Dropout]); then ``num_layers`` x ``HeteroConv(aggr="sum")`` over four relations, each wrapped
  by :class:`RelationWrapper` as ``conv -> proj -> norm -> act -> dropout``:

  - ``(gene, physical_interaction, gene)`` and ``(gene, regulatory_interaction, gene)``:
    ``GATv2Conv(C, C // H, heads=H, concat=True, add_self_loops=False)`` (proj = identity);
  - ``(gene, gpr, reaction)``: bipartite ``GATv2Conv((C, C), C, heads=H, concat=True,
    add_self_loops=False)`` (PyG's self-loop insertion pairs gene i with reaction i, which is
    meaningless for a bipartite relation, so it is off), proj = Linear(H*C, C);
  - ``(metabolite, reaction, metabolite)``: the reference
    :class:`~stoichconv.reference.StoichHypergraphConv` ``(C, C, is_stoich_gated=True,
    use_attention=True, heads=H, concat=True)``, proj = Linear(H*C, C), with
    ``hyperedge_attr`` = the *layer-0* reaction embeddings at every layer (the seed's quirk,
    kept for parity) and ``num_edges`` = the number of reaction nodes of ``G``.

  The "layer" norm is ``torch_geometric.nn.LayerNorm(C)`` in graph mode called without a batch
  vector: one mean and one std over all rows x channels of the tensor. On a compacted batch that
  is over the kept nodes of *all* samples together (the seed's behaviour, kept).
* ``forward(cell_graph, batch)``: ``z_w = pool(ForwardSingle(cell_graph))`` [1, C],
  ``z_i = pool(ForwardSingle(batch), batch["gene"].batch)`` [B, C], ``z_p = z_w - z_i``,
  ``predictions = head(z_p)`` [B, 2] (fitness, gene interaction). ``pool`` is
  ``AttentionalAggregation(gate_nn = Linear(C, C/2) -> ReLU -> Linear(C/2, 1),
  nn = Linear(C, C) -> ReLU)``; ``head`` is [Linear(C, C) -> ``torch.nn.LayerNorm`` -> ReLU] x
  (L - 1) then Linear(C, 2).

A fact of this design (kept on purpose, it is the seed's): genes receive messages only from the
gene-gene relations and only genes are pooled, so the GPR and metabolism relations, the reaction
and metabolite embeddings never reach the prediction; their parameters get no gradient
(``.grad`` stays ``None``). DDP then needs ``find_unused_parameters=True``.

``metabolism_to_gene=True`` (off by default) lets metabolism reach the prediction: every layer
gets a fifth relation ``(reaction, rev_gpr, gene)``, a ``GATv2Conv((C, C), C // H, heads=H,
concat=True, add_self_loops=False)`` along the reversed GPR edges, wrapped like the others and
summed into the genes. Its source features are the layer's new reaction features plus a
parameter-free summary of the layer's new metabolite features,
``r'_e + B_e * sum_{k: e_k = e} s_k m'_{v_k}`` (``B_e = 1 / sum |s_k|``, signed incidences),
so the metabolism conv, the GPR conv and both embeddings of the *same* layer reach the genes
and every parameter gets a gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import AttentionalAggregation, GATv2Conv, HeteroConv
from torch_geometric.nn import LayerNorm as GraphLayerNorm
from torch_geometric.utils import scatter

from stoichconv.data.relations import GPR, METABOLISM, NODE_TYPES, PHYSICAL, REGULATORY, REV_GPR
from stoichconv.reference.stoich_hypergraph_conv import StoichHypergraphConv

__all__ = ["HeteroCell", "PreProcessor", "RelationWrapper", "nan_mse_loss"]


def nan_mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the entries of ``target`` that are not NaN (0 if all are NaN)."""
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} must have one shape")
    valid = ~torch.isnan(target)
    diff = torch.where(valid, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return diff.pow(2).sum() / valid.sum().clamp_min(1)


class PreProcessor(nn.Module):
    """2 x [Linear(C, C) -> LayerNorm(C) (per node) -> ReLU -> Dropout]."""

    def __init__(self, channels: int, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        layers = []
        for _ in range(num_layers):
            layers += [nn.Linear(channels, channels), nn.LayerNorm(channels), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class RelationWrapper(nn.Module):
    """``conv -> proj -> norm -> act -> dropout``; proj is Linear(out_width, C) or identity,
    norm is ``torch_geometric.nn.LayerNorm(C)`` (graph mode, no batch vector) or identity."""

    def __init__(self, conv: nn.Module, out_width: int, channels: int, norm: Optional[str], dropout: float):
        super().__init__()
        self.conv = conv
        self.proj = nn.Linear(out_width, channels) if out_width != channels else nn.Identity()
        self.norm = GraphLayerNorm(channels) if norm == "layer" else nn.Identity()
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def post(self, out: Tensor) -> Tensor:
        return self.dropout(self.act(self.norm(self.proj(out))))

    def forward(self, *args, **kwargs) -> Tensor:
        return self.post(self.conv(*args, **kwargs))


class HeteroCell(nn.Module):
    """The reference HeteroCell (see the module docstring).

    Args:
        num_genes, num_reactions, num_metabolites: embedding table sizes (the wildtype's).
        hidden_channels: C (default 64).
        num_layers: L, the number of HeteroConv layers (default 3; also sets the head depth).
        heads: H (default 2); C must be divisible by H.
        dropout: dropout probability everywhere (default 0).
        norm: ``"layer"`` (default) or ``None`` for no relation norm.
        metabolism_to_gene: add the ``(reaction, rev_gpr, gene)`` relation (default False).
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
    ):
        super().__init__()
        for name, value in (("num_genes", num_genes), ("num_reactions", num_reactions),
                            ("num_metabolites", num_metabolites), ("hidden_channels", hidden_channels),
                            ("num_layers", num_layers), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if hidden_channels % heads != 0:
            raise ValueError(f"`hidden_channels` ({hidden_channels}) must be divisible by `heads` ({heads})")
        if hidden_channels < 2:
            raise ValueError(f"`hidden_channels` must be >= 2, got {hidden_channels}")
        if norm not in ("layer", None):
            raise ValueError(f"`norm` must be 'layer' or None, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout}")
        C, H = hidden_channels, heads
        self.hidden_channels, self.num_layers, self.heads = C, num_layers, H
        self.dropout, self.norm = dropout, norm
        self.metabolism_to_gene = metabolism_to_gene
        self.num_nodes = {"gene": num_genes, "reaction": num_reactions, "metabolite": num_metabolites}

        self.gene_embedding = nn.Embedding(num_genes, C)
        self.reaction_embedding = nn.Embedding(num_reactions, C)
        self.metabolite_embedding = nn.Embedding(num_metabolites, C)
        self.preprocessor = PreProcessor(C, num_layers=2, dropout=dropout)

        def wrap(conv, width):
            return RelationWrapper(conv, width, C, norm, dropout)

        self.convs = nn.ModuleList()
        self.rev_gpr_convs = nn.ModuleList()
        for _ in range(num_layers):
            self.convs.append(HeteroConv({
                PHYSICAL: wrap(GATv2Conv(C, C // H, heads=H, concat=True, add_self_loops=False), C),
                REGULATORY: wrap(GATv2Conv(C, C // H, heads=H, concat=True, add_self_loops=False), C),
                GPR: wrap(GATv2Conv((C, C), C, heads=H, concat=True, add_self_loops=False), H * C),
                METABOLISM: wrap(self.stoich_conv_class(C, C, is_stoich_gated=True, use_attention=True,
                                                        heads=H, concat=True), H * C),
            }, aggr="sum"))
            if metabolism_to_gene:
                self.rev_gpr_convs.append(
                    wrap(GATv2Conv((C, C), C // H, heads=H, concat=True, add_self_loops=False), C))

        self.pool = AttentionalAggregation(
            gate_nn=nn.Sequential(nn.Linear(C, C // 2), nn.ReLU(), nn.Linear(C // 2, 1)),
            nn=nn.Sequential(nn.Linear(C, C), nn.ReLU()),
        )
        head = []
        for _ in range(num_layers - 1):
            head += [nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU()]
        head.append(nn.Linear(C, 2))
        self.head = nn.Sequential(*head)

    # ------------------------------------------------------------------
    @classmethod
    def from_cell_graph(cls, cell_graph: HeteroData, **kwargs) -> "HeteroCell":
        """Size the embedding tables from a wildtype cell graph."""
        return cls(int(cell_graph["gene"].num_nodes), int(cell_graph["reaction"].num_nodes),
                   int(cell_graph["metabolite"].num_nodes), **kwargs)

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
        reaction_attr = x["reaction"]  # layer-0 reaction embeddings, every layer (parity quirk)
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
        """``(predictions [B, 2], {"z_w": [1, C], "z_i": [B, C], "z_p": [B, C]})`` for a
        wildtype ``cell_graph`` and a compacted perturbation ``batch``
        (:func:`stoichconv.perturb.perturb_batch` with ``layout="compacted"``)."""
        z_w = self.pool(self.forward_single(cell_graph))
        num_samples = int(batch.num_samples) if "num_samples" in batch else int(batch["gene"].ptr.numel() - 1)
        z_i = self.pool(self.forward_single(batch), batch["gene"].batch, dim_size=num_samples)
        z_p = z_w - z_i
        return self.head(z_p), {"z_w": z_w, "z_i": z_i, "z_p": z_p}
