import importlib.resources
import re

import pytest
import torch

from stoichconv.data import MetabolicNetwork, load_yeast_gem, parse_gene_rule
from stoichconv.data.yeast_gem import _parse_formula


@pytest.fixture(scope="module")
def net() -> MetabolicNetwork:
    return load_yeast_gem()


@pytest.fixture(scope="module")
def rows() -> list[list[str]]:
    path = importlib.resources.files("stoichconv.data") / "yeast_gem" / "yeast-GEM.txt"
    text = path.read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines()[1:]]


def _incidences(net: MetabolicNetwork, node_name: str) -> dict[str, float]:
    node = net.reaction_names.index(node_name)
    sel = net.incidence[1] == node
    return {
        net.metabolite_names[m]: c
        for m, c in zip(net.incidence[0, sel].tolist(), net.stoich[sel].tolist())
    }


def _genes(net: MetabolicNetwork, node_name: str) -> set[str]:
    node = net.reaction_names.index(node_name)
    return {net.gene_names[g] for g in net.gpr_index[0, net.gpr_index[1] == node].tolist()}


# --------------------------------------------------------------------------- network


def test_exact_sizes(net):
    assert net.num_reactions == len(net.reaction_names) == 4881
    assert net.num_metabolites == len(net.metabolite_names) == 2534
    assert net.num_genes == len(net.gene_names) == 1161
    assert net.incidence.shape == (2, 20960)
    assert net.stoich.shape == (20960,)
    assert net.gpr_index.shape == (2, 5450)


def test_dtypes_and_layout(net):
    assert net.incidence.dtype == torch.long and net.incidence.is_contiguous()
    assert net.gpr_index.dtype == torch.long and net.gpr_index.is_contiguous()
    assert net.stoich.dtype == torch.float32 and net.stoich.is_contiguous()


def test_cached(net):
    assert load_yeast_gem() is net


def test_ids_in_range_and_names_unique(net):
    assert 0 <= int(net.incidence[0].min()) and int(net.incidence[0].max()) < net.num_metabolites
    assert 0 <= int(net.incidence[1].min()) and int(net.incidence[1].max()) < net.num_reactions
    assert 0 <= int(net.gpr_index[0].min()) and int(net.gpr_index[0].max()) < net.num_genes
    assert 0 <= int(net.gpr_index[1].min()) and int(net.gpr_index[1].max()) < net.num_reactions
    assert len(set(net.metabolite_names)) == net.num_metabolites
    assert len(set(net.reaction_names)) == net.num_reactions
    assert net.gene_names == sorted(set(net.gene_names))
    assert all(name.endswith("]") and "[" in name for name in net.metabolite_names)


def test_stoich_nonzero_finite(net):
    assert torch.isfinite(net.stoich).all()
    assert (net.stoich != 0).all()
    assert (net.stoich < 0).any() and (net.stoich > 0).any()


def test_every_node_has_incidence_and_gene(net):
    assert (torch.bincount(net.incidence[1], minlength=net.num_reactions) >= 1).all()
    assert (torch.bincount(net.gpr_index[1], minlength=net.num_reactions) >= 1).all()
    assert (torch.bincount(net.gpr_index[0], minlength=net.num_genes) >= 1).all()
    # no duplicate (metabolite, node) or (gene, node) pair
    inc_keys = net.incidence[0] * net.num_reactions + net.incidence[1]
    gpr_keys = net.gpr_index[0] * net.num_reactions + net.gpr_index[1]
    assert inc_keys.unique().numel() == inc_keys.numel()
    assert gpr_keys.unique().numel() == gpr_keys.numel()


def test_nodes_match_file(net, rows):
    with_rule = {r[0] for r in rows if r[2].strip()}
    reversible = {r[0] for r in rows if r[2].strip() and "<=>" in r[1]}
    assert {name.split("#")[0] for name in net.reaction_names} == with_rule
    rev_nodes = [name for name in net.reaction_names if name.endswith("#rev")]
    assert {name.split("#")[0] for name in rev_nodes} == reversible
    assert len(with_rule) == 2709


def test_r_0001_spot_check(net):
    assert [n for n in net.reaction_names if n.startswith("r_0001#")] == [
        "r_0001#and0",
        "r_0001#and1",
        "r_0001#and2",
        "r_0001#and3",
    ]
    assert net.reaction_names[0] == "r_0001#and0"
    assert _incidences(net, "r_0001#and0") == {
        "(R)-lactate[c]": -1.0,
        "ferricytochrome c[m]": -2.0,
        "ferrocytochrome c[m]": 2.0,
        "pyruvate[c]": 1.0,
    }
    assert _genes(net, "r_0001#and0") == {"YDL174C", "YEL039C"}
    assert _genes(net, "r_0001#and3") == {"YEL071W", "YJR048W"}
    assert net.metabolite_names[:4] == [
        "(R)-lactate[c]",
        "ferricytochrome c[m]",
        "ferrocytochrome c[m]",
        "pyruvate[c]",
    ]


def test_reversible_reaction_has_negated_reverse_node(net):
    forward = _incidences(net, "r_0003#and0")
    assert forward == {
        "(R,R)-2,3-butanediol[c]": -1.0,
        "NAD[c]": -1.0,
        "(R)-acetoin[c]": 1.0,
        "H+[c]": 1.0,
        "NADH[c]": 1.0,
    }
    assert _incidences(net, "r_0003#and0#rev") == {m: -c for m, c in forward.items()}
    assert _genes(net, "r_0003#and0#rev") == _genes(net, "r_0003#and0") == {"YAL060W"}
    forward_id = net.reaction_names.index("r_0003#and0")
    assert net.reaction_names[forward_id + 1] == "r_0003#and0#rev"
    assert not any(n.startswith("r_0001#") and n.endswith("#rev") for n in net.reaction_names)


def test_fractional_coefficients_and_compartments(net):
    inc = _incidences(net, "r_0438#and0")
    assert inc["H+[m]"] == pytest.approx(-1.266)
    assert inc["H+[c]"] == pytest.approx(0.633)
    assert inc["oxygen[m]"] == pytest.approx(-0.25)
    assert inc["H2O[m]"] == pytest.approx(0.5)


def test_no_absorption_in_network(net):
    # r_0016: "(YCL009C and YMR108W) or YMR108W" keeps both AND-sets
    assert _genes(net, "r_0016#and0") == {"YCL009C", "YMR108W"}
    assert _genes(net, "r_0016#and1") == {"YMR108W"}


# --------------------------------------------------------------------------- formulas


def test_parse_formula_terms():
    terms, reversible = _parse_formula("2 A b[c] + H+[c] + 1.2e-06 NADP(+)[m] <=> C, D (x)[e] ")
    assert reversible
    assert terms == [
        ("A b[c]", -2.0),
        ("H+[c]", -1.0),
        ("NADP(+)[m]", -1.2e-06),
        ("C, D (x)[e]", 1.0),
    ]


def test_parse_formula_empty_side_and_irreversible():
    assert _parse_formula("H2O[e] => ") == ([("H2O[e]", -1.0)], False)
    assert _parse_formula(" <=> 3 glucose[e]") == ([("glucose[e]", 3.0)], True)


def test_parse_formula_merges_repeated_metabolite():
    terms, _ = _parse_formula("A[c] + 2 H+[c] => B[c] + 3 H+[c]")
    assert terms == [("A[c]", -1.0), ("H+[c]", 1.0), ("B[c]", 1.0)]
    terms, _ = _parse_formula("A[c] + H+[c] => B[c] + H+[c]")
    assert terms == [("A[c]", -1.0), ("B[c]", 1.0)]


@pytest.mark.parametrize(
    "formula",
    ["A[c] + B[c]", "A[c] => B[c] => C[c]", "A => B[c]", "0 A[c] => B[c]", "A[c] + => B[c]"],
)
def test_parse_formula_malformed(formula):
    with pytest.raises(ValueError):
        _parse_formula(formula)


# --------------------------------------------------------------------------- gene rules


def _sets(*groups: str) -> list[frozenset[str]]:
    return [frozenset(g.split()) for g in groups]


def test_rule_single_gene_and_case():
    assert parse_gene_rule("YAL060W") == _sets("YAL060W")
    assert parse_gene_rule("  YLR154C-H  ") == _sets("YLR154C-H")
    assert parse_gene_rule("A AND B Or C") == _sets("A B", "C")


def test_rule_precedence():
    assert parse_gene_rule("A or B and C") == _sets("A", "B C")
    assert parse_gene_rule("A and B or C") == _sets("A B", "C")
    assert parse_gene_rule("A and (B or C)") == _sets("A B", "A C")


def test_rule_distribution_order():
    assert parse_gene_rule("(A or B) and (C or D)") == _sets("A C", "A D", "B C", "B D")
    assert parse_gene_rule("((A or B) and C) or (D and (E or F))") == _sets(
        "A C", "B C", "D E", "D F"
    )


def test_rule_duplicates_merged():
    assert parse_gene_rule("A or A") == _sets("A")
    assert parse_gene_rule("(A and B) or (B and A) or C") == _sets("A B", "C")
    assert parse_gene_rule("A and A") == _sets("A")
    assert parse_gene_rule("(A or B) and (B or A)") == _sets("A B", "A", "B")


def test_rule_no_absorption():
    assert parse_gene_rule("A or (A and B)") == _sets("A", "A B")
    assert parse_gene_rule("(A and B) or A") == _sets("A B", "A")


def test_rule_blank_means_no_genes():
    assert parse_gene_rule("") == []
    assert parse_gene_rule("   ") == []


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("(A or B", "missing ')'"),
        ("((A and B) or C", "missing ')'"),
        ("A or B)", "unexpected ')'"),
        ("A and", "dangling operator 'and'"),
        ("A or", "dangling operator 'or'"),
        ("or A", "no left operand"),
        ("A or and B", "no left operand"),
        ("A B", "expected 'and' or 'or'"),
        ("()", "expected a gene"),
        ("A and (B or)", "expected a gene"),
        ("A & B", "invalid gene name"),
    ],
)
def test_rule_malformed(rule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_gene_rule(rule)
