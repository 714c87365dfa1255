"""The book's notebook kernels: IPC transport (no ports to race for), and a retry that covers only the
kernel start (book/notebook_run.py), for nbmake, papermill and the command line alike."""

from __future__ import annotations

import socket
import subprocess
import sys

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from traitlets import default

from book import notebook_run
from book.notebook_run import BookKernelManager, BookNotebookClient

TRANSPORT_CELL = ("import json, ipykernel.connect\n"
                  "print(json.load(open(ipykernel.connect.get_connection_file()))['transport'])")


def _notebook(*sources: str, parameters: str | None = None):
    nb = nbformat.v4.new_notebook()
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs)


class DiesOnFirstStart(BookKernelManager):
    """The first kernel this class launches exits at once, as one that lost its sockets would; later ones live."""
    launches = 0

    def format_kernel_cmd(self, extra_arguments=None):
        type(self).launches += 1
        if type(self).launches == 1:
            return [sys.executable, "-c", "import sys; sys.exit(3)"]
        return super().format_kernel_cmd(extra_arguments)


class PortTakenOnFirstStart(BookKernelManager):
    """The failure IPC avoids, made to happen: over TCP, the first kernel's shell port is taken by someone else
    between the client choosing it and the kernel binding it (what a second kernel starting at the same moment
    can do), so that kernel dies on start-up."""
    launches, thief = 0, None

    @default("transport")
    def _transport_default(self):
        return "tcp"

    @default("ip")
    def _ip_default(self):
        return "127.0.0.1"

    def format_kernel_cmd(self, extra_arguments=None):
        type(self).launches += 1
        if type(self).launches == 1:          # the connection file is written: take its shell port
            type(self).thief = socket.socket()
            type(self).thief.bind(("127.0.0.1", self.shell_port))
            type(self).thief.listen()
        return super().format_kernel_cmd(extra_arguments)


def test_a_port_taken_under_a_tcp_kernel_is_the_failure_and_the_retry_recovers(capfd):
    PortTakenOnFirstStart.launches = 0
    try:
        nb = BookNotebookClient(_notebook("print('ran')"), kernel_manager_class=PortTakenOnFirstStart,
                                startup_timeout=60).execute()
    finally:
        if PortTakenOnFirstStart.thief is not None:
            PortTakenOnFirstStart.thief.close()
    assert _text(nb.cells[0]).strip() == "ran"
    assert PortTakenOnFirstStart.launches == 2
    err = capfd.readouterr().err
    assert "Address already in use" in err and err.count("starting it again") == 1


def test_kernels_talk_over_ipc_sockets_not_tcp_ports():
    nb = BookNotebookClient(_notebook(TRANSPORT_CELL)).execute()
    assert _text(nb.cells[0]).strip() == "ipc"


def test_a_kernel_that_dies_on_start_is_started_again_and_says_so(capfd):
    DiesOnFirstStart.launches = 0
    client = BookNotebookClient(_notebook("print(6 * 7)"), kernel_manager_class=DiesOnFirstStart,
                                startup_timeout=60)
    nb = client.execute()
    assert _text(nb.cells[0]).strip() == "42"
    assert DiesOnFirstStart.launches == 2
    err = capfd.readouterr().err
    assert err.count("starting it again (attempt 2 of 3); no cell had run") == 1


def test_the_retry_gives_up_after_its_attempts(capfd, monkeypatch):
    class NeverStarts(BookKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-c", "import sys; sys.exit(3)"]

    with pytest.raises(RuntimeError, match="Kernel died"):
        BookNotebookClient(_notebook("1"), kernel_manager_class=NeverStarts, startup_timeout=60).execute()
    assert capfd.readouterr().err.count("starting it again") == notebook_run.KERNEL_START_ATTEMPTS - 1


def test_a_failing_cell_is_never_run_again(tmp_path, capfd):
    marks = tmp_path / "runs.txt"
    cell = f"open({str(marks)!r}, 'a').write('ran\\n')\nraise ValueError('this cell fails')"
    with pytest.raises(CellExecutionError, match="this cell fails"):
        BookNotebookClient(_notebook(cell)).execute()
    assert marks.read_text() == "ran\n"
    assert "starting it again" not in capfd.readouterr().err


def test_nbmake_runs_notebooks_with_the_books_client():
    import nbmake.nb_run
    assert nbmake.nb_run.NotebookClient is BookNotebookClient, "conftest.py no longer hands nbmake the book's client"


def test_papermill_runs_with_parameters_over_ipc(tmp_path):
    source, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(_notebook("print(PROFILE)", TRANSPORT_CELL, parameters="PROFILE = 'small'"), source)
    notebook_run.run_notebook(source, out, parameters={"PROFILE": "ci"}, cwd=tmp_path)
    cells = [c for c in nbformat.read(out, 4).cells if c.cell_type == "code"]
    assert [_text(c).strip() for c in cells[-2:]] == ["ci", "ipc"]


def test_the_command_line_runs_a_notebook(tmp_path):
    source, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(_notebook("print(PROFILE)", parameters="PROFILE = 'small'"), source)
    subprocess.run([sys.executable, "-m", "book.notebook_run", str(source), str(out), "--profile", "ci"],
                   check=True, capture_output=True, timeout=300)
    assert _text(nbformat.read(out, 4).cells[-1]).strip() == "ci"
