"""book.roofline: the floor is the larger of bytes / copy rate and FLOPs / matmul rate; the sentences follow the
numbers; the figure passes the figure check; a real (quick) measurement gates and times every variant."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from book import roofline  # noqa: E402
from book.figure_check import problems  # noqa: E402

CEILINGS = {"copy": {"per_second": 1e10}, "matmul_fp32": {"per_second": 1e11}}


def result(label, flops, times, fractions=None):
    """A benchmark_op-shaped result: 1 MB moved, `flops`, a median time per variant."""
    variants = {name: {"timing": None if t is None else {"median_s": t}, **(fractions or {}).get(name, {})}
                for name, t in times.items()}
    return {"label": label, "bytes_moved": 1e6, "flops": flops, "variants": variants}


def test_the_floor_is_the_larger_bound():
    compute = result("matmul-like", 1e9, {"reference": 0.05})       # memory 1e-4 s, compute 1e-2 s
    memory = result("copy-like", 1e5, {"reference": 0.001})         # memory 1e-4 s, compute 1e-6 s
    no_flops = result("no count", None, {"reference": 0.001, "numba": None})
    rows = roofline.rows([compute, memory, no_flops], CEILINGS)
    assert [(r.case, r.bound) for r in rows] == [("matmul-like", "compute"), ("copy-like", "memory"),
                                                 ("no count", "memory")]
    assert rows[0].floor_s == pytest.approx(1e-2) and rows[0].times_floor == pytest.approx(5.0)
    assert rows[1].floor_s == pytest.approx(1e-4) and rows[1].compute_floor_s == pytest.approx(1e-6)
    assert rows[2].compute_floor_s is None                          # a variant without timing is left out
    assert "| matmul-like | reference | 50 | 10 | compute | 5.0× |" in roofline.markdown(rows)


def test_the_findings_say_what_was_measured():
    fast = {"numba": {"fraction_of_matmul": 0.2, "fraction_of_copy_bandwidth": 0.01},
            "eager builtin": {"fraction_of_matmul": 0.1, "fraction_of_copy_bandwidth": 0.005}}
    slow = {"numba": {"fraction_of_matmul": None, "fraction_of_copy_bandwidth": 0.5},
            "eager builtin": {"fraction_of_matmul": None, "fraction_of_copy_bandwidth": 0.8}}
    text = roofline.findings([
        result("attention", 1e9, {"reference": 3e-3, "numba": 1e-3, "eager builtin": 2e-3}, fast),
        result("rms_norm", None, {"reference": 3e-3, "numba": 2e-3, "eager builtin": 1e-3}, slow),
        result("no builtin", None, {"reference": 1e-3, "numba": 1e-3})])
    lines = text.splitlines()
    assert len(lines) == 2                                          # a case without a built-in says nothing
    assert "numba 1 ms, 2.00× as fast as PyTorch's built-in (2 ms)" in lines[0]
    assert "the built-in reaches 10% and numba 20%" in lines[0]
    assert "numba 2 ms, 2.00× slower than PyTorch's built-in (1 ms)" in lines[1]
    assert "numba 50% of the measured copy rate, the built-in 80%" in lines[1]


def test_the_figure_is_fit_to_print():
    rows = roofline.rows([result("attention (causal GQA)", 1e9, {"reference": 3e-3, "numba": 1e-3,
                                                                "eager builtin": 2e-3})], CEILINGS)
    assert problems(roofline.figure(rows, "title")) == []


def test_a_quick_measurement_gates_and_times_every_variant():
    cases = roofline.shared_block_cases("tiny")
    assert [c.label or c.op for c in cases] == ["rms_norm", "attention (causal GQA)", "attention (window 5)"]
    assert all(c.flops and c.eager_builtin for c in cases)
    results, ceilings = roofline.measure(cases, quick=True)
    assert all(not r["failed"] for r in results), [r["failed"] for r in results]
    rows = roofline.rows(results, ceilings)
    assert {r.variant for r in rows} == {"reference", "numba", "eager builtin"} and len(rows) == 9
    assert all(r.seconds > 0 and r.floor_s > 0 for r in rows)
