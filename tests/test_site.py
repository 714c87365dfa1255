"""The book's site (book/site.py): built by Sphinx and MyST-NB from executed notebooks, it works offline.

A small chapter with an equation, a rare word and a saved widget is executed (papermill, as `make book` does)
and built into a site. The site is served from 127.0.0.1 and opened in Debian's chromium with every other
request refused: the math must be typeset by the bundled MathJax, the search must find the word, and the widget
must show the value it was saved with. The download of the widget manager is checked against the registry's
hash, and a tarball that points outside its folder is refused.
"""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading

import nbformat
import pytest

from book import site
from book.notebook_run import run_notebook
from test_browser import _require_browser

RARE_WORD = "quaternionic"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the site's folder, its index page), built from one executed fixture chapter."""
    root = tmp_path_factory.mktemp("site")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell(f"# 00 · A fixture chapter\n\nThe norm $$y = x / \\sqrt{{\\overline{{x^2}}}}$$ "
                                      f"and a word to search for: {RARE_WORD}."),
        nbformat.v4.new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=7, min=0, max=10, "
                                  "description='seven')")]
    source, executed = root / "source", root / "executed"
    source.mkdir()
    executed.mkdir()
    nbformat.write(notebook, str(source / "00_fixture.ipynb"))
    run_notebook(source / "00_fixture.ipynb", executed / "00_fixture.ipynb", cwd=source)
    index = site.build(executed, root / "html", figures_root=None)
    return root / "html", index


def test_the_site_has_contents_search_and_only_local_assets(built):
    html, index = built
    assert index.exists() and "00_fixture.html" in index.read_text()
    for asset in ("_static/mathjax/tex-chtml.js", f"_static/{site.WIDGET_MANAGER_DIR}/embed.js", "searchindex.js"):
        assert (html / asset).is_file(), asset
    assert RARE_WORD[:-2] in (html / "searchindex.js").read_text()               # indexed by its stem
    for page in html.glob("*.html"):
        text = page.read_text()
        assert 'src="http' not in text and "src='http" not in text, f"{page.name} loads a script from the internet"
    assert "application/vnd.jupyter.widget-state+json" in (html / "00_fixture.html").read_text()


def test_the_site_works_offline_in_a_real_browser(built):
    executable = _require_browser()
    from playwright.sync_api import expect, sync_playwright

    html, _ = built
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base, refused = f"http://127.0.0.1:{server.server_port}", []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page()
                page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                           else (refused.append(route.request.url), route.abort()))
                page.goto(f"{base}/00_fixture.html")
                expect(page.locator("mjx-container").first).to_be_visible(timeout=30_000)      # MathJax typeset it
                expect(page.locator(".widget-readout").first).to_have_text("7", timeout=30_000)  # the saved state
                expect(page.locator(".widget-label").first).to_have_text("seven")
                page.goto(f"{base}/search.html?q={RARE_WORD}")
                expect(page.locator("#search-results a", has_text="A fixture chapter").first).to_be_visible(
                    timeout=30_000)
            finally:
                browser.close()
    finally:
        server.shutdown()
    assert refused == [], f"the site asked the internet for {refused}"


def test_a_download_that_does_not_match_the_registry_hash_is_refused(tmp_path, monkeypatch):
    package, version, integrity, _ = site.WIDGET_MANAGER
    with pytest.raises(RuntimeError, match="refusing to use it"):
        site._check_integrity(b"not the tarball", integrity, "test")
    cached = tmp_path / f"{package.replace('/', '+')}-{version}.tgz"
    cached.write_bytes(b"a partial download")
    monkeypatch.setenv("BOOK_NPM_REGISTRY", "http://127.0.0.1:9")                       # nothing listens there
    with pytest.raises(RuntimeError, match=r"could not fetch it.*Put the tarball at"):
        site.npm_tarball(package, version, integrity, cache_dir=tmp_path)
    assert not cached.exists(), "a corrupt cached tarball must be removed, not used"


def test_an_archive_member_outside_its_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in ("package/dist/ok.js", "package/dist/../../escape.js"):
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"//"))
    with pytest.raises(RuntimeError, match="points outside"):
        site.unpack_folder(buffer.getvalue(), "package/dist/", tmp_path / "out")
    assert not (tmp_path / "escape.js").exists()


def test_no_executed_notebooks_says_to_run_the_book(tmp_path):
    with pytest.raises(FileNotFoundError, match="make book"):
        site.build(tmp_path / "nothing", tmp_path / "html")
