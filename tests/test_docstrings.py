"""Every public function and class of refimpl, kernels and book says what it does (issue 9's reading aid)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import book
import kernels
import refimpl


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for package in (refimpl, kernels, book):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
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
