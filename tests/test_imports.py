"""Imports flow one way: `refimpl` (the ground truth) imports neither `kernels` nor `book`; `kernels` imports
`refimpl` but not `book`; `book`, the benchmarks and the notebooks may import both. Read from the source
(every import statement, at any depth, lazy ones inside functions too), not by importing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"refimpl": {"kernels", "book"}, "kernels": {"book"}}


def imported_packages(path: Path, source: str | None = None) -> set[str]:
    """The top-level package of every module `path` (or `source`, as if it were at `path`) imports; a relative
    import counts as its own package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(path.relative_to(ROOT).parts[0] if node.level else node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name in sorted(imported_packages(path) & FORBIDDEN[package])]
    assert not wrong, f"{package} must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(wrong)


def test_the_rule_sees_lazy_and_relative_imports():
    source = "def f():\n    from kernels import check\n    import book.chapters\nfrom . import ops\n"
    assert imported_packages(ROOT / "refimpl" / "any.py", source) == {"kernels", "book", "refimpl"}
