"""What `make book` publishes: the README's front page matches the chapters' metrics (the site itself:
tests/test_site.py)."""

import base64
import json

import pytest

import book
from book import edition

PNG = base64.b64decode(  # a 1×1 PNG: a stand-in figure
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


def test_every_chapter_has_a_front_page_entry():
    assert [p.stem for p in book.chapters()] == list(edition.CHAPTERS)


def test_readme_front_page_matches_the_committed_metrics():
    readme = (edition.ROOT / "README.md").read_text()
    start, end = readme.index(edition.START), readme.index(edition.END) + len(edition.END)
    assert readme[start:end] == edition.front_page(edition.ROOT / "figures"), \
        "README's front page is stale: run `make book` (or `python -m book --publish-only`)"


def test_every_claim_of_every_chapter_is_on_the_front_page():
    readme = (edition.ROOT / "README.md").read_text()
    count = 0
    for chapter in edition.CHAPTERS:
        record = edition.chapter_record(edition.ROOT / "figures", chapter)
        assert record is not None, f"figures/{chapter}/metrics.json is missing: the chapter has not run at `small`"
        for claim in record["metrics"].get("claims", []):
            row = edition._cell(claim["claim"]) + " | " + edition._cell(claim["measured"]) + " | " \
                + edition._cell(claim["verdict"])
            assert row in readme, f"{chapter}: {claim['claim']!r} is not on the front page as measured"
            count += 1
        figure = edition.ROOT / "figures" / chapter / f"{edition.CHAPTERS[chapter]['figure']}.png"
        assert figure.exists() and f"figures/{chapter}/{figure.name}" in readme
    assert count >= 20, f"only {count} claims across the book"


def _fake_chapter(figures_root, chapter, claims):
    folder = figures_root / chapter
    folder.mkdir(parents=True)
    (folder / f"{edition.CHAPTERS[chapter]['figure']}.png").write_bytes(PNG)
    record = {"chapter": chapter, "profile": "ci", "machine": {}, "written": "now", "metrics": {"claims": claims}}
    (folder / "metrics.json").write_text(json.dumps(record))


def test_front_page_is_built_from_the_metrics(tmp_path):
    _fake_chapter(tmp_path, "04_geometric", [{"claim": "x | y", "measured": "3.5 units", "verdict": "holds"}])
    text = edition.front_page(tmp_path)
    assert text.startswith(edition.START) and text.endswith(edition.END)
    assert "| [`04_geometric`](notebooks/04_geometric.ipynb) | 003 | x \\| y | 3.5 units | holds |" in text
    assert "figures/04_geometric/forgetting.png" in text and "01_sintellix" not in text
    assert "profile `ci`" in text


def test_a_malformed_claim_is_refused_by_name(tmp_path):
    _fake_chapter(tmp_path, "02_henn", [{"claim": "c", "measured": "m"}])
    with pytest.raises(ValueError, match=r"02_henn.*verdict"):
        edition.claims(tmp_path)
    with pytest.raises(KeyError, match="unknown chapter"):
        edition.chapter_record(tmp_path, "99_nothing")


def test_update_readme_replaces_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{edition.START}\nold\n{edition.END}\noutro\n")
    new = f"{edition.START}\nnew\n{edition.END}"
    assert edition.update_readme(readme, new) is True
    assert readme.read_text() == f"intro\n{new}\noutro\n"
    assert edition.update_readme(readme, new) is False
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="no generated front-page section"):
        edition.update_readme(readme, new)
