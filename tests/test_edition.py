"""What `make book` publishes: the README's front page matches the chapters' metrics, and the HTML edition
embeds figures, widget state and the claims."""

import base64
import json

import nbformat
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


def test_html_edition_embeds_figures_widget_state_and_claims(tmp_path):
    figures = tmp_path / "figures"
    _fake_chapter(figures, "04_geometric", [{"claim": "zero forgetting", "measured": "+1.2 bits", "verdict": "no"}])
    state = {"state": {"abc": {"model_name": "SliderModel", "model_module": "@jupyter-widgets/controls",
                               "model_module_version": "2.0.0", "state": {"value": 1.25}}}, "version_major": 2,
             "version_minor": 0}
    nb = nbformat.v4.new_notebook(metadata={"widgets": {"application/vnd.jupyter.widget-state+json": state}})
    nb.cells = [nbformat.v4.new_markdown_cell("# 04 · A chapter title\n\ntext"),
                nbformat.v4.new_code_cell("plot()", execution_count=1, outputs=[nbformat.v4.new_output(
                    "display_data", data={"image/png": base64.b64encode(PNG).decode(), "text/plain": "<Figure>"})])]
    executed = tmp_path / "executed"
    executed.mkdir()
    nbformat.write(nb, str(executed / "04_geometric.ipynb"))

    index = edition.render_html(executed, tmp_path / "html", figures)
    page = (tmp_path / "html" / "04_geometric.html").read_text()
    assert "data:image/png;base64," + base64.b64encode(PNG).decode()[:40] in page
    assert "application/vnd.jupyter.widget-state+json" in page and '"value": 1.25' in page
    text = index.read_text()
    assert "href='04_geometric.html'" in text and "A chapter title" in text
    assert "zero forgetting" in text and "+1.2 bits" in text and "data:image/png;base64," in text

    with pytest.raises(FileNotFoundError, match="make book"):
        edition.render_html(tmp_path / "nothing", tmp_path / "html2", figures)
