"""Datasets: the yeast-GEM metabolic network and the HeteroCell wildtype cell graph."""

from stoichconv.data.cell_graph import load_cell_graph, random_perturbations
from stoichconv.data.yeast_gem import MetabolicNetwork, load_yeast_gem, parse_gene_rule

__all__ = [
    "MetabolicNetwork",
    "load_cell_graph",
    "load_yeast_gem",
    "parse_gene_rule",
    "random_perturbations",
]
