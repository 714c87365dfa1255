"""Starting notebook kernels that survive a busy machine, for every way the book runs a notebook.

Why a kernel start can fail. Jupyter's default transport is TCP on 127.0.0.1: the client picks five free
ports by binding and releasing them, writes them into a connection file, and the kernel process binds them
a moment later. Anything else on the machine that takes one of those ports in between (another kernel
starting at the same time, as the reproducibility test's two side-by-side runs do, or any other program)
makes the kernel die before it answers, and the run stops before its first cell. A slow start on a loaded
machine can also pass the 60 s start-up timeout.

What this module does about it:
  1. IPC transport: the kernel's five sockets are Unix-domain socket files in a private temporary folder,
     named per kernel, so there are no ports to race for (and nothing of the kernel is reachable over TCP).
  2. A longer start-up timeout (START_SECONDS).
  3. As a last resort, a retry that covers only the kernel start, before any cell runs: it prints that it
     retried and why. A cell that fails is never retried; its error is the notebook's result.

Used by: nbmake (conftest.py hands it BookNotebookClient), papermill (`make book`, the reproducibility
test: run_notebook() and `python -m book.notebook_run`), and JupyterLab (JUPYTER_SERVER_ARGS).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
import uuid

from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.util import run_sync
from traitlets import default

KERNEL_START_ATTEMPTS = 3     # 1 start + 2 retries, only ever before the first cell
START_SECONDS = 180           # per attempt; nbclient's default of 60 s is tight on a loaded 2-core machine
# The same choice for a JupyterLab server (tests/test_browser.py, `make lab`): its kernels over IPC too.
JUPYTER_SERVER_ARGS = ("--KernelManager.transport=ipc",)

_socket_folder: str | None = None


def socket_folder() -> str:
    """This process's private folder for kernel socket files (mode 0700, removed at exit). Short, because a
    Unix socket's path may hold at most about 100 bytes."""
    global _socket_folder
    if _socket_folder is None:
        _socket_folder = tempfile.mkdtemp(prefix="book-kernels-", dir="/tmp" if os.path.isdir("/tmp") else None)
        atexit.register(shutil.rmtree, _socket_folder, ignore_errors=True)
    return _socket_folder


class BookKernelManager(AsyncKernelManager):
    """An AsyncKernelManager whose kernel talks over Unix-domain sockets in socket_folder()."""

    # (the method names are those of the defaults they replace: traitlets keeps one handler per name)
    @default("transport")
    def _transport_default(self):
        return "ipc"

    @default("ip")
    def _ip_default(self):
        # each kernel its own prefix: jupyter_client appends -1, -2, ... for the five sockets
        return os.path.join(socket_folder(), uuid.uuid4().hex[:12])


class KernelStartRetry:
    """Mixed into an nbclient NotebookClient: IPC kernels, a longer start-up timeout, and a retry of the
    kernel start (process and client, up to the kernel's first reply) that never covers a cell."""

    @default("kernel_manager_class")
    def _kernel_manager_class_default(self):        # the name of nbclient's own default, which this replaces
        return BookKernelManager

    @default("startup_timeout")
    def _startup_timeout_default(self):
        return START_SECONDS

    async def async_start_new_kernel(self, **kwargs) -> None:
        for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
            try:
                if self.km is None:
                    self.km = self.create_kernel_manager()
                await super().async_start_new_kernel(**kwargs)
                # the client too: a kernel that died on start-up shows itself only when it does not answer
                await super().async_start_new_kernel_client()
                return
            except Exception as err:
                if attempt == KERNEL_START_ATTEMPTS:
                    raise
                print(f"book.notebook_run: the kernel did not start ({type(err).__name__}: {err}); "
                      f"starting it again (attempt {attempt + 1} of {KERNEL_START_ATTEMPTS}); no cell had run",
                      file=sys.stderr, flush=True)
                await self._discard_failed_start()

    async def _discard_failed_start(self) -> None:
        """Stop whatever a failed start left (a process, channels, socket files) and forget its manager."""
        if self.km is not None:
            try:
                if await self.km.is_alive():
                    await self.km.shutdown_kernel(now=True)
            except Exception:       # it may be dead or half-started: cleaning up is all that is left to do
                pass
            try:
                self.km.cleanup_resources()
            except Exception:
                pass
        if self.kc is not None:
            self.kc.stop_channels()
        self.km = self.kc = None

    async def _async_cleanup_kernel(self) -> None:
        if self.km is None:          # a start that failed for good has cleaned up already
            return
        await super()._async_cleanup_kernel()

    # nbclient binds its synchronous wrappers to its own coroutines, so rebind them to the overrides
    start_new_kernel = run_sync(async_start_new_kernel)
    _cleanup_kernel = run_sync(_async_cleanup_kernel)


class BookNotebookClient(KernelStartRetry, NotebookClient):
    """nbclient's NotebookClient with the book's kernel start (what nbmake runs under `make test`)."""


def run_notebook(notebook, output, parameters: dict | None = None, cwd=None, **papermill_kwargs):
    """Execute `notebook` with papermill into `output`, with the book's kernel start; papermill's own
    errors (a failing cell: PapermillExecutionError) pass through unchanged."""
    import papermill
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines

    class BookPapermillClient(KernelStartRetry, PapermillNotebookClient):
        pass

    class BookEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=START_SECONDS, execution_timeout=None,
                                     **kwargs):
            kwargs.pop("input_path", None)
            kwargs.pop("startup_timeout", None)
            timeout = execution_timeout or kwargs.pop("timeout", None)
            kwargs.pop("timeout", None)
            return BookPapermillClient(nb_man, timeout=timeout, startup_timeout=start_timeout,
                                       kernel_name=kernel_name, log=logging.getLogger("papermill"), log_output=log_output,
                                       stdout_file=stdout_file, stderr_file=stderr_file, **kwargs).execute()

    papermill_engines.register("book", BookEngine)
    papermill_kwargs.setdefault("kernel_name", "python3")
    papermill_kwargs.setdefault("progress_bar", False)
    papermill_kwargs.setdefault("start_timeout", START_SECONDS)
    return papermill.execute_notebook(str(notebook), str(output), parameters=parameters or {},
                                      cwd=None if cwd is None else str(cwd), engine_name="book", **papermill_kwargs)


def main(argv=None) -> int:
    """`python -m book.notebook_run NOTEBOOK OUTPUT [--profile P] [--cwd DIR]`: one notebook, papermill, IPC."""
    parser = argparse.ArgumentParser(prog="python -m book.notebook_run",
                                     description="Run one notebook with papermill and the book's kernel start.")
    parser.add_argument("notebook")
    parser.add_argument("output")
    parser.add_argument("--profile", help="sets the notebook's PROFILE parameter (ci | small | gpu)")
    parser.add_argument("--cwd", help="the folder the kernel runs in (default: the notebook's own)")
    args = parser.parse_args(argv)
    parameters = {"PROFILE": args.profile} if args.profile else {}
    cwd = args.cwd or os.path.dirname(os.path.abspath(args.notebook))
    run_notebook(args.notebook, args.output, parameters=parameters, cwd=cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
