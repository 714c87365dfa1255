"""Test-wide set-up: the `ci` profile for notebooks, and numba's CUDA simulator where there is no GPU."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Notebooks run by nbmake inherit this environment: small and fast, figures kept out of the tree.
os.environ.setdefault("BOOK_PROFILE", "ci")
os.environ.setdefault("BOOK_OUTPUT_DIR", str(ROOT / "build" / "ci"))

import kernels  # noqa: E402  (decides numba's CUDA target: the simulator when no GPU is present)

# The simulator runs each CUDA thread as a Python thread; frequent switches make syncthreads fast.
if kernels.cuda_simulator_enabled():
    sys.setswitchinterval(1e-4)

# nbmake runs each chapter with nbclient's NotebookClient; hand it the book's, whose kernels use IPC sockets
# (no TCP ports to race for) and whose kernel start, and only that, is retried (book/notebook_run.py).
import nbmake.nb_run  # noqa: E402

from book.notebook_run import BookNotebookClient  # noqa: E402

nbmake.nb_run.NotebookClient = BookNotebookClient


# ----------------------------------------------------------------------------
# Bad inputs counted: every `pytest.raises` that saw its error is one bad input refused as it should be
# (issue 19: the run prints how many were tried, per test file). Counting wraps pytest.raises; it changes
# nothing about what passes or fails.
# ----------------------------------------------------------------------------

import collections  # noqa: E402

import pytest  # noqa: E402

REFUSED: collections.Counter = collections.Counter()
_real_raises = pytest.raises


def _current_test_file() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").split("::", 1)[0]


class _CountedRaises:
    """pytest.raises as a context manager, adding one to REFUSED when the expected error came."""

    def __init__(self, context):
        self._context = context

    def __enter__(self):
        return self._context.__enter__()

    def __exit__(self, *exc_info):
        suppressed = self._context.__exit__(*exc_info)
        if suppressed:
            REFUSED[_current_test_file()] += 1
        return suppressed


def _counting_raises(expected_exception, *args, **kwargs):
    if args:                                         # pytest.raises(E, fn, *args): runs fn now
        info = _real_raises(expected_exception, *args, **kwargs)
        REFUSED[_current_test_file()] += 1
        return info
    return _CountedRaises(_real_raises(expected_exception, **kwargs))


pytest.raises = _counting_raises


def pytest_terminal_summary(terminalreporter):
    if REFUSED:
        total, files = sum(REFUSED.values()), len(REFUSED)
        terminalreporter.write_sep("-", f"bad inputs tried and refused as expected: {total}, in {files} test files")
        for path, count in sorted(REFUSED.items(), key=lambda item: -item[1])[:12]:
            terminalreporter.write_line(f"  {count:5d}  {path}")
