"""The package's shape: no import cycles (function-local imports counted), references that stand
alone, and a backend table that every op is declared in."""

from __future__ import annotations

import ast
import pathlib

import pytest

import stoichconv
from stoichconv.backends import BACKENDS, OPS, OpSpec

PACKAGE = pathlib.Path(stoichconv.__file__).parent
FAST_PATH = ("stoichconv.ops", "stoichconv.nn", "stoichconv.models", "stoichconv._C", "stoichconv.triton",
             "stoichconv.perturb", "stoichconv.backends", "stoichconv._extension")


COMPILED = ("stoichconv._C", "stoichconv._build_info")  # extension modules: they import no Python module


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The package module an import names (``from a import b`` may name module ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every stoichconv module ``module`` imports, at top level or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from a import b`: module a.b when it is one, else (a name defined in) module a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        if isinstance(node, ast.ImportFrom) and base == "stoichconv" and all(a.name in ("_C", "_build_info") for a in node.names):
            continue  # `from stoichconv import _C`: the compiled module, not the package's __init__
        for name in names:
            if name.startswith("stoichconv") and not name.startswith(COMPILED):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_no_import_cycle():
    # Edges to a parent package's __init__ (implied by any submodule import) are not imports
    # the code wrote; every written import counts, function-local ones included.
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("stoichconv.reference")))
def test_reference_imports_nothing_of_the_fast_path(module):
    bad = {n for n in GRAPH[module] if n.startswith(FAST_PATH)}
    assert not bad, f"{module} imports the fast path: {sorted(bad)}"


def test_a_cycle_would_be_found():
    # the detector itself: a two-module cycle in a fake graph is reported
    saved = dict(GRAPH)
    try:
        GRAPH["stoichconv.types"] = GRAPH["stoichconv.types"] | {"stoichconv.ops"}
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycle()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_every_op_folder_declares_its_spec():
    folders = {p.name for p in (PACKAGE / "ops").iterdir() if (p / "__init__.py").exists()}
    declared_folders = {name if name in folders else "pert_mask" for name in OPS}
    assert declared_folders == folders
    for spec in OPS.values():
        assert isinstance(spec, OpSpec)
        assert "reference" in spec.backends, f"{spec.name} has no reference"
        assert set(spec.backends) <= set(BACKENDS[1:])


def test_no_comment_points_outside_the_repository():
    for module, path in MODULES.items():
        text = path.read_text()
        for marker in ("shared/spec", "spec/stoich_conv.md", "spec/pert_mask.md", "spec/hetero_cell.md", "../shared"):
            assert marker not in text, f"{module} points at {marker!r}, outside the repository"


def test_relation_keys_are_defined_once():
    for module, path in MODULES.items():
        if module == "stoichconv.data.relations":
            continue
        text = path.read_text()
        for literal in ('"physical_interaction"', '"regulatory_interaction"', '("gene", "gpr", "reaction")',
                        '("metabolite", "reaction", "metabolite")'):
            assert literal not in text, f"{module} spells the relation key {literal} instead of importing it"
