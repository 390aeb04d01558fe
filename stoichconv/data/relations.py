"""Relation keys of the HeteroCell cell graph, defined once and imported everywhere else.

Node types: ``"gene"``, ``"reaction"``, ``"metabolite"``. Relations (PyG ``(src, name, dst)`` keys):

* :data:`PHYSICAL`, :data:`REGULATORY`: the gene-gene graphs (``edge_index`` [2, E]);
* :data:`GPR`: gene -> reaction pairs of the gene-protein-reaction rules (``edge_index``);
* :data:`METABOLISM`: the signed metabolic incidence (``hyperedge_index`` [2, nnz], row 0
  metabolite, row 1 reaction, and ``stoichiometry`` [nnz]);
* :data:`REV_GPR`: reaction -> gene along reversed GPR pairs (the optional
  ``metabolism_to_gene`` relation of the HeteroCell models).
"""

PHYSICAL = ("gene", "physical_interaction", "gene")
REGULATORY = ("gene", "regulatory_interaction", "gene")
GENE_GENE_RELATIONS = (PHYSICAL, REGULATORY)
GPR = ("gene", "gpr", "reaction")
METABOLISM = ("metabolite", "reaction", "metabolite")
REV_GPR = ("reaction", "rev_gpr", "gene")
NODE_TYPES = ("gene", "reaction", "metabolite")

__all__ = ["GENE_GENE_RELATIONS", "GPR", "METABOLISM", "NODE_TYPES", "PHYSICAL", "REGULATORY", "REV_GPR"]
