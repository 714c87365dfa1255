"""The HTML edition of the book: the executed chapter notebooks as a Sphinx site (MyST-NB, sphinx-book-theme),
with a table of contents, full-text search, rendered math and the widgets' saved state, that works offline.

    site.build(executed_dir, out_dir, figures_root)   # -> out_dir/index.html (what `make book` calls)

Why this stack. Sphinx with MyST-NB and the book theme is the engine of Jupyter Book 1: pure Python, installed
from PyPI, it renders a notebook's saved outputs (figures, tables, widget views) without running it again, and
its search is a client-side index (searchindex.js), so nothing needs a server. Jupyter Book 2 (mystmd) is a
Node application whose book theme is downloaded from the internet when a site is built, so it cannot build
offline; nbconvert, used before, gave pages but no contents, no search and no working widgets.

Offline. A page opened from disk (or from any plain file server) loads nothing from the internet:
    math     MathJax 3, from the `sphinx-mathjax-offline` wheel, copied into _static/mathjax/;
    widgets  the standalone widget manager (@jupyter-widgets/html-manager, its `embed.js` bundle with the
             standard controls and their fonts), fetched once from the npm registry when the site is built,
             checked against the registry's SHA-512 and kept under build/site-assets/;
    theme    sphinx-book-theme ships its fonts and icons in the wheel.
tests/test_site.py builds a site, serves it, opens it in chromium with every non-local request refused, and
checks the math, the search and a saved widget.

Does not include: running notebooks (`python -m book` does that first), or a live kernel (the widgets show the
state they were saved in; moving one changes nothing that needs Python).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = ROOT / "build" / "site-assets"
DEFAULT_REGISTRY = "https://registry.npmjs.org"       # BOOK_NPM_REGISTRY points elsewhere (a mirror)

# The widget manager: package, version, the registry's integrity string, and the folder of the tarball to copy.
WIDGET_MANAGER = ("@jupyter-widgets/html-manager", "1.0.15",
                  "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
                  "package/dist/")
WIDGET_MANAGER_DIR = "html-manager"          # under _static/: embed.js and the fonts it loads beside it

CONF = '''# Written by book/site.py for one build; edit that file, not this one.
project = "The book"
author = "the book's authors"
extensions = ["myst_nb", "sphinx-mathjax-offline"]
html_theme = "sphinx_book_theme"
html_title = "The book"
html_static_path = ["_static"]
html_theme_options = {{"show_toc_level": 2, "navigation_with_keys": False}}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"                    # the notebooks were executed by `python -m book`
nb_ipywidgets_js = {{"{manager}/embed.js": {{"data-jupyter-widgets-cdn": "{manager}/"}}}}
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "myst.xref_missing", "misc.highlighting_failure"]
exclude_patterns = ["_build"]
'''

INDEX = """# The book

Five write-ups of neural-network architectures, each built from a plain PyTorch reference, trained on real bytes
against a baseline, given hand-written kernels that are checked against the reference, and fact-checked claim by
claim. Start with the primer, chapter 00: it teaches the blocks every chapter builds on.

```{{toctree}}
:maxdepth: 1
:caption: Chapters

{chapters}
```

{front_page}
"""


def _check_integrity(data: bytes, integrity: str, what: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if got != expected:
        raise RuntimeError(f"{what}: the download's {algorithm} is {got}, the registry's integrity says {expected}; "
                           "refusing to use it")


def npm_tarball(package: str, version: str, integrity: str, cache_dir: Path = ASSETS_DIR) -> bytes:
    """The npm tarball of package@version: from cache_dir if it is there and intact, else from the npm registry
    (BOOK_NPM_REGISTRY if set), checked against `integrity` and cached atomically."""
    name = f"{package.replace('/', '+')}-{version}.tgz"
    cached = Path(cache_dir) / name
    if cached.exists():
        data = cached.read_bytes()
        try:
            _check_integrity(data, integrity, str(cached))
            return data
        except RuntimeError:
            cached.unlink()                       # corrupt or partial: fetch it again
    registry = os.environ.get("BOOK_NPM_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    url = f"{registry}/{package}/-/{package.rsplit('/', 1)[-1]}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as err:
        raise RuntimeError(f"the book's site needs {package}@{version} from the npm registry ({url}) once, to work "
                           f"offline afterwards, and could not fetch it: {err}. Put the tarball at {cached} to "
                           "build without the network") from None
    _check_integrity(data, integrity, url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    temporary = cached.with_name(f".{cached.name}.{os.getpid()}.part")
    temporary.write_bytes(data)
    os.replace(temporary, cached)
    return data


def unpack_folder(tarball: bytes, folder: str, destination: Path) -> list[Path]:
    """Copy the regular files under `folder` of a .tgz into `destination` (no links, no paths that climb out)."""
    written = []
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile() or not member.name.startswith(folder):
                continue
            relative = Path(member.name[len(folder):])
            if relative.is_absolute() or ".." in relative.parts:
                raise RuntimeError(f"refusing the archive member {member.name!r}: it points outside {folder!r}")
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            written.append(target)
    return written


def _title(notebook: Path) -> str:
    import json
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            first = "".join(cell["source"]).strip().splitlines()
            if first and first[0].startswith("# "):
                return first[0][2:].strip()
    return notebook.stem


def write_source(executed_dir: Path, source_dir: Path, figures_root: Path | None) -> list[str]:
    """The Sphinx project for a build: conf.py, index.md (the chapters' contents, then the README's front page
    of figures and claims), the executed notebooks, the figures, and the widget manager. Returns the chapters."""
    from book import edition

    notebooks = sorted(Path(executed_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed chapter notebooks in {executed_dir}: run `make book` first")
    if source_dir.exists():
        shutil.rmtree(source_dir)
    (source_dir / "_static").mkdir(parents=True)
    for notebook in notebooks:
        shutil.copyfile(notebook, source_dir / notebook.name)
    front = ""
    if figures_root is not None and Path(figures_root).is_dir():
        shutil.copytree(figures_root, source_dir / "figures", ignore=shutil.ignore_patterns("*.json"))
        front = edition.front_page(Path(figures_root)).replace("](notebooks/", "](")
    package, version, integrity, folder = WIDGET_MANAGER
    unpack_folder(npm_tarball(package, version, integrity), folder, source_dir / "_static" / WIDGET_MANAGER_DIR)
    (source_dir / "conf.py").write_text(CONF.format(manager=WIDGET_MANAGER_DIR))
    chapters = [n.stem for n in notebooks]
    (source_dir / "index.md").write_text(INDEX.format(chapters="\n".join(chapters), front_page=front))
    return chapters


def build(executed_dir: Path, out_dir: Path, figures_root: Path | None = ROOT / "figures") -> Path:
    """Build the site from the executed notebooks in `executed_dir` into `out_dir` (replaced whole, only once the
    build has succeeded). Returns out_dir/index.html; a failed build raises with Sphinx's own output."""
    out_dir = Path(out_dir)
    work = out_dir.parent / f".{out_dir.name}.building"
    if work.exists():
        shutil.rmtree(work)
    write_source(Path(executed_dir), work / "source", figures_root)
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-j", "1", str(work / "source"), str(work / "html")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sphinx could not build the site (exit {result.returncode}):\n{result.stderr[-4000:]}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work / "html", out_dir)
    shutil.rmtree(work)
    return out_dir / "index.html"
