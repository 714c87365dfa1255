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
