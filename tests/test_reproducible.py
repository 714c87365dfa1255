"""Reproducibility: each chapter's `ci` profile, run twice, writes the same metrics.json.

Fixed seeds and a fixed data order make every trained number repeat exactly; what a clock measured (times,
speed-ups, and claims stated in them) is left out by one written rule, `book.reproducible_part`, tested below.
The two runs go side by side, one CPU thread each, so the pair costs about one ordinary run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import book

from refimpl.io import read_json

CHAPTERS = [p.stem for p in book.chapters()]


def test_the_rule_leaves_out_what_a_clock_measured_and_nothing_else():
    metrics = {"training": {"seconds": 12.5, "val_bits_per_byte": 2.5, "steps": 600},
               "kernel_speedups": {"numba": 3.0}, "refinement": {"refine_ms": 89.0, "refined_bpb": 4.2},
               "store": {"steps_per_second": 2.1, "hit_rate": 0.027}, "store_overhead": {"prefetch": 9.4},
               "store runs": {"1/4, prefetching the next block": {"hit_rate": 0.16}, "1/4": {"hit_rate": 0.03}},
               "scaling": {"slopes": {"step_ms": 0.97}, "T": [64, 128]}, "second_half_bpb": 2.9,
               "wall_clock_budget": {"steps": 75, "val_bpb": 4.77}, "artifact_budget": {"bytes": 10},
               "claims": [{"claim": "refinement adds 2–3 ms", "measured": "89 ms for 3 steps", "verdict": "no"},
                          {"claim": "zero forgetting", "measured": "+1.17 bits/byte", "verdict": "does not hold"},
                          {"claim": "fast", "measured": "90 s vs 63 s", "verdict": "slower"},
                          {"claim": "state", "measured": "second half 2.896 vs 2.928", "verdict": "holds"}]}
    part, dropped = book.reproducible_part(metrics)
    assert part == {"training": {"val_bits_per_byte": 2.5, "steps": 600}, "refinement": {"refined_bpb": 4.2},
                    "store": {"hit_rate": 0.027}, "scaling": {"T": [64, 128]}, "second_half_bpb": 2.9,
                    "store runs": {"1/4": {"hit_rate": 0.03}}, "artifact_budget": {"bytes": 10},
                    "claims": [metrics["claims"][1], metrics["claims"][3]]}
    assert sorted(dropped) == sorted(["training.seconds", "kernel_speedups", "refinement.refine_ms",
                                      "store.steps_per_second", "store_overhead", "scaling.slopes",
                                      "store runs.1/4, prefetching the next block", "wall_clock_budget",
                                      "claims['refinement adds 2–3 ms']", "claims['fast']"])
    assert metrics["training"]["seconds"] == 12.5            # the input is not changed
    assert _differences(part, part) == []
    assert _differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0}) == ["d: only in one run",
                                                                                     "b.c: 2 != 3"]


def _leaves(value) -> int:
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(_leaves(v) for v in value) or 1
    return 1


def _differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}".lstrip(".") + ": only in one run" for k in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b), key=str):
            out += _differences(a[key], b[key], f"{path}.{key}")
        return out
    return [] if a == b else [f"{path.lstrip('.')}: {str(a)[:200]} != {str(b)[:200]}"]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_ci_profile_twice_gives_the_same_metrics(chapter, tmp_path):
    notebook = book.ROOT / "notebooks" / f"{chapter}.ipynb"
    runs = []
    for run in ("first", "second"):
        env = dict(os.environ, BOOK_PROFILE="ci", BOOK_OUTPUT_DIR=str(tmp_path / run), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        command = [sys.executable, "-m", "book.notebook_run", str(notebook), str(tmp_path / f"{run}.ipynb"),
                   "--profile", "ci", "--cwd", str(notebook.parent)]
        log = open(tmp_path / f"{run}.log", "wb")
        runs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for run, (process, log) in zip(("first", "second"), runs):
        try:
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        assert process.returncode == 0, \
            f"{chapter} ({run} run) failed:\n{(tmp_path / f'{run}.log').read_text()[-3000:]}"

    first, second = (read_json(tmp_path / run / "figures" / chapter / "metrics.json")["metrics"]
                     for run in ("first", "second"))
    (part1, dropped1), (part2, dropped2) = book.reproducible_part(first), book.reproducible_part(second)
    assert _leaves(part1) >= 5, f"{chapter}: only {_leaves(part1)} numbers left to compare"
    assert dropped1 == dropped2
    differences = _differences(part1, part2)
    assert not differences, f"{chapter}: the two runs differ in\n" + "\n".join(differences[:20])
