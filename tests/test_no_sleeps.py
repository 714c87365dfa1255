"""Tests wait for conditions, never for time: no `time.sleep` or `threading.Timer` in tests/ (a sleep is a
guess about how fast a machine is, and a busy CI machine makes it wrong). A call that must stay says why on
its own line, with a comment that starts `# sleep-ok:`."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FORBIDDEN = {"sleep", "Timer"}          # time.sleep, asyncio.sleep (in a test), threading.Timer
EXCUSE = "# sleep-ok:"


def timing_waits(source: str) -> list[tuple[int, str]]:
    """(line, call) for each call of a FORBIDDEN name whose line carries no EXCUSE comment."""
    excused = {token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline)
               if token.type == tokenize.COMMENT and token.string.startswith(EXCUSE)
               and len(token.string) > len(EXCUSE) + 3}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in FORBIDDEN and node.lineno not in excused:
                found.append((node.lineno, ast.unparse(node.func)))
    return found


def _test_sources() -> list[Path]:
    return sorted(TESTS.rglob("*.py")) + [ROOT / "conftest.py"]


@pytest.mark.parametrize("path", _test_sources(), ids=lambda p: p.name)
def test_no_test_waits_by_sleeping(path):
    found = timing_waits(path.read_text())
    assert not found, (f"{path.name} waits by the clock at " + ", ".join(f"line {n} ({call})" for n, call in found)
                       + f": wait for the condition instead (an Event, a hook, the browser's wait), or say why "
                         f"with `{EXCUSE} <reason>` on the line")


@pytest.mark.parametrize("source, expected", [
    ("import time\ntime.sleep(1)\n", [(2, "time.sleep")]),
    ("from time import sleep\nsleep(0.5)\n", [(2, "sleep")]),
    ("import threading\nt = threading.Timer(0.2, print)\n", [(2, "threading.Timer")]),
    ("import asyncio\nasync def f():\n    await asyncio.sleep(1)\n", [(3, "asyncio.sleep")]),
    ("import time\ntime.sleep(1)  # sleep-ok: plays a slow disk for the timeout test\n", []),
    ("import time\ntime.sleep(1)  # sleep-ok:\n", [(2, "time.sleep")]),           # an excuse must say why
    ("s = 'time.sleep(1)'\n", []),                                                   # text, not a call
], ids=["time.sleep", "bare sleep", "threading.Timer", "asyncio.sleep", "excused", "empty excuse", "in a string"])
def test_the_rule_finds_what_it_should(source, expected):
    assert timing_waits(source) == expected
