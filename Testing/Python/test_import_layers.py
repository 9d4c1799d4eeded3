"""Imports flow one way, down: the library's lower layers never import its upper ones."""

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[2] / "MedSegSuiteLib"

# Packages a lower package must not import from (at module level or inside a function).
UPPER = {
    "networks": {"refine", "training", "slicer", "worker", "cli", "batch", "demo"},
    "inference": {"networks", "refine", "training", "slicer", "worker", "cli", "batch", "demo"},
    "models": {"inference", "refine", "training", "slicer", "worker", "cli", "batch", "demo"},
    "io": {"inference", "networks", "refine", "training", "slicer", "worker", "cli", "batch", "demo"},
}


def _imported_packages(path: Path) -> set[str]:
    """First-level MedSegSuiteLib packages that ``path`` imports from."""
    parts = path.relative_to(LIBRARY).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:-1])[: len(parts) - node.level]
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module.split(".")[0] if module else node.names[0].name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("MedSegSuiteLib."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("MedSegSuiteLib."))
    return found


@pytest.mark.parametrize("package", sorted(UPPER))
def test_package_imports_nothing_above_it(package):
    upward = {
        f"{path.relative_to(LIBRARY)} imports {name}"
        for path in sorted((LIBRARY / package).rglob("*.py"))
        for name in _imported_packages(path) & UPPER[package]
    }
    assert not upward, sorted(upward)


def test_the_scan_sees_relative_imports():
    # The HiDiff model imports its diffusion maths from beside it, which the scan must resolve.
    assert "networks" in _imported_packages(LIBRARY / "networks" / "hidiff_model.py")
    assert "networks" in _imported_packages(LIBRARY / "refine" / "refinement.py")
