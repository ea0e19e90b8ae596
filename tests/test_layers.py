"""The package's import structure: no cycles inside a package, and the layer contract really bites.

``tests/test_lint.py`` runs ``lint-imports`` on the tree (the contracts in
pyproject.toml). These tests check what that contract cannot say, that no two
modules of one package import each other (directly or through others), and
that the contract fails when a lower layer imports a higher one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (tests/run.sh installs it)")

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _import_graph() -> nx.DiGraph:
    g = grimp.build_graph("rannc_py")
    out = nx.DiGraph()
    for m in g.modules:
        out.add_node(m)
        for dep in g.find_modules_directly_imported_by(m):
            out.add_edge(m, dep)
    return out


def _package_of(module: str) -> str:
    return module.rpartition(".")[0]


def test_no_import_cycles_inside_a_package() -> None:
    graph = _import_graph()
    packages = {_package_of(m) for m in graph}
    cycles = []
    for pkg in sorted(packages):
        # The modules directly inside pkg (its __init__ is pkg itself, and may import its own modules).
        inside = [m for m in graph if _package_of(m) == pkg]
        sub = graph.subgraph(inside)
        cycles += [sorted(c) for c in nx.strongly_connected_components(sub) if len(c) > 1]
    assert not cycles, f"modules that import each other: {cycles}"


def _copy_tree(tmp: Path) -> Path:
    shutil.copytree(REPO / "rannc_py", tmp / "rannc_py", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed in this environment (tests/run.sh installs it)")
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_layer_contract_holds_on_a_copy(tmp_path: Path) -> None:
    proc = _lint(_copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("lower", "upper"), [
    ("graph/ir.py", "rannc_py.runtime.module"),      # the IR reaching up to the runtime
    ("planner/cost.py", "rannc_py.profiling.measure"),  # the planner reaching into what runs models
    ("_util.py", "rannc_py.hardware.cluster"),        # the bottom reaching up
])
def test_an_upstream_import_breaks_the_contract(tmp_path: Path, lower: str, upper: str) -> None:
    tree = _copy_tree(tmp_path)
    path = tree / "rannc_py" / lower
    path.write_text(path.read_text() + f"\n\ndef _upstream() -> None:\n    import {upper}  # noqa: F401\n")
    proc = _lint(tree)
    assert proc.returncode != 0, f"lint-imports accepted `import {upper}` in {lower}:\n{proc.stdout}"
    assert "BROKEN" in proc.stdout and upper in proc.stdout, proc.stdout
