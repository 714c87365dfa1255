"""`make doctor`: what this machine can run of the book, in plain words.

    python -m book.doctor          # prints the report; exit status 1 if something the book needs is missing

It reports the Python and package versions against requirements.txt, which kernel backends this machine
can run (numba on the CPU, numba's CUDA simulator, a real GPU for numba-cuda and CuPy) and whether nvcc
and NVRTC can compile the CUDA C, with one plain-language line for each thing that is missing and what
it costs. Only missing *required* packages fail it: a machine without a GPU is a normal machine for
this book.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirements(path: Path = ROOT / "requirements.txt") -> list[tuple[str, str]]:
    """(distribution name, version specifier) for each line of requirements.txt."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
            out.append((name, spec))
    return out


def _satisfies(version: str, spec: str) -> bool:
    """Whether `version` meets a simple specifier (==X, >=X, or none); local tags like +cpu are ignored."""
    def parts(v):
        return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+]", v)[:3])
    if not spec:
        return True
    op, wanted = re.match(r"(==|>=)\s*(.+)", spec).groups()
    have, want = parts(version), parts(wanted)
    return have[:len(want)] == want if op == "==" else have >= want


def package_lines() -> tuple[list[str], bool]:
    """One line per required package, and whether every one is installed at a fitting version."""
    lines, ok = [], True
    for name, spec in requirements():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"  MISSING  {name} {spec}: not installed; run `make env` (or pip install -r requirements.txt)")
            ok = False
            continue
        fits = _satisfies(version, spec)
        ok &= fits
        mark = "ok     " if fits else "WRONG  "
        note = "" if fits else f" (requirements.txt asks for {spec})"
        lines.append(f"  {mark}  {name} {version}{note}")
    return lines, ok


def backend_lines() -> list[str]:
    """One line per kernel backend and per CUDA C compiler, saying what this machine can do with it."""
    import kernels
    lines = []
    explain = {"numba_cuda": "numba-cuda kernels", "cupy": "CuPy raw CUDA kernels", "numba": "numba CPU kernels",
               "reference": "the PyTorch reference"}
    for backend, status in kernels.backend_status().items():
        lines.append(f"  {backend:<11} {status}")
        if status.startswith("unavailable") or status.startswith("simulator"):
            lines.append(f"              -> {explain[backend]} are checked here "
                         + ("in numba's simulator; they are timed only on a GPU"
                            if backend == "numba_cuda" else "by compiling their CUDA C only; they run and are timed on a GPU"))
    nvcc = kernels.machine.nvcc_path()
    lines.append(f"  nvcc        {nvcc or 'not found: the tests that compile the .cu files with nvcc will skip'}")
    try:
        from cupy_backends.cuda.libs import nvrtc
        major, minor = nvrtc.getVersion()
        lines.append(f"  NVRTC       {major}.{minor}: the .cu files are compiled exactly as CuPy will")
    except Exception as err:                                      # the error type depends on what is missing
        lines.append(f"  NVRTC       not loadable ({type(err).__name__}): the NVRTC compile tests will skip")
    return lines


def browser_line() -> str:
    """Whether Debian's chromium is here for the real-browser test (tests/test_browser.py)."""
    import shutil
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    return (f"  chromium    {path}: the interactive views are tested in a real browser" if path else
            "  chromium    not found: the real-browser test will skip (CI fails); `make browser` installs it")


def report() -> tuple[str, bool]:
    """The whole report as text, and whether the book can run here."""
    import platform
    packages, ok = package_lines()
    python_ok = sys.version_info[:2] >= (3, 10)
    lines = [f"Python {platform.python_version()} ({sys.executable})"
             + ("" if python_ok else ": the book needs Python 3.10 or newer"),
             f"machine: {platform.machine()}, {platform.system()}", "", "packages (requirements.txt):", *packages,
             "", "kernel backends:", *backend_lines(), "", "browser:", browser_line(), ""]
    ok &= python_ok
    lines.append("verdict: everything the book needs is here" if ok else
                 "verdict: something the book needs is missing (see the lines above); `make env` installs it")
    return "\n".join(lines), ok


def main() -> int:
    """Print the report; exit status 0 when the book can run here, 1 when something it needs is missing."""
    text, ok = report()
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
