"""The package layout: training and evaluation do not import the Hub code, and only the command lines print."""

from __future__ import annotations

import ast
from pathlib import Path

import grace_st

PACKAGE = Path(grace_st.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_training_and_evaluation_do_not_import_the_hub_code():
    for folder in ("training", "evaluation"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            hub = sorted(name for name in _imported_modules(path) if name.startswith("grace_st.hub"))
            assert not hub, f"{path.relative_to(PACKAGE)} imports {hub}; file names and schemas: grace_st.artifacts"


def test_only_the_command_lines_print():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "scripts":
            continue
        calls = [
            node.lineno
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
        ]
        assert not calls, f"{path.relative_to(PACKAGE)} prints at line(s) {calls}; a library module logs"
