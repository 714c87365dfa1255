"""`make stress`: the tests that involve threads, processes and browsers, run many times while both cores
are kept busy, to show they do not depend on timing (issue 28).

Each suite runs in one pytest process with pytest-repeat's --count, under a background load of one busy
process per core. A test that fails even once is a bug to fix, not a run to repeat: the summary lists every
failure, and the command exits non-zero if there was one.

    python -m book.stress [--thread-runs 50] [--notebook-runs 10] [--browser-runs 5] [--only SUITE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "stress"

# suite -> (pytest arguments that select its tests, which option sets its number of runs). The first suite is
# every test in which a second thread or process takes part: the store's prefetch thread and its writer lock,
# the CUDA simulator's threads, the timer, the offloaded training that prefetches.
THREAD_TESTS = ("prefetch or random_access or second_process or one_store_per_directory or crash_mid_write"
                " or every_thread_of_a_block or time_cpu or offloaded_training")
SUITES = {
    "threads and store": (["tests/test_store.py", "tests/test_simulator.py", "tests/test_bench.py",
                           "tests/test_sintellix.py", "-k", THREAD_TESTS], "thread_runs"),
    "notebook start": (["tests/test_notebook_run.py"], "notebook_runs"),
    "browser": (["tests/test_browser.py"], "browser_runs"),
}

BUSY_LOOP = "while True: pass"


def start_load(processes: int) -> list[subprocess.Popen]:
    """One busy Python process per core: the machine is as loaded as a CI box running other jobs."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(processes)]


def stop_load(load: list[subprocess.Popen]) -> None:
    """End the busy processes and wait for them."""
    for process in load:
        process.kill()
    for process in load:
        process.wait()


def junit_counts(path: Path) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, the failed tests' ids) from a pytest JUnit XML report."""
    passed = failed = skipped = 0
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            failures.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failures


def run_suite(name: str, tests: list[str], runs: int) -> dict:
    """Run `tests` `runs` times in one pytest process; the counts and the failed tests' ids."""
    report = OUT / f"{name.replace(' ', '_')}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--count={runs}",
               "--repeat-scope=session", f"--junitxml={report}", *tests]
    print(f"== {name}: {' '.join(tests)}; {runs} runs", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT)
    seconds = time.monotonic() - started
    if not report.exists():
        return {"suite": name, "runs": runs, "passed": 0, "failed": 1, "skipped": 0, "seconds": round(seconds),
                "failures": ["pytest wrote no report"]}
    passed, failed, skipped, failures = junit_counts(report)
    return {"suite": name, "runs": runs, "passed": passed, "failed": failed, "skipped": skipped,
            "seconds": round(seconds), "failures": failures}


def main(argv=None) -> int:
    """The command line: load the cores, run the suites, print the table, exit 1 on any failure."""
    parser = argparse.ArgumentParser(prog="python -m book.stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--thread-runs", type=int, default=50)
    parser.add_argument("--notebook-runs", type=int, default=10)
    parser.add_argument("--browser-runs", type=int, default=5)
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    args = parser.parse_args(argv)
    for option in ("thread_runs", "notebook_runs", "browser_runs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    OUT.mkdir(parents=True, exist_ok=True)
    env_note = f"{args.load} busy processes on {os.cpu_count()} cores"
    load = start_load(args.load)
    results = []
    try:
        for name, (tests, option) in SUITES.items():
            if args.only and name not in args.only:
                continue
            results.append(run_suite(name, tests, getattr(args, option)))
    finally:
        stop_load(load)
    print(f"\nstress ({env_note}):")
    print(f"{'suite':<20} {'runs':>5} {'tests':>7} {'passed':>7} {'failed':>7} {'skipped':>8} {'seconds':>8}")
    for r in results:
        print(f"{r['suite']:<20} {r['runs']:>5} {r['passed'] + r['failed'] + r['skipped']:>7} {r['passed']:>7} "
              f"{r['failed']:>7} {r['skipped']:>8} {r['seconds']:>8}")
        for failure in r["failures"]:
            print(f"    FAILED {failure}")
    (OUT / "summary.json").write_text(json.dumps({"load": env_note, "suites": results}, indent=1) + "\n")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
