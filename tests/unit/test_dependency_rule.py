"""The one-way dependency rule of DESIGN.md, read from every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the packages of ours it may import ("ferry" is the generated code of proto/)
ALLOWED = {
    "ferry": set(),
    "kvcache": {"ferry"},
    "router": {"kvcache", "ferry"},
    "workers": {"kvcache", "ferry"},
    "orchestrator": {"kvcache", "ferry", "router", "workers"},
}
SOURCE_DIRS = {
    "ferry": ROOT / "proto",
    "kvcache": ROOT / "kvcache",
    "router": ROOT / "router",
    "workers": ROOT / "workers",
    "orchestrator": ROOT / "orchestrator",
}
OURS = set(ALLOWED)


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def violations() -> list[str]:
    found = []
    for package, folder in SOURCE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            roots = imported_roots(path)
            for root in sorted(roots & OURS - {package} - ALLOWED[package]):
                found.append(f"{path.relative_to(ROOT)} imports {root}")
            if "ray" in roots and package != "orchestrator":
                found.append(f"{path.relative_to(ROOT)} imports ray (only orchestrator may)")
            if "proto" in roots:
                found.append(f"{path.relative_to(ROOT)} imports a top-level 'proto' module")
    return found


def test_no_import_against_the_dependency_rule():
    assert violations() == []


def test_checker_sees_a_violation(tmp_path, monkeypatch):
    bad = tmp_path / "router"
    bad.mkdir()
    (bad / "leak.py").write_text("import ray\nfrom workers.engine import engine\n")
    monkeypatch.setitem(SOURCE_DIRS, "router", bad)
    monkeypatch.setattr(
        "tests.unit.test_dependency_rule.ROOT", tmp_path, raising=True
    )
    assert violations() == [
        "router/leak.py imports workers",
        "router/leak.py imports ray (only orchestrator may)",
    ]
