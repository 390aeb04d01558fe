"""Random metabolic hypergraphs for the tests: isolated metabolites, reactions
without incidences, repeated (metabolite, reaction) pairs, fractional and
negative stoichiometry."""

import torch


def random_hypergraph(num_metabolites=9, num_reactions=7, nnz=30, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # metabolite N-1 isolated, reaction M-1 empty
    metabolites = torch.randint(0, num_metabolites - 1, (nnz,), generator=gen)
    reactions = torch.randint(0, num_reactions - 1, (nnz,), generator=gen)
    metabolites[1], reactions[1] = metabolites[0], reactions[0]  # a repeated incidence
    stoich = torch.randn(nnz, generator=gen, dtype=dtype) * 2.5  # fractional, both signs
    stoich[2] = -3.0
    return torch.stack([metabolites, reactions]), stoich


def random_keep(batch_size, num_reactions, seed=0, p=0.3):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch_size, num_reactions, generator=gen) > p
    if batch_size > 1:
        keep[-1] = True  # one unmasked sample
    return keep
