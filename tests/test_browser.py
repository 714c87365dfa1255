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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interactive_chapters() -> list[str]:
    """Chapters whose notebook shows an ipywidgets view (a `.widget()` of refimpl.views, or ipywidgets itself)."""
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
    port = _free_port()
    env = dict(os.environ, BOOK_PROFILE="ci", BOOK_OUTPUT_DIR=str(tmp_path / "out"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", "--LabApp.news_url=None"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {START_SECONDS} s")
            time.sleep(0.5)
        yield base, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# How far the notebook has got: every code cell's prompt, and whether any output is an error.
_PROGRESS_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
  const errors = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')]
      .map(e => e.textContent.slice(0, 2000));
  return {prompts, errors};
}"""


def _wait_for_kernel(page, base: str, token: str) -> None:
    """Until the notebook's kernel is started, connected to the page, and idle (the status bar says so)."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=5) as reply:
            kernels = json.loads(reply.read())
        connected = any(k.get("connections", 0) > 0 and k.get("execution_state") == "idle" for k in kernels)
        if connected and "Idle" in page.locator(".jp-StatusBar-Widget").all_inner_texts().__str__():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the notebook's kernel was not ready after {START_SECONDS} s: {kernels}")
        time.sleep(0.5)


def _run_all_cells(page, notebook: str) -> None:
    """Run > Run All Cells, as a reader would, then wait until every code cell has run (or one failed)."""
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    deadline = time.monotonic() + RUN_ALL_SECONDS
    while True:
        progress = page.evaluate(_PROGRESS_JS)
        if progress["errors"]:
            pytest.fail(f"{notebook} raised in the browser:\n" + "\n---\n".join(progress["errors"]))
        prompts = progress["prompts"]
        if prompts and all(p.strip().startswith("[") and p.strip()[1:-2].isdigit() for p in prompts):
            return
        if time.monotonic() > deadline:
            waiting = [i for i, p in enumerate(prompts) if not p.strip()[1:-2].isdigit()]
            page.screenshot(path=str(ARTIFACTS / f"{notebook}_timeout.png"))
            pytest.fail(f"{notebook}: cells {waiting[:10]} had not run after {RUN_ALL_SECONDS} s")
        time.sleep(1.0)


def _state(view) -> tuple[bytes, str]:
    """What the reader sees of the view: the picture's pixels (a widget Image, or a figure shown in an Output
    widget) and the HTML text under it ("" for a view without one)."""
    picture = view.locator("img").first.screenshot()
    texts = view.locator(".widget-html-content")
    return picture, (texts.last.inner_text() if texts.count() else "")


def _wait_for_change(view, before: tuple[bytes, str], what: str, expect: tuple[str, ...],
                     seconds: float = 60.0) -> tuple[bytes, str]:
    """Until everything in `expect` ("picture", "text") differs from `before`; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        after = _state(view)
        changed = [name for name, a, b in zip(("picture", "text"), after, before) if a != b]
        if set(expect) <= set(changed):
            return after
        if time.monotonic() > deadline:
            pytest.fail(f"after {what}, {changed or 'nothing'} changed within {seconds:.0f} s; expected {list(expect)}")
        time.sleep(0.5)


def _labelled(view, page, kind: str, label: str):
    """The control of class `kind` (e.g. widget-slider) whose description label reads `label`."""
    return view.locator(f".{kind}", has=page.locator(".widget-label", has_text=label)).first


def _drag_right(page, slider) -> str:
    """Drag the slider's handle with the mouse to the right end of its track (so a slider of two values moves
    too); returns the readout afterwards."""
    box = slider.locator(".noUi-handle").first.bounding_box()
    track = slider.locator(".noUi-base").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] - 1, y, steps=8)
    page.mouse.up()
    return slider.locator(".widget-readout").first.inner_text()


@pytest.mark.parametrize("chapter", sorted(VIEWS))
def test_view_responds_in_a_real_browser(chapter, lab):
    executable = _require_browser()
    from playwright.sync_api import sync_playwright

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
            state = _state(view)
            view.screenshot(path=str(ARTIFACTS / f"{chapter}_0_start.png"))
            for step, (action, label, value, expect) in enumerate(spec["actions"], start=1):
                if action == "drag":
                    slider = _labelled(view, page, "widget-slider", label)
                    start = slider.locator(".widget-readout").first.inner_text()
                    readout = _drag_right(page, slider)
                    assert float(readout) > float(start), f"{label!r} reads {readout!r} after dragging it right"
                elif action == "pick":
                    _labelled(view, page, "widget-dropdown", label).locator("select").select_option(value)
                elif action == "type":
                    box = _labelled(view, page, "widget-inline-hbox", label).locator("textarea, input").first
                    box.fill(value)
                    box.press("Tab")                           # leaving the box sends the text to the kernel
                else:
                    raise ValueError(f"unknown action {action!r}")
                state = _wait_for_change(view, state, f"{action} {label!r}", expect)
                view.screenshot(path=str(ARTIFACTS / f"{chapter}_{step}_{action}_{label.split()[0]}.png"))
            page.screenshot(path=str(ARTIFACTS / f"{chapter}_page.png"))
        finally:
            browser.close()
