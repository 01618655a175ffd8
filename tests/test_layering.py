"""The import structure: each package imports only from the packages below it (README, Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "consistency_lens"

# Lower ranks are lower layers; a module may import its own rank or below, never above.
RANK = {
    "errors": 0,
    "config": 0,
    "utils": 1,
    "shipped": 1,
    "models": 2,
    "data": 3,
    "training": 4,
    "evaluation": 5,
    "serve": 6,
    "cli": 6,
    "demo": 6,
    "__main__": 6,
    "__init__": 6,
}


def _layer(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level consistency_lens subpackages/modules `path` imports, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "consistency_lens" and len(parts) > 1:
                found.add(parts[1])
            elif parts == ["consistency_lens"] and isinstance(node, ast.ImportFrom):
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_runs_back_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(path.relative_to(PACKAGE).parts)
        for target in _imports(path):
            if RANK[target] > RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert upward == []


def test_every_package_has_a_rank():
    layers = {_layer(p.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(RANK)
