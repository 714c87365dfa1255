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


# ----------------------------------------------------------------------------
# One name per op in every folder, and layers reach ops only through the package
# ----------------------------------------------------------------------------

HELPERS = {"refimpl/ops": {"__init__", "contract"}, "tests/ops": {"contract"}}  # shared, not ops


def _stems(folder: str, pattern: str, strip: str = "") -> set[str]:
    return {p.stem.removeprefix(strip) for p in (ROOT / folder).glob(pattern)} - HELPERS.get(folder, set())


def test_every_op_has_one_name_in_refimpl_kernels_and_tests():
    import kernels
    from refimpl import ops

    in_refimpl = _stems("refimpl/ops", "*.py")
    in_kernels = {module.__name__.rsplit(".", 1)[1] for module in kernels.OP_MODULES}
    with_cuda_c = _stems("kernels", "*.cu")
    in_tests = _stems("tests/ops", "test_*.py", strip="test_")
    assert in_refimpl == set(ops.SWAPPABLE), "refimpl/ops/ files and refimpl.ops.SWAPPABLE disagree"
    for where, names in (("kernels/*.py", in_kernels), ("kernels/*.cu", with_cuda_c), ("tests/ops/", in_tests)):
        assert names == in_refimpl, (f"{where} names {sorted(names ^ in_refimpl)} differently from refimpl/ops/ "
                                     f"(one name per op in every folder)")


def test_every_registered_op_is_a_swappable_name_of_its_file():
    import kernels
    from refimpl import ops

    swappable = {name for names in ops.SWAPPABLE.values() for name in names}
    assert set(kernels.registered()) == swappable
    for name in swappable:
        assert kernels.get(name, "reference") is getattr(ops, name)


def swappable_from_imports(path: Path, source: str | None = None) -> list[str]:
    """`from refimpl.ops[.x] import name` of a swappable op: a binding a swap would never reach."""
    from refimpl import ops

    swappable = {name for names in ops.SWAPPABLE.values() for name in names}
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refimpl.ops"):
            found += [f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}"
                      for alias in node.names if alias.name in swappable]
    return found


def test_layers_call_ops_through_the_package():
    layers = [p for p in sorted((ROOT / "refimpl").rglob("*.py")) if "ops" not in p.relative_to(ROOT).parts[1:-1]
              and p.parent.name != "ops"]
    wrong = [line for path in layers for line in swappable_from_imports(path)]
    assert not wrong, ("layers must call swappable ops as ops.<name>(...) so kernels.use reaches them:\n"
                       + "\n".join(wrong))


def test_the_layer_rule_sees_a_from_import():
    assert swappable_from_imports(ROOT / "refimpl" / "any.py", "from refimpl.ops import rms_norm, attention_mask\n")
    assert not swappable_from_imports(ROOT / "refimpl" / "any.py", "from refimpl.ops import attention_mask\n")
