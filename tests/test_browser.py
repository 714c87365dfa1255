"""The book in a real browser: JupyterLab on 127.0.0.1, driven by Playwright in headless Chromium.

For every chapter with an interactive view this opens the notebook as a reader would, runs all its cells
in the `ci` profile, moves a slider and picks an option, and checks that the picture and the text the
widget drives changed. Screenshots are kept in build/browser/ (before and after each move).

What it needs: the `playwright` package (requirements.txt; its wheel carries the driver) and Debian's
`chromium`, launched by its path. `make test` installs chromium first when it is missing and it can
(`make browser`); Playwright's own browser download is never used. Without chromium the test is skipped
with the reason, except under CI, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from book.notebook_run import JUPYTER_SERVER_ARGS

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "browser"

# Chapters with an interactive view, and how a reader drives it: each action names its control by its label
# and says what must change on the page (the picture, the text under it, or both). A chapter that builds a
# widget must be listed here (test_every_interactive_chapter_is_driven checks), so no view goes untested.
VIEWS = {
    "03_superblock": {
        "marker": "MoE layer",
        "actions": [("pick", "MoE layer", "block 0 moe_2", ("picture",)),
                    ("type", "text", "import os\nos.path.join(a, b)", ("picture",))],
    },
    "04_geometric": {
        "marker": "PC1 (σ)",                                    # a label inside the view: where it is on the page
        "actions": [("drag", "PC1 (σ)", None, ("picture", "text")),
                    ("pick", "prompt", "prose", ("picture", "text"))],
    },
    "05_synapse": {
        "marker": "choice",
        "actions": [("drag", "choice", None, ("picture",)),
                    ("pick", "sample", "prose", ("picture", "text")),
                    ("type", "text", "import asyncio\nasync def main():\n    await asyncio.sleep(0)", ("picture", "text"))],
    },
}

RUN_ALL_SECONDS = 480     # a fail-safe, not a speed test: the `ci` profile of a chapter takes a minute or two here
START_SECONDS = 90


def chromium_path() -> str | None:
    """Debian's chromium (or BOOK_CHROMIUM), never a browser Playwright downloaded."""
    explicit = os.environ.get("BOOK_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: `make env`")
    path = chromium_path()
    if path is None:
        message = "Debian's chromium is not installed: run `make browser` (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _wait_until_serving(url: str, server: subprocess.Popen) -> None:
    """Until `url` answers 200. The server names its address a moment before its event loop binds the port and
    gives no signal when it has, so this is the one place a test polls: a few tries, each a request."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                assert reply.status == 200, f"JupyterLab's {url} answered {reply.status}"
                return
        except urllib.error.URLError as err:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not serve {url} ({err}; exit code {server.poll()})")
        time.sleep(0.05)  # sleep-ok: no event marks the port's bind; a request every 50 ms until it answers


def _interactive_chapters() -> list[str]:
    """Chapters whose notebook shows an ipywidgets view (a `.widget()` of book.views, or ipywidgets itself)."""
    found = []
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        if ".widget()" in source or "ipywidgets" in source:
            found.append(notebook.stem)
    return found


def test_every_interactive_chapter_is_driven():
    assert _interactive_chapters(), "no chapter has an interactive view: the browser test would test nothing"
    assert sorted(_interactive_chapters()) == sorted(VIEWS)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with a token, in this environment, serving a copy of the notebooks.

    Its settings, workspaces and runtime files live in tmp_path, so nothing of the user's leaks in and
    nothing is written to the repository. Yields (base url, token, the copied notebooks' folder)."""
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Every cell stays in the page (no virtual scrolling), so the test can see each cell's prompt.
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                            "checkForUpdates": False}))
    token = secrets.token_hex(16)
    # the kernels' IPC socket files live in the runtime folder: keep its path short (a socket path holds ~100 bytes)
    runtime = Path(tempfile.mkdtemp(prefix="lab-"))
    env = dict(os.environ, BOOK_PROFILE="ci", BOOK_OUTPUT_DIR=str(tmp_path / "out"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
               JUPYTER_RUNTIME_DIR=str(runtime),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # --port=0: the server takes a free port itself and says which (no port picked here for it to race for)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", "--LabApp.news_url=None", *JUPYTER_SERVER_ARGS]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said, log, found = threading.Event(), tmp_path / "lab.log", {}

    def copy_log():
        """The server's output into lab.log; `said` once it names the address it serves (or when it exits)."""
        with open(log, "wb") as out:
            for line in server.stdout:
                out.write(line)
                out.flush()
                match = re.search(rb"http://127\.0\.0\.1:(\d+)/", line)
                if match and "base" not in found:
                    found["base"] = f"http://127.0.0.1:{int(match.group(1))}"
                    said.set()
        said.set()

    reader = threading.Thread(target=copy_log, daemon=True)
    reader.start()
    try:
        if not said.wait(timeout=START_SECONDS) or "base" not in found:
            reader.join(timeout=10)
            pytest.fail(f"JupyterLab did not say where it serves within {START_SECONDS} s "
                        f"(exit code {server.poll()}):\n{log.read_text()[-3000:]}")
        base = found["base"]
        _wait_until_serving(f"{base}/api/status?token={token}", server)
        yield base, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        reader.join(timeout=10)
        shutil.rmtree(runtime, ignore_errors=True)


# How far the notebook has got: every code cell's prompt, and whether any output is an error.
_PROGRESS_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
  const errors = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')]
      .map(e => e.textContent.slice(0, 2000));
  return {prompts, errors};
}"""


# True once every code cell has an execution count, or once any output is an error.
_FINISHED_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  const error = document.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]');
  return error !== null || (prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p)));
}"""

# What the reader sees of a view: its picture (the source the <img> shows, once loaded) and the last HTML text.
_VIEW_STATE_JS = """(view) => {
  const img = view.querySelector('img');
  const texts = view.querySelectorAll('.widget-html-content');
  return {picture: img && img.complete && img.naturalWidth > 0 ? img.src : null,
          text: texts.length ? texts[texts.length - 1].innerText : ''};
}"""


def _wait_for_kernel(page, base: str, token: str) -> None:
    """Until the notebook's kernel is started, connected to the page, and idle (the status bar says so)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function("""() => [...document.querySelectorAll('.jp-StatusBar-Widget')]
                                     .some(w => w.innerText.includes('Idle'))""",
                               timeout=START_SECONDS * 1000, polling=250)
    except PlaywrightTimeout:
        pytest.fail(f"the notebook's kernel was not idle in the status bar after {START_SECONDS} s")
    with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=30) as reply:
        kernels = json.loads(reply.read())
    assert any(k.get("connections", 0) > 0 for k in kernels), f"no kernel is connected to the page: {kernels}"


def _run_all_cells(page, notebook: str) -> None:
    """Run > Run All Cells, as a reader would, then wait until every code cell has run (or one failed)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    try:
        page.wait_for_function(_FINISHED_JS, timeout=RUN_ALL_SECONDS * 1000, polling=1000)
    except PlaywrightTimeout:
        prompts = page.evaluate(_PROGRESS_JS)["prompts"]
        waiting = [i for i, p in enumerate(prompts) if not p.strip()[1:-2].isdigit()]
        page.screenshot(path=str(ARTIFACTS / f"{notebook}_timeout.png"))
        pytest.fail(f"{notebook}: cells {waiting[:10]} had not run after {RUN_ALL_SECONDS} s")
    errors = page.evaluate(_PROGRESS_JS)["errors"]
    if errors:
        pytest.fail(f"{notebook} raised in the browser:\n" + "\n---\n".join(errors))


def _state(view) -> dict:
    """What the reader sees of the view (see _VIEW_STATE_JS)."""
    return view.evaluate(_VIEW_STATE_JS)


def _wait_for_change(page, view, before: dict, what: str, expect: tuple[str, ...], seconds: float = 60.0) -> dict:
    """Until everything in `expect` ("picture", "text") differs from `before` (a new picture loaded);
    fails after `seconds` with what did change."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function(f"""([view, before, expect]) => {{
            const now = ({_VIEW_STATE_JS})(view);
            return now.picture !== null && expect.every(k => now[k] !== before[k]);
        }}""", arg=[view.element_handle(), before, list(expect)], timeout=seconds * 1000, polling=250)
    except PlaywrightTimeout:
        after = _state(view)
        changed = [k for k in ("picture", "text") if after[k] != before[k]]
        pytest.fail(f"after {what}, {changed or 'nothing'} changed within {seconds:.0f} s; expected {list(expect)}")
    return _state(view)


def _labelled(view, page, kind: str, label: str):
    """The control of class `kind` (e.g. widget-slider) whose description label reads `label`."""
    return view.locator(f".{kind}", has=page.locator(".widget-label", has_text=label)).first


def _drag_right(page, slider) -> str:
    """Drag the slider's handle with the mouse to the right end of its track (so a slider of two values moves
    too)."""
    box = slider.locator(".noUi-handle").first.bounding_box()
    track = slider.locator(".noUi-base").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] - 1, y, steps=8)
    page.mouse.up()


@pytest.mark.parametrize("chapter", sorted(VIEWS))
def test_view_responds_in_a_real_browser(chapter, lab):
    executable = _require_browser()
    from playwright.sync_api import expect, sync_playwright

    base, token, _root = lab
    spec = VIEWS[chapter]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{chapter}.ipynb?token={token}")
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=START_SECONDS * 1000)
            _wait_for_kernel(page, base, token)
            _run_all_cells(page, chapter)

            view = page.locator(".widget-vbox", has=page.locator(".widget-label", has_text=spec["marker"])).last
            view.scroll_into_view_if_needed()
            view.locator("img").first.wait_for()
            page.wait_for_function(f"(view) => ({_VIEW_STATE_JS})(view).picture !== null", arg=view.element_handle())
            state = _state(view)
            view.screenshot(path=str(ARTIFACTS / f"{chapter}_0_start.png"))
            for step, (action, label, value, changes) in enumerate(spec["actions"], start=1):
                if action == "drag":
                    slider = _labelled(view, page, "widget-slider", label)
                    readout = slider.locator(".widget-readout").first
                    start = readout.inner_text()
                    _drag_right(page, slider)
                    expect(readout).not_to_have_text(start)          # waits for the readout to move
                    assert float(readout.inner_text()) > float(start), \
                        f"{label!r} reads {readout.inner_text()!r} after dragging it right from {start!r}"
                elif action == "pick":
                    _labelled(view, page, "widget-dropdown", label).locator("select").select_option(value)
                elif action == "type":
                    box = _labelled(view, page, "widget-inline-hbox", label).locator("textarea, input").first
                    box.fill(value)
                    box.press("Tab")                           # leaving the box sends the text to the kernel
                else:
                    raise ValueError(f"unknown action {action!r}")
                state = _wait_for_change(page, view, state, f"{action} {label!r}", changes)
                view.screenshot(path=str(ARTIFACTS / f"{chapter}_{step}_{action}_{label.split()[0]}.png"))
            page.screenshot(path=str(ARTIFACTS / f"{chapter}_page.png"))
        finally:
            browser.close()
