"""The HeteroCell wildtype cell graph and random gene-deletion batches.

:func:`load_cell_graph` builds the cell graph at the sizes of the HeteroCell reference (see
:mod:`stoichconv.reference.hetero_cell`): 6607 genes, 4881 reactions, 2534 metabolites.

* **Metabolism** (``(gene, gpr, reaction)`` and ``(metabolite, reaction, metabolite)``) is yeast-GEM
  9.0.2 exactly, as built by :func:`stoichconv.data.load_yeast_gem`.
* **Genes.** The 1161 metabolic genes of yeast-GEM plus 5446 synthetic genes ``SYN0001`` ...
  ``SYN5446``, all sorted together by name (so ``Q0...`` mitochondrial genes come first, then the
  ``SYN`` genes, then the ``Y...`` nuclear genes). GPR row 0 is remapped into this numbering.
* **Gene-gene graphs.** SGD interactions are not available offline, so both are synthetic,
  generated from ``seed`` with a CPU ``torch.Generator``; the same seed gives identical tensors.

  - ``physical_interaction`` (undirected, 144211 edges): a Chung-Lu graph. Gene weights follow a
    power law ``w = rank^(-1/(gamma-1))`` with ``gamma = 2.3``, the ranks randomly permuted over
    genes. Endpoint pairs are drawn with probability proportional to ``w_u w_v`` in vectorised
    rounds, self-pairs dropped, unordered pairs de-duplicated, until enough distinct pairs exist;
    a uniform random subset of the required size is kept. 2000 self-loops (homodimers) on
    distinct random genes complete the count. Each unordered pair is stored once as
    ``(min, max)``; edges are sorted by (row, col). Degrees are heavy-tailed (median about 25,
    maximum in the thousands).
  - ``regulatory_interaction`` (directed, 16095 edges): 200 random genes act as regulators with
    Zipf out-weights ``1 / rank``; targets are uniform over all genes (autoregulation may occur).
    Ordered pairs are drawn in rounds, de-duplicated, and a uniform random subset of the required
    size is kept, sorted by (row, col). Few regulators have thousands of targets.

:func:`random_perturbations` draws a batch of gene-deletion sets in the CSR layout of
:mod:`stoichconv.ops.pert_mask`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch_geometric.data import HeteroData

from stoichconv.data.relations import GPR, METABOLISM, PHYSICAL, REGULATORY
from stoichconv.data.yeast_gem import load_yeast_gem

__all__ = ["load_cell_graph", "random_perturbations"]

NUM_GENES = 6607
NUM_PHYSICAL_EDGES = 144_211
NUM_PHYSICAL_SELF_LOOPS = 2_000
PHYSICAL_DEGREE_EXPONENT = 2.3
NUM_REGULATORY_EDGES = 16_095
NUM_REGULATORS = 200


def _sample_distinct_keys(draw, num_keys: int, generator: torch.Generator) -> torch.Tensor:
    """Collect ``num_keys`` distinct int64 keys from ``draw(m, generator)`` (which returns up to
    ``m`` keys per call), then keep a uniform random subset of exactly ``num_keys``, sorted."""
    keys = torch.empty(0, dtype=torch.long)
    while keys.numel() < num_keys:
        keys = torch.unique(torch.cat([keys, draw(2 * (num_keys - keys.numel()), generator)]))
    keep = torch.randperm(keys.numel(), generator=generator)[:num_keys]
    return keys[keep].sort().values


def _physical_edges(num_genes: int, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, num_genes + 1, dtype=torch.float64)
    weights = ranks.pow(-1.0 / (PHYSICAL_DEGREE_EXPONENT - 1.0))
    weights = weights[torch.randperm(num_genes, generator=generator)]

    def draw(m: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.multinomial(weights, m, replacement=True, generator=gen)
        v = torch.multinomial(weights, m, replacement=True, generator=gen)
        lo, hi = torch.minimum(u, v), torch.maximum(u, v)
        not_loop = lo != hi
        return lo[not_loop] * num_genes + hi[not_loop]

    pairs = _sample_distinct_keys(draw, NUM_PHYSICAL_EDGES - NUM_PHYSICAL_SELF_LOOPS, generator)
    loops = torch.randperm(num_genes, generator=generator)[:NUM_PHYSICAL_SELF_LOOPS]
    keys = torch.cat([pairs, loops * (num_genes + 1)]).sort().values
    return torch.stack([keys // num_genes, keys % num_genes]).contiguous()


def _regulatory_edges(num_genes: int, generator: torch.Generator) -> torch.Tensor:
    regulators = torch.randperm(num_genes, generator=generator)[:NUM_REGULATORS]
    out_weights = 1.0 / torch.arange(1, NUM_REGULATORS + 1, dtype=torch.float64)

    def draw(m: int, gen: torch.Generator) -> torch.Tensor:
        source = regulators[torch.multinomial(out_weights, m, replacement=True, generator=gen)]
        target = torch.randint(num_genes, (m,), generator=gen)
        return source * num_genes + target

    keys = _sample_distinct_keys(draw, NUM_REGULATORY_EDGES, generator)
    return torch.stack([keys // num_genes, keys % num_genes]).contiguous()


def load_cell_graph(seed: int = 0) -> HeteroData:
    """Build the wildtype cell graph (see the module docstring for the construction).

    Node types ``gene`` (6607), ``reaction`` (4881), ``metabolite`` (2534), each with
    ``num_nodes`` and ``node_ids`` (names). Edge types:

    * ``(gene, physical_interaction, gene).edge_index`` ``[2, 144211]``: undirected, each
      unordered pair once as ``(min, max)``, 2000 self-loops;
    * ``(gene, regulatory_interaction, gene).edge_index`` ``[2, 16095]``: directed;
    * ``(gene, gpr, reaction).edge_index`` ``[2, 5450]``: gene -> reaction node;
    * ``(metabolite, reaction, metabolite)``: ``hyperedge_index`` ``[2, 20960]`` (row 0
      metabolite, row 1 reaction node), ``stoichiometry`` ``[20960]`` float32, ``num_edges`` 4881.

    All indices are contiguous int64. ``seed`` only affects the synthetic gene-gene graphs.
    """
    network = load_yeast_gem()
    num_synthetic = NUM_GENES - network.num_genes
    gene_names = sorted(network.gene_names + [f"SYN{i:04d}" for i in range(1, num_synthetic + 1)])
    gene_ids = {name: i for i, name in enumerate(gene_names)}
    gem_to_cell = torch.tensor([gene_ids[name] for name in network.gene_names], dtype=torch.long)

    generator = torch.Generator().manual_seed(seed)
    data = HeteroData()
    data["gene"].num_nodes = NUM_GENES
    data["gene"].node_ids = gene_names
    data["reaction"].num_nodes = network.num_reactions
    data["reaction"].node_ids = list(network.reaction_names)
    data["metabolite"].num_nodes = network.num_metabolites
    data["metabolite"].node_ids = list(network.metabolite_names)

    data[PHYSICAL].edge_index = _physical_edges(NUM_GENES, generator)
    data[REGULATORY].edge_index = _regulatory_edges(
        NUM_GENES, generator
    )
    data[GPR].edge_index = torch.stack(
        [gem_to_cell[network.gpr_index[0]], network.gpr_index[1]]
    ).contiguous()
    metabolism = data[METABOLISM]
    metabolism.hyperedge_index = network.incidence.clone()
    metabolism.stoichiometry = network.stoich.clone()
    metabolism.num_edges = network.num_reactions
    return data


def random_perturbations(
    num_genes: int, batch_size: int, sizes: Sequence[int] = (1, 2, 3), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` random gene-deletion sets in CSR layout.

    Sample ``b`` draws its deletion count uniformly from ``sizes``, then that many *distinct* gene
    ids uniformly from ``[0, num_genes)`` (Floyd's algorithm, vectorised over samples; ids come in
    draw order, not sorted). Reproducible from ``seed``.

    Returns:
        ``(pert, pert_ptr)``: flat int64 gene ids ``[P]`` and int64 offsets ``[batch_size + 1]``;
        sample ``b`` deletes ``pert[pert_ptr[b]:pert_ptr[b + 1]]``. ``batch_size == 0`` gives an
        empty ``pert`` and ``pert_ptr == [0]``.

    Raises:
        ValueError: if ``num_genes <= 0``, ``batch_size < 0``, or ``sizes`` is empty or holds a
            size outside ``[0, num_genes]``.
    """
    if num_genes <= 0:
        raise ValueError(f"num_genes must be positive, got {num_genes}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be non-negative, got {batch_size}")
    sizes = [operator.index(size) for size in sizes]
    if not sizes:
        raise ValueError("sizes must not be empty")
    if any(size < 0 or size > num_genes for size in sizes):
        raise ValueError(f"sizes must lie in [0, num_genes={num_genes}], got {sizes}")

    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(len(sizes), (batch_size,), generator=generator)
    counts = torch.tensor(sizes, dtype=torch.long)[choice]
    max_count = max(sizes)
    chosen = torch.full((batch_size, max_count), -1, dtype=torch.long)
    # Floyd: for j = n-k .. n-1, draw t uniform in [0, j]; take t unless already taken, else j.
    for i in range(max_count):
        upper = num_genes - counts + i  # j, per sample
        draw = torch.rand(batch_size, dtype=torch.float64, generator=generator)
        t = torch.minimum((draw * (upper + 1)).long(), upper)
        taken = (chosen[:, :i] == t[:, None]).any(dim=1)
        pick = torch.where(taken, upper, t)
        chosen[:, i] = torch.where(i < counts, pick, chosen[:, i])
    pert = chosen[chosen >= 0].contiguous()
    pert_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return pert, pert_ptr
