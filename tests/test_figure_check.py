"""The figure check that book.save_figure runs: the defects a reader trips on are found on the drawn figure,
and a clean figure passes. (Every chapter's figures go through it when nbmake runs the notebooks.)"""

from __future__ import annotations

import importlib

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from book.figure_check import problems  # noqa: E402

chapters = importlib.import_module("book.chapters")


def _close(fig):
    plt.close(fig)


def test_a_clean_figure_passes():
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([1, 2, 3], [2, 4, 8], label="doubling")
    ax.set_yscale("log")
    ax.legend()
    assert problems(fig) == []
    _close(fig)


def test_crowded_tick_labels_are_found():
    fig, ax = plt.subplots(figsize=(5, 2))
    names = [f"a long case name {i}" for i in range(40)]
    ax.barh(names, range(40))
    found = problems(fig)
    assert any("y tick labels overlap" in p for p in found)
    _close(fig)


def test_a_blank_tick_label_is_found():
    fig, ax = plt.subplots()
    ax.imshow([[0, 1, 2]])
    ax.set_xticks(range(3), ["a", " ", "c"])
    assert any("x tick label is blank" in p for p in problems(fig))
    _close(fig)


def test_a_log_axis_with_one_label_is_found():
    fig, ax = plt.subplots()
    ax.loglog([8, 16, 32], [11, 12, 13])
    ax.minorticks_off()
    assert any("log-scaled y axis has" in p for p in problems(fig))
    _close(fig)


def test_overlapping_annotations_are_found():
    fig, ax = plt.subplots()
    ax.scatter([0.0, 1.0, 1.01, 10.0], [0.0, 1.0, 1.0, 10.0])           # two of them almost at one spot
    ax.annotate("INT6 (packed)", (1.0, 1.0))
    ax.annotate("INT6 in int8 bytes", (1.01, 1.0))
    assert any("text labels overlap" in p for p in problems(fig))
    _close(fig)


def test_a_figure_made_without_pyplot_is_checked_too():
    fig = Figure()
    ax = fig.add_subplot()
    ax.set_xticks(range(3), ["a", " ", "c"])
    assert any("blank" in p for p in problems(fig))


def test_save_figure_refuses_a_defective_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    fig, ax = plt.subplots()
    ax.set_xticks(range(3), ["a", " ", "c"])
    with pytest.raises(ValueError, match="figure 00_test/bad is not fit to print: .*blank"):
        chapters.save_figure(fig, "00_test", "bad")
    assert not (tmp_path / "figures" / "00_test" / "bad.png").exists()
    _close(fig)
