"""Every public function and class of refimpl, kernels and book says what it does (issue 9's reading aid)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import book
import kernels
import refimpl

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for package in (refimpl, kernels, book):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):   # refimpl.ops.* too
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                    missing.append(f"{module.__name__}.{name}")
    assert not missing, "no docstring: " + ", ".join(missing)


def test_the_readme_layout_names_every_module_and_benchmark():
    from book import ROOT
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    files = [p for folder in ("refimpl", "kernels", "book", "benchmarks") for p in sorted((ROOT / folder).glob("*.py"))
             if p.name != "__init__.py"]
    assert files
    missing = [f"{p.parent.name}/{p.name}" for p in files if p.name not in layout]
    assert not missing, "README's layout section does not mention: " + ", ".join(missing)


def test_every_op_file_opens_with_its_source_shapes_glossary_and_limits():
    """refimpl/ops/<op>.py is where a reader meets an op: its docstring names the paper (or says there is none),
    its shapes, its symbols and what it leaves out."""
    import ast
    missing = []
    for path in sorted((ROOT / "refimpl" / "ops").glob("*.py")):
        if path.stem in ("__init__", "contract"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for needed in ("Shapes:", "Glossary", "Does not include"):
            if needed not in doc:
                missing.append(f"{path.name}: {needed}")
        if "arXiv" not in doc and "Source:" not in doc:
            missing.append(f"{path.name}: a paper (arXiv) or 'Source:'")
    assert not missing, "op docstrings lack: " + "; ".join(missing)
