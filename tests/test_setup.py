"""The set-up files agree with each other and with the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_requirements_pin_torch_and_name_the_design_card_packages():
    reqs = _requirements()
    names = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in reqs}
    assert "torch==2.13.0" in reqs
    for package in ("numpy", "numba", "numba-cuda", "cupy-cuda12x", "jupyterlab", "ipywidgets", "matplotlib",
                    "papermill", "nbmake", "ipykernel", "tqdm", "pytest"):
        assert package in names, package


def test_environment_yml_installs_requirements_and_the_project():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip_section == ["-r requirements.txt", "-e ."]
    # nothing installed twice under two spellings: conda lists only python and pip
    assert [d for d in deps if isinstance(d, str)] == ["python=3.11", "pip"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)


def test_notebooks_are_committed_without_outputs_and_with_a_parameters_cell():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{path.name} has outputs"
        assert "parameters" in code[0].get("metadata", {}).get("tags", []), f"{path.name}: first code cell must be tagged parameters"
        assert "BOOK_PROFILE" in "".join(code[0]["source"]), f"{path.name}: PROFILE must default from BOOK_PROFILE"
