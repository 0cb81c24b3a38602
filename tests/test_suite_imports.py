"""The suite's own layout: test modules share code through helpers.py (and fixtures through conftest.py), never by
importing one another or conftest."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (those inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_or_conftest():
    files = sorted(TESTS.glob("*.py")) + sorted((TESTS / "workers").glob("*.py"))
    assert TESTS / "helpers.py" in files and TESTS / "conftest.py" in files
    offenders = {str(f.relative_to(TESTS)): sorted(n for n in imported(f) if n.startswith("test_") or n == "conftest")
                 for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}
