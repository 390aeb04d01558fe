"""Datasets: the yeast-GEM metabolic network, the HeteroCell wildtype cell graph and its
relation keys."""

from stoichconv.data.cell_graph import load_cell_graph, random_perturbations
from stoichconv.data.relations import (
    GENE_GENE_RELATIONS,
    GPR,
    METABOLISM,
    NODE_TYPES,
    PHYSICAL,
    REGULATORY,
    REV_GPR,
)
from stoichconv.data.yeast_gem import MetabolicNetwork, load_yeast_gem, parse_gene_rule

__all__ = [
    "GENE_GENE_RELATIONS",
    "GPR",
    "METABOLISM",
    "MetabolicNetwork",
    "NODE_TYPES",
    "PHYSICAL",
    "REGULATORY",
    "REV_GPR",
    "load_cell_graph",
    "load_yeast_gem",
    "parse_gene_rule",
    "random_perturbations",
]
