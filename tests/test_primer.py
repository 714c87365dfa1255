"""Chapter 00 teaches every shared block, and the reader's path through the book holds together.

Counted from the notebooks (book.teaching): each primer section has its equation, the code shown with `show`, a
worked example that prints shapes, a saved picture and a checked exercise; every exercise is posed somewhere; the
glossary names every shape letter of the ops the primer teaches; every chapter says what it needs from the primer
and ends with what to read next.
"""

from __future__ import annotations

import importlib
import re

import pytest

import book
from book import teaching
from book.exercises import EXERCISES

PRIMER = book.ROOT / "notebooks" / "00_overview.ipynb"
SECTIONS = {1: "RMSNorm", 2: "RoPE", 3: "SwiGLU", 4: "Attention", 5: "mixture of experts", 6: "selective scan",
            7: "delta rule"}


def sections() -> dict[int, list[tuple[str, str]]]:
    """The primer's cells grouped by their `## N · ...` section."""
    grouped, current = {}, None
    for kind, text in teaching.cells(PRIMER):
        heading = re.match(r"## (\d+) · ", text) if kind == "markdown" else None
        if heading:
            current = int(heading.group(1))
        if current is not None:
            grouped.setdefault(current, []).append((kind, text))
    return grouped


@pytest.mark.parametrize("number", SECTIONS)
def test_each_primer_section_has_equation_code_example_picture_and_exercise(number):
    cells = sections()[number]
    heading = cells[0][1].splitlines()[0]
    assert SECTIONS[number].lower() in heading.lower(), heading
    markdown = " ".join(text for kind, text in cells if kind == "markdown")
    code = [text for kind, text in cells if kind == "code"]
    assert teaching.DISPLAY_MATH.search(markdown), f"{heading}: no equation"
    assert "| symbol | in the code |" in markdown, f"{heading}: no table mapping symbols to the code's names"
    assert any(teaching.SHOW_CALL.search(text) for text in code), f"{heading}: no cell shows the code that runs"
    assert any("list(" in text and ".shape" in text and "print(" in text for text in code), \
        f"{heading}: no worked example printing shapes"
    assert any("book.save_figure(" in text for text in code), f"{heading}: no picture"
    assert any(teaching.EXERCISE_CALL.search(text) and "check(" in text for text in code), f"{heading}: no exercise"
    assert re.search(r"Source: `(refimpl|kernels)/", markdown) and re.search(r"arXiv:\d{4}\.\d{4,5}", markdown), \
        f"{heading}: no link to its source file and paper"


def test_the_primer_is_short_cells_and_poses_every_exercise():
    counts = teaching.count(PRIMER)
    assert counts["code_cells_over_20_lines"] == 0
    posed = set()
    for path in book.chapters():
        for kind, text in teaching.cells(path):
            posed.update(re.findall(r"exercise\(\"(\w+)\"\)", text) if kind == "code" else [])
    assert posed == set(EXERCISES), f"exercises never posed: {set(EXERCISES) - posed}; unknown: {posed - set(EXERCISES)}"


def test_the_kernel_lesson_is_there():
    text = " ".join(t for _, t in teaching.cells(PRIMER))
    for needed in ("numba.prange", "get_thread_id", "blockIdx", "online", "roofline.measure", "check_and_swap",
                   "workers_rms_norm", "workers_attention"):
        assert needed in text, needed


def test_the_glossary_names_every_letter_of_the_primers_ops():
    glossary = next(t for k, t in teaching.cells(PRIMER) if k == "markdown" and "## Glossary" in t)
    defined = {cell.strip() for row in glossary.splitlines() if row.startswith("| ")
               for cell in row.split("|")[1].split(",")}
    def op_file(name):          # the module: `refimpl.ops.<name>` as an attribute is the function of that name
        return importlib.import_module(f"refimpl.ops.{name}")
    contracts = [op_file("rms_norm").RMS_NORM, op_file("attention").ATTENTION, op_file("moe").MOE_DISPATCH,
                 op_file("moe").MOE_COMBINE, op_file("selective_scan").SELECTIVE_SCAN,
                 op_file("gated_delta_rule").GATED_DELTA_RULE]
    letters = {letter for contract in contracts for letter in contract.letters}
    assert letters <= defined, f"letters used by the primer's ops but not in its glossary: {letters - defined}"


def test_the_map_names_every_chapter_and_every_chapter_says_where_to_go():
    primer = " ".join(t for _, t in teaching.cells(PRIMER))
    for path in book.chapters()[1:]:
        assert f"({path.name})" in primer, f"the primer's 'what to read next' does not link {path.name}"
        cells = teaching.cells(path)
        assert "from [the primer](00_overview.ipynb)" in cells[1][1], f"{path.stem}: no 'before this chapter'"
        assert teaching.count(path)["ends_with_what_to_read_next"], f"{path.stem}: no 'what to read next' at its end"
    henn = teaching.cells(book.ROOT / "notebooks" / "02_henn.ipynb")[1][1]
    assert "§7" in henn and "delta rule" in henn, "chapter 02 must point to the primer's delta-rule section"


def test_the_counts_are_what_the_notebook_holds(tmp_path):
    import json
    notebook = {"cells": [
        {"cell_type": "markdown", "source": ["# t\n", "$$a = b$$ and $$c$$ ```x = 1``` two words\n"]},   # 5 words
        {"cell_type": "code", "source": ["show(ops.rms_norm)\n", "plt.show()\n"]},
        {"cell_type": "code", "source": ["plt.show()\n"] * 21},
        {"cell_type": "code", "source": ["exercise(\"rope\")\n"]},
        {"cell_type": "markdown", "source": ["## What to read next\n"]}]}                              # 5 more
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(notebook))
    assert teaching.count(path) == {"equations": 2, "cells_showing_code": 1, "exercises": 1, "code_cells": 3,
                                    "code_cells_over_20_lines": 1, "markdown_words": 10,
                                    "ends_with_what_to_read_next": True}
