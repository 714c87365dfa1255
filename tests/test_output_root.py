"""Only `make book` writes the committed figures/: a chapter run by hand writes under build/interactive/."""

from __future__ import annotations

import importlib

chapters = importlib.import_module("book.chapters")       # the module (book.chapters is also a function's name)


def test_by_hand_figures_go_under_build(monkeypatch):
    monkeypatch.delenv("BOOK_OUTPUT_DIR", raising=False)
    assert chapters.output_root() == chapters.ROOT / "build" / "interactive"
    monkeypatch.setenv("BOOK_OUTPUT_DIR", "/tmp/elsewhere")
    assert str(chapters.output_root()) == "/tmp/elsewhere"


def test_make_book_points_the_output_at_the_repository(monkeypatch):
    monkeypatch.setenv("BOOK_OUTPUT_DIR", "recorded")     # so that teardown restores the variable main() sets
    monkeypatch.delenv("BOOK_OUTPUT_DIR")
    seen = {}
    monkeypatch.setattr(chapters, "publish", lambda build_dir: seen.setdefault("root", chapters.output_root()))
    assert chapters.main(["--publish-only", "--build-dir", "/tmp/unused"]) == 0
    assert seen["root"] == chapters.ROOT
