"""The book's plumbing: profiles, where figures and metrics go, and `make book`.

Notebooks call the helpers here so they hold only the story:

    PROFILE = book.profile()                       # "ci" | "small" | "gpu", from BOOK_PROFILE
    book.save_figure(fig, "00_overview", "loss")   # figures/00_overview/loss.png (atomically)
    book.write_metrics("00_overview", {...})       # figures/00_overview/metrics.json

Figures and metrics land under BOOK_OUTPUT_DIR. `make book` (`python -m book`) points it at the repository,
so only it rewrites the committed `figures/`; anything else (a chapter run in JupyterLab, the tests) writes
under build/ (build/interactive/ unless BOOK_OUTPUT_DIR says otherwise).

`python -m book [--profile small]` executes every chapter notebook
with papermill into build/book/notebooks/, then publishes: build/book/summary.md
(every chapter's metrics.json on one page), the site build/book/html/ (book/site.py:
Sphinx and MyST-NB, offline), and the README's generated front page.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
from pathlib import Path

from refimpl.io import atomic_write_bytes, read_json, save_figure_atomically, write_json

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("ci", "small", "gpu")


def profile(default: str = "small") -> str:
    """The run profile: BOOK_PROFILE if set, else `default`; refuses unknown names."""
    name = os.environ.get("BOOK_PROFILE", default)
    return check_profile(name)


def check_profile(name: str) -> str:
    """`name` if it is one of PROFILES ("ci", "small", "gpu"); otherwise a ValueError listing them."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {PROFILES}")
    return name


def device_for_profile(run_profile: str) -> str:
    """Where a chapter puts its models, batches and kernels: "cuda" in the `gpu` profile (refused when torch sees
    no GPU), "cpu" otherwise. BOOK_DEVICE overrides it ("cpu", "cuda" or "cuda:N"), e.g. to pick a second GPU."""
    import torch

    check_profile(run_profile)
    device = os.environ.get("BOOK_DEVICE") or ("cuda" if run_profile == "gpu" else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"BOOK_DEVICE must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"profile {run_profile!r} wants {device}, and torch sees no CUDA GPU; use the 'small' "
                           "profile on this machine (or set BOOK_DEVICE=cpu)")
    return device


def output_root() -> Path:
    """Where figures/ and metrics are written: BOOK_OUTPUT_DIR (the repository root under `make book`), else
    build/interactive/, so a chapter run by hand never rewrites the committed figures."""
    root = os.environ.get("BOOK_OUTPUT_DIR")
    return Path(root).resolve() if root else ROOT / "build" / "interactive"


def figures_dir(chapter: str) -> Path:
    """figures/<chapter>/ under the output root (created if missing)."""
    path = output_root() / "figures" / chapter
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, chapter: str, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as figures/<chapter>/<name>.png, atomically; a figure with overlapping or blank
    labels, or a log axis a reader cannot read, is refused with what is wrong (book.figure_check)."""
    from book.figure_check import problems

    found = problems(fig)
    if found:
        raise ValueError(f"figure {chapter}/{name} is not fit to print: " + "; ".join(found))
    return save_figure_atomically(fig, figures_dir(chapter) / f"{name}.png", dpi=dpi, bbox_inches="tight")


def write_metrics(chapter: str, metrics: dict, run_profile: str) -> Path:
    """Write figures/<chapter>/metrics.json: the chapter's measured numbers plus how they were made."""
    import torch

    record = {
        "chapter": chapter,
        "profile": check_profile(run_profile),
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(terse=True), "cpus": os.cpu_count(),
                    "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "metrics": metrics,
    }
    return write_json(figures_dir(chapter) / "metrics.json", record)


def read_metrics(chapter: str) -> dict:
    """The JSON record `write_metrics` wrote for `chapter` (chapter, profile, machine, metrics, written)."""
    return read_json(output_root() / "figures" / chapter / "metrics.json")


# Reproducibility: a chapter run twice in one profile on one machine writes the same metrics, except for what
# a clock decided. These are the clock's: any key whose name matches TIMED_KEY (and everything under it),
# and any claim whose text matches TIMED_TEXT (a timing claim's verdict may flip with the machine's load).
# Besides times and speeds, TIMED_KEY covers prefetching: a background thread races the training loop, so
# which blocks arrive in time (hits, disk reads, prefetches used or wasted) varies from run to run.
TIMED_KEY = re.compile(r"(^|_)(seconds|ms|speedups?|overhead)($|_)|speedup|per_second|^slopes$|scaling_slopes"
                       r"|prefetch|^wall_clock")
TIMED_TEXT = re.compile(r"\d\s*(ms|s)\b|\b(seconds|wall[- ]clock|time slope|faster|slower|speed-?ups?|steps/s)\b"
                        r"|% time|a forward pass")


def reproducible_part(metrics: dict) -> tuple[dict, list[str]]:
    """`metrics` without what a clock measured (see TIMED_KEY, TIMED_TEXT): what must repeat exactly when a
    chapter runs again. Returns (that part, the dotted names of what was left out)."""
    dropped: list[str] = []

    def keep(value, path: str):
        if isinstance(value, dict):
            kept = {}
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                if TIMED_KEY.search(str(key)):
                    dropped.append(name)
                else:
                    kept[key] = keep(item, name)
            return kept
        return value

    part = keep({k: v for k, v in metrics.items() if k != "claims"}, "")
    part["claims"] = []
    for entry in metrics.get("claims", []):
        if TIMED_TEXT.search(f"{entry.get('claim', '')} {entry.get('measured', '')}"):
            dropped.append(f"claims[{entry.get('claim', '?')!r}]")
        else:
            part["claims"].append(entry)
    return part, dropped


def chapters() -> list[Path]:
    """The chapter notebooks, in reading order."""
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# ----------------------------------------------------------------------------
# make book
# ----------------------------------------------------------------------------

def _flatten(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            _flatten(f"{prefix}.{key}" if prefix else key, value[key], rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.4g}"))
    elif isinstance(value, (list, tuple)) and len(value) > 8:
        rows.append((prefix, f"[{len(value)} values]"))
    else:
        rows.append((prefix, str(value)))


def summarise(build_dir: Path) -> Path:
    """One page: every chapter's metrics.json as a table, written to build_dir/summary.md."""
    lines = ["# The book: what every chapter measured", ""]
    for notebook in chapters():
        chapter = notebook.stem
        lines.append(f"## {chapter}")
        try:
            record = read_metrics(chapter)
        except FileNotFoundError:
            lines += ["", "_no metrics.json: the notebook did not finish_", ""]
            continue
        lines += ["", f"profile `{record['profile']}`, written {record['written']}", "",
                  "| metric | value |", "|---|---|"]
        rows: list[tuple[str, str]] = []
        _flatten("", record["metrics"], rows)
        lines += [f"| {k} | {v} |" for k, v in rows] + [""]
    path = build_dir / "summary.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, "\n".join(lines).encode())


def run_book(run_profile: str, build_dir: Path, only: list[str] | None = None) -> int:
    """Execute every chapter (or those named in `only`) with papermill into build_dir/notebooks; return the
    number that failed."""
    from book.notebook_run import run_notebook      # papermill with the book's kernel start (IPC, start retry)

    check_profile(run_profile)
    out_dir = build_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    names = {n.stem: n for n in chapters()}
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"no chapter {', '.join(unknown)}; the chapters are {', '.join(names)}")
    for notebook in [n for n in chapters() if only is None or n.stem in only]:
        print(f"== {notebook.name} (profile {run_profile})", flush=True)
        try:
            run_notebook(notebook, out_dir / notebook.name, parameters={"PROFILE": run_profile}, cwd=notebook.parent)
        except Exception as err:  # papermill raises its own error types; report and go on to the next chapter
            print(f"!! {notebook.name} failed: {type(err).__name__}: {str(err)[:2000]}", flush=True)
            failed.append(notebook.name)
    if failed:
        print(f"{len(failed)} chapter(s) failed: {', '.join(failed)}")
    publish(build_dir)
    return len(failed)


def publish(build_dir: Path) -> None:
    """After the chapters ran: the metrics summary, the site (build_dir/html/index.html: book/site.py) and, when
    the figures went to the repository's figures/, the README's generated front page."""
    from book import edition, site

    figures_root = output_root() / "figures"
    summary = summarise(build_dir)
    index = site.build(build_dir / "notebooks", build_dir / "html", figures_root)
    print(f"summary in {summary}; the site starts at {index} (open it in a browser; it needs no network)")
    if output_root() == ROOT:
        changed = edition.update_readme(ROOT / "README.md", edition.front_page(figures_root))
        print("README front page " + ("regenerated" if changed else "already matches the metrics"))


def main(argv: list[str] | None = None) -> int:
    """`python -m book [--profile small]`: run every chapter (see run_book); the exit status."""
    parser = argparse.ArgumentParser(prog="python -m book", description="Execute every chapter notebook and summarise their metrics.")
    parser.add_argument("--profile", default=os.environ.get("BOOK_PROFILE", "small"), choices=PROFILES)
    parser.add_argument("--build-dir", default=str(ROOT / "build" / "book"))
    parser.add_argument("--only", default=None, help="comma-separated chapters to run (e.g. 00_overview,02_henn); "
                        "the summary and front page are still built from every chapter's metrics")
    parser.add_argument("--publish-only", action="store_true",
                        help="skip executing: rebuild the summary, HTML edition and README front page from what ran")
    args = parser.parse_args(argv)
    os.environ.setdefault("BOOK_OUTPUT_DIR", str(ROOT))   # make book, and only it, writes the committed figures/
    if args.publish_only:
        publish(Path(args.build_dir))
        return 0
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    known = [n.stem for n in chapters()]
    if only and not set(only) <= set(known):
        parser.error(f"--only: no chapter {', '.join(sorted(set(only) - set(known)))}; the chapters are {', '.join(known)}")
    return 1 if run_book(args.profile, Path(args.build_dir), only) else 0


if __name__ == "__main__":
    sys.exit(main())
