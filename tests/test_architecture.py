"""The house in order: the package's imports (those inside functions included) form no cycle, and no module imports
one that stands later in the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# The pipeline, first to last; a module may import its own stage or an earlier one.
STAGES = (
    ("covidcxr", "covidcxr.config", "covidcxr.errors", "covidcxr.device", "covidcxr.formatting"),
    ("covidcxr.data",),
    ("covidcxr.lungs",),
    ("covidcxr.preprocess",),
    ("covidcxr.model",),
    ("covidcxr.trust",),
    ("covidcxr.scoring",),
    ("covidcxr.training",),
    ("covidcxr.evaluation",),
    ("covidcxr.deploy",),
    ("covidcxr.hospital",),
    ("covidcxr.experiment", "covidcxr.reproduce"),
    ("covidcxr.cli",),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "covidcxr").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def stage(module: str) -> int:
    best = max((prefix for names in STAGES for prefix in names
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, names in enumerate(STAGES) if best in names)


def imports(path: Path, known: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    for module, path in known.items():
        g.add_node(module)
        g.add_edges_from((module, target) for target in imports(path, set(known)) if target != module)
    return g


def test_every_module_has_a_stage(graph: nx.DiGraph) -> None:
    assert graph.number_of_nodes() > 30
    for module in graph:
        stage(module)


def test_no_import_cycles(graph: nx.DiGraph) -> None:
    assert list(nx.simple_cycles(graph)) == []


def test_no_import_runs_back_up_the_pipeline(graph: nx.DiGraph) -> None:
    backwards = [f"{a} -> {b}" for a, b in graph.edges if stage(b) > stage(a)]
    assert backwards == []


def _writes_to_the_terminal(node: ast.AST) -> bool:
    """A print() call, or a write to sys.stdout / sys.stderr: what only the CLI may do."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id == "print"
    return (isinstance(func, ast.Attribute) and func.attr == "write" and isinstance(func.value, ast.Attribute)
            and func.value.attr in ("stdout", "stderr") and isinstance(func.value.value, ast.Name)
            and func.value.value.id == "sys")


def test_only_the_cli_prints() -> None:
    """Library modules log (logging.getLogger(__name__)); the CLI configures the handlers and prints results."""
    found = [f"{module}:{node.lineno}" for module, path in modules().items()
             if not (module == "covidcxr.cli" or module.startswith("covidcxr.cli."))
             for node in ast.walk(ast.parse(path.read_text())) if _writes_to_the_terminal(node)]
    assert found == []


def test_the_print_rule_sees_prints_and_writes() -> None:
    tree = ast.parse("print('x')\nsys.stderr.write('y')\nlog.info('z')\nfh.write('w')\n")
    assert [node.lineno for node in ast.walk(tree) if _writes_to_the_terminal(node)] == [1, 2]
