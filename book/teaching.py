"""What a chapter teaches, counted from its notebook: equations, cells that show the code that runs, exercises,
long code cells, words of prose, and whether it ends by saying what to read next.

    python -m book.teaching            # a table, one row per chapter
    book.teaching.count(path)          # the same numbers for one notebook, as a dict

The counts are the ones issue 18 set out (DESIGN.md, "Notebooks: they teach"): an equation is a display block
(`$$ ... $$`) in a Markdown cell; a cell shows code when it calls `show(...)` (not `plt.show()`); an exercise is a
cell that calls `exercise(...)`; a long cell has more than 20 lines; words are counted in Markdown outside
equations and code fences.

Does not include: any judgement of whether the prose is good; these numbers only say whether the parts are there.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LONG_CELL_LINES = 20
SHOW_CALL = re.compile(r"(?<![\w.])show\(")
EXERCISE_CALL = re.compile(r"(?<![\w.])exercise\(")
DISPLAY_MATH = re.compile(r"\$\$.+?\$\$", re.S)
CODE_FENCE = re.compile(r"```.*?```", re.S)


def cells(path: Path) -> list[tuple[str, str]]:
    """(cell type, source text) for every cell of the notebook at `path`."""
    notebook = json.loads(Path(path).read_text())
    return [(cell["cell_type"], "".join(cell["source"])) for cell in notebook["cells"]]


def count(path: Path) -> dict:
    """The teaching counts of one notebook (see the module docstring)."""
    all_cells = cells(path)
    code = [text for kind, text in all_cells if kind == "code"]
    markdown = [text for kind, text in all_cells if kind == "markdown"]
    prose = " ".join(CODE_FENCE.sub(" ", DISPLAY_MATH.sub(" ", text)) for text in markdown)
    last_markdown = markdown[-1] if markdown else ""
    return {
        "equations": sum(len(DISPLAY_MATH.findall(text)) for text in markdown),
        "cells_showing_code": sum(bool(SHOW_CALL.search(text)) for text in code),
        "exercises": sum(len(EXERCISE_CALL.findall(text)) for text in code),
        "code_cells": len(code),
        "code_cells_over_20_lines": sum(len(text.splitlines()) > LONG_CELL_LINES for text in code),
        "markdown_words": len(prose.split()),
        "ends_with_what_to_read_next": "what to read next" in last_markdown.lower(),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the counts of every chapter as a Markdown table."""
    from book.chapters import chapters

    names = ["equations", "cells_showing_code", "exercises", "code_cells", "code_cells_over_20_lines",
             "markdown_words", "ends_with_what_to_read_next"]
    print("| chapter | " + " | ".join(n.replace("_", " ") for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for path in chapters():
        counts = count(path)
        print(f"| {path.stem} | " + " | ".join(str(counts[n]) for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
