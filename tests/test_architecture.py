"""The one-way dependency rule of ARCHITECTURE.md, checked on every import in the code.

cli -> gateway, workers -> shared -> schemas. Inside shared/, the plumbing (infra) knows no
concern, keys know only the plumbing, and callbacks know nothing of tasks or email.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package (a folder under the repo root, or a subpackage of shared) -> what it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "schemas": ("cli", "gateway", "workers", "shared"),
    "shared": ("cli", "gateway", "workers"),
    "shared/infra": ("shared.keys", "shared.callbacks", "shared.tasks", "shared.email"),
    "shared/keys": ("shared.callbacks", "shared.tasks", "shared.email"),
    "shared/callbacks": ("shared.tasks", "shared.email"),
    "gateway": ("cli", "workers"),
    "workers": ("cli", "gateway"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(module == f or module.startswith(f"{f}.") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package: str) -> None:
    assert (ROOT / package).is_dir()
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from gateway.app import create_app\n")
    assert "gateway.app" in imported_modules(module)


def test_shared_keeps_at_most_a_dozen_loose_modules() -> None:
    loose = [p.name for p in (ROOT / "shared").glob("*.py") if p.name != "__init__.py"]
    assert len(loose) <= 12, loose
