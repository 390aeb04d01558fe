"""The yeast-GEM 9.0.2 metabolic network as reaction nodes, metabolites and GPR pairs.

The bundled ``yeast_gem/yeast-GEM.txt`` (see ``yeast_gem/ATTRIBUTION.md``) is a tab-separated
table with one row per reaction: name, formula, gene rule, LB, UB, objective.
:func:`load_yeast_gem` turns it into the metabolic part of the HeteroCell cell graph:

* **Reactions** with an empty gene rule are skipped (1422 of 4131).
* **Reaction nodes.** The gene rule is parsed as a boolean expression (:func:`parse_gene_rule`)
  and brought to disjunctive normal form; every AND-set (one enzyme complex) becomes its own node
  ``<rxn>#and<k>`` (``k`` counts the AND-sets in DNF order). A reaction is reversible when its
  formula uses ``<=>``; each AND-set of a reversible reaction gets a second node
  ``<rxn>#and<k>#rev`` right after the forward one, with negated coefficients. (In 9.0.2 the arrow
  and ``LB < 0`` select exactly the same reactions, so either rule gives the same network.)
  Nodes follow file order, then DNF order, then forward before reverse.
* **DNF choices.** Identical AND-sets are merged (first occurrence kept); absorption is *not*
  applied, so ``(YCL009C and YMR108W) or YMR108W`` (r_0016) yields two nodes. Applying absorption
  would drop 25 nodes and 8 genes (4856 nodes, 1153 genes), away from the reference sizes.
  9.0.2 contains no duplicate AND-sets, so merging them does not change the counts.
* **Incidences.** A formula ``2 A[c] + B[m] => C[c]`` gives one incidence per metabolite term with
  a signed coefficient (negative on the left, positive on the right; the coefficient is 1 when not
  written and may be fractional, e.g. ``1.2e-06``). Sides may be empty (exchange reactions).
  Terms are split on ``" + "`` only, so ``H+[c]`` or ``NADP(+)[c]`` stay intact; every term must end
  in a ``[compartment]``. A metabolite listed more than once in one formula would get a single
  incidence with its net coefficient (dropped if zero); 9.0.2 has no such formula.
  Incidences follow node order, then formula order.
* **Metabolites** are those occurring in the kept reactions, named with their compartment
  (``H+[c]``), in order of first appearance. **Genes** are those of the kept AND-sets, sorted;
  each node's GPR pairs list its genes in gene-id order.

This yields exactly 4881 reaction nodes, 2534 metabolites, 20960 incidences, 5450 GPR pairs and
1161 genes, the sizes of the HeteroCell reference.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from dataclasses import dataclass

import torch

__all__ = ["MetabolicNetwork", "load_yeast_gem", "parse_gene_rule"]

_HEADER = ["Rxn name", "Formula", "Gene-reaction association", "LB", "UB", "Objective"]
_OPERATORS = ("and", "or")
_RULE_TOKEN = re.compile(r"\s*(?:(\()|(\))|([^\s()]+))")
_GENE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
_ARROW = re.compile(r"(?:^|\s)(<=>|=>)(?:\s|$)")
_TERM = re.compile(
    r"(?:(?P<coef>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s+)?(?P<name>\S.*\[[^\[\]\s]+\])"
)


def _tokenize_rule(rule: str) -> list[str]:
    tokens = []
    pos = 0
    while pos < len(rule):
        match = _RULE_TOKEN.match(rule, pos)
        if match is None:  # only trailing whitespace is left
            break
        token = match.group(match.lastindex)
        if match.lastindex == 3:
            word = token.lower()
            if word in _OPERATORS:
                token = word
            elif _GENE_NAME.fullmatch(token) is None:
                raise ValueError(f"invalid gene name {token!r} in gene rule {rule!r}")
        tokens.append(token)
        pos = match.end()
    return tokens


def _unique(sets):
    return list(dict.fromkeys(sets))


class _RuleParser:
    """Recursive descent over ``expr := term ('or' term)*``, ``term := atom ('and' atom)*``,
    ``atom := GENE | '(' expr ')'``; every production returns its DNF."""

    def __init__(self, rule: str):
        self.rule = rule
        self.tokens = _tokenize_rule(rule)
        self.pos = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _error(self, message: str) -> ValueError:
        return ValueError(f"malformed gene rule {self.rule!r}: {message}")

    def parse(self) -> list[frozenset[str]]:
        if not self.tokens:
            return []
        dnf = self._expr()
        token = self._peek()
        if token == ")":
            raise self._error("unbalanced parentheses, unexpected ')'")
        if token is not None:
            raise self._error(f"expected 'and' or 'or' before {token!r}")
        return dnf

    def _expr(self) -> list[frozenset[str]]:
        dnf = self._term()
        while self._peek() == "or":
            self.pos += 1
            dnf = _unique(dnf + self._term())
        return dnf

    def _term(self) -> list[frozenset[str]]:
        dnf = self._atom()
        while self._peek() == "and":
            self.pos += 1
            right = self._atom()
            dnf = _unique(left | other for left in dnf for other in right)
        return dnf

    def _atom(self) -> list[frozenset[str]]:
        token = self._peek()
        previous = self.tokens[self.pos - 1] if self.pos else None
        if token is None:
            if previous in _OPERATORS:
                raise self._error(f"dangling operator {previous!r} at the end")
            raise self._error("unbalanced parentheses, missing ')'")
        if token in _OPERATORS:
            where = f"after {previous!r}" if previous is not None else "at the start"
            raise self._error(f"operator {token!r} {where} has no left operand")
        if token == ")":
            raise self._error(f"expected a gene or '(' before ')' (after {previous!r})")
        self.pos += 1
        if token != "(":
            return [frozenset((token,))]
        dnf = self._expr()
        if self._peek() != ")":
            raise self._error("unbalanced parentheses, missing ')'")
        self.pos += 1
        return dnf


def parse_gene_rule(rule: str) -> list[frozenset[str]]:
    """Parse a boolean gene rule and return its disjunctive normal form as a list of AND-sets.

    ``and`` binds tighter than ``or`` (operators are case-insensitive); parentheses group.
    Conjunctions distribute over disjunctions, e.g. ``(A or B) and (C or D)`` gives
    ``[{A, C}, {A, D}, {B, C}, {B, D}]``. The order is deterministic: left operand before right
    operand, i.e. the order in which the expansion meets the sets.

    Identical AND-sets are merged, keeping the first occurrence (``A or A`` -> ``[{A}]``,
    ``(A and B) or (B and A)`` -> ``[{A, B}]``; repeated genes in one set collapse as well).
    Absorption is *not* applied: ``A or (A and B)`` -> ``[{A}, {A, B}]``, each AND-set being a
    distinct enzyme complex (this is what gives the reference yeast-GEM sizes).

    A blank rule means "no gene association" and gives ``[]``.

    Raises:
        ValueError: on a malformed rule (unbalanced parentheses, dangling or missing operator,
            empty parentheses, characters that cannot form a gene name).
    """
    return _RuleParser(rule).parse()


def _parse_side(side: str, sign: float, formula: str) -> list[tuple[str, float]]:
    side = side.strip()
    if not side:
        return []
    terms = []
    for term in side.split(" + "):
        match = _TERM.fullmatch(term.strip())
        if match is None:
            raise ValueError(
                f"cannot parse term {term!r} of formula {formula!r}: expected "
                "'[coefficient ]name[compartment]'"
            )
        coef = float(match["coef"]) if match["coef"] is not None else 1.0
        if not (coef > 0 and math.isfinite(coef)):
            raise ValueError(f"non-positive coefficient in term {term!r} of formula {formula!r}")
        terms.append((match["name"], sign * coef))
    return terms


def _parse_formula(formula: str) -> tuple[list[tuple[str, float]], bool]:
    """Return ``([(metabolite, signed coefficient), ...], reversible)`` for one formula."""
    parts = _ARROW.split(formula)
    if len(parts) != 3:
        raise ValueError(f"formula {formula!r} must contain exactly one '=>' or '<=>'")
    left, arrow, right = parts
    net: dict[str, float] = {}
    for name, coef in _parse_side(left, -1.0, formula) + _parse_side(right, 1.0, formula):
        net[name] = net.get(name, 0.0) + coef
    return [(name, coef) for name, coef in net.items() if coef != 0.0], arrow == "<=>"


@dataclass(frozen=True, eq=False)
class MetabolicNetwork:
    """Reaction nodes, metabolites and genes of a metabolic model (see the module docstring).

    Attributes:
        metabolite_names: ``N_m`` names with compartment, e.g. ``"H+[c]"``.
        reaction_names: ``N_r`` reaction-node names, ``"<rxn>#and<k>"`` or ``"<rxn>#and<k>#rev"``.
        gene_names: ``N_g`` sorted gene names.
        incidence: ``[2, nnz]`` int64; row 0 metabolite id, row 1 reaction-node id.
        stoich: ``[nnz]`` float32 signed coefficients (negative consumed, positive produced).
        gpr_index: ``[2, n_gpr]`` int64; row 0 gene id, row 1 reaction-node id.

    The instance returned by :func:`load_yeast_gem` is shared (cached): do not mutate it.
    """

    metabolite_names: list[str]
    reaction_names: list[str]
    gene_names: list[str]
    incidence: torch.Tensor
    stoich: torch.Tensor
    gpr_index: torch.Tensor

    @property
    def num_metabolites(self) -> int:
        return len(self.metabolite_names)

    @property
    def num_reactions(self) -> int:
        return len(self.reaction_names)

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)


def _build_network(text: str) -> MetabolicNetwork:
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != _HEADER:
        raise ValueError(f"unexpected yeast-GEM header, expected the columns {_HEADER}")

    metabolite_ids: dict[str, int] = {}
    reaction_names: list[str] = []
    incidences: list[tuple[int, int, float]] = []  # (metabolite id, node id, coefficient)
    gpr_names: list[tuple[str, int]] = []  # (gene name, node id)
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(_HEADER):
            raise ValueError(f"line {line_no}: expected {len(_HEADER)} tab-separated fields")
        name, formula, rule = fields[0], fields[1], fields[2]
        and_sets = parse_gene_rule(rule)
        if not and_sets:
            continue
        terms, reversible = _parse_formula(formula)
        term_ids = [(metabolite_ids.setdefault(m, len(metabolite_ids)), c) for m, c in terms]
        directions = [("", 1.0), ("#rev", -1.0)] if reversible else [("", 1.0)]
        for k, genes in enumerate(and_sets):
            for suffix, sign in directions:
                node = len(reaction_names)
                reaction_names.append(f"{name}#and{k}{suffix}")
                incidences.extend((m, node, sign * c) for m, c in term_ids)
                gpr_names.extend((gene, node) for gene in sorted(genes))

    gene_names = sorted({gene for gene, _ in gpr_names})
    gene_ids = {gene: i for i, gene in enumerate(gene_names)}
    incidence = torch.tensor([[m for m, _, _ in incidences], [r for _, r, _ in incidences]])
    stoich = torch.tensor([c for _, _, c in incidences], dtype=torch.float32)
    gpr_index = torch.tensor([[gene_ids[g] for g, _ in gpr_names], [r for _, r in gpr_names]])
    return MetabolicNetwork(
        metabolite_names=list(metabolite_ids),
        reaction_names=reaction_names,
        gene_names=gene_names,
        incidence=incidence.to(torch.long).contiguous(),
        stoich=stoich.contiguous(),
        gpr_index=gpr_index.to(torch.long).contiguous(),
    )


@functools.lru_cache(maxsize=None)
def load_yeast_gem() -> MetabolicNetwork:
    """Load the bundled yeast-GEM 9.0.2 network (parsed once, then cached; do not mutate it).

    Sizes: 4881 reaction nodes, 2534 metabolites, 20960 incidences, 5450 GPR pairs, 1161 genes.
    """
    path = importlib.resources.files(__package__) / "yeast_gem" / "yeast-GEM.txt"
    return _build_network(path.read_text(encoding="utf-8"))
