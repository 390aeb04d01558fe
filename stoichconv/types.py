"""Result and structure types shared by the fast ops and their references.

A neutral module: it imports nothing of ``stoichconv`` so that :mod:`stoichconv.reference`
and :mod:`stoichconv.ops` can both use these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["EdgeSet", "FilteredBipartite", "FilteredEdges", "KeptNodes", "StoichPlan"]


@dataclass(frozen=True)
class StoichPlan:
    """Preprocessed incidence structure of one metabolic hypergraph, built by
    :func:`stoichconv.ops.build_stoich_plan` (semantics: :mod:`stoichconv.ops.stoich_conv`).

    ``reaction_perm`` lists the incidences sorted (stably) by reaction with ``reaction_ptr``
    [M + 1] its CSR row pointer; ``metabolite_perm`` / ``metabolite_ptr`` [N + 1] the same by
    metabolite.

    ``checked`` records that the plan is consistent (set by the builder; a plan constructed by
    hand is checked in full, once, by the first op that receives it). Moving the plan keeps it."""

    metabolite_index: Tensor  # [nnz] int64
    reaction_index: Tensor  # [nnz] int64
    stoich: Tensor  # [nnz] signed coefficients
    abs_stoich: Tensor  # [nnz] |s|, the degree weights
    reaction_ptr: Tensor  # [M + 1] int64
    reaction_perm: Tensor  # [nnz] int64
    metabolite_ptr: Tensor  # [N + 1] int64
    metabolite_perm: Tensor  # [nnz] int64
    num_metabolites: int
    num_reactions: int
    checked: bool = field(default=False, repr=False, compare=False)

    @property
    def nnz(self) -> int:
        return self.metabolite_index.numel()

    @property
    def device(self) -> torch.device:
        return self.metabolite_index.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "StoichPlan":
        """Move the plan; ``dtype`` changes the stoichiometry's float dtype."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device=device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            values[f.name] = value
        return type(self)(**values)

    def structure(self) -> tuple[Tensor, ...]:
        """The structural tensors in the order the operators take them."""
        return (
            self.metabolite_index,
            self.reaction_index,
            self.reaction_ptr,
            self.reaction_perm,
            self.metabolite_ptr,
            self.metabolite_perm,
        )


class FilteredEdges(NamedTuple):
    """Result of :func:`stoichconv.perturb.filter_edges` (semantics: :mod:`stoichconv.ops.pert_mask`)."""

    edge_index: Tensor  # [2, E_out] int64
    edge_ptr: Tensor  # [B + 1] int64
    edge_keep: Tensor  # [B * E] bool
    node_keep: Tensor  # [B * N] bool
    node_ptr: Tensor  # [B + 1] int64


class FilteredBipartite(NamedTuple):
    """Result of :func:`stoichconv.perturb.filter_bipartite` (semantics: :mod:`stoichconv.ops.pert_mask`)."""

    edge_index: Tensor  # [2, E_out] int64
    edge_ptr: Tensor  # [B + 1] int64
    edge_keep: Tensor  # [B * E] bool
    edge_id: Tensor  # [E_out] int64, wildtype edge position


class KeptNodes(NamedTuple):
    """Result of :func:`stoichconv.ops.pert_mask.kept_nodes` (semantics: :mod:`stoichconv.ops.pert_mask`)."""

    batch: Tensor  # [K] int64, the sample of each kept node
    n_id: Tensor  # [K] int64, its wildtype id
    ptr: Tensor  # [B + 1] int64, per-sample offsets


@dataclass
class EdgeSet:
    """Edges of one GATv2 relation sorted by output row (semantics: :mod:`stoichconv.ops.gatv2`):
    ``src`` indexes ``x_l``, ``dst`` indexes ``x_r``, ``row`` the output row (non-decreasing)
    with ``crow`` [num_rows + 1] its CSR pointer. ``dst`` and ``row`` differ when the
    destination features are shared by all samples (layer 1) while the outputs are per sample."""

    src: Tensor
    dst: Tensor
    row: Tensor
    crow: Tensor
    num_rows: int

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    def chunks(self, step: int) -> list:
        """``(start, stop, src_lo, src_hi, dst_lo, dst_hi, row_lo, row_hi)`` per chunk of ``step``
        edges: accumulations go into the narrow slices ``[lo, hi)`` (cached)."""
        cache = self.__dict__.setdefault("_chunks", {})
        if step not in cache:
            E = self.num_edges
            bounds = []
            if E:
                starts = torch.arange(0, E, step, device=self.src.device)
                stacked = torch.stack([self.src, self.dst, self.row])
                pad = (-E) % step
                stacked = torch.cat([stacked, stacked[:, -1:].expand(3, pad)], dim=1).view(3, -1, step)
                lo, hi = stacked.amin(-1), stacked.amax(-1) + 1
                info = torch.cat([starts.view(1, -1), lo, hi]).t().tolist()
                for start, sl, dl, rl, sh, dh, rh in info:
                    bounds.append((start, min(start + step, E), sl, sh, dl, dh, rl, rh))
            cache[step] = bounds
        return cache[step]
