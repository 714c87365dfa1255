"""The teaching tools: every worked solution passes its checker, every stub and a wrong answer fail it with a
plain message; `show` shows the code that runs (a swapped kernel under kernels.use, one CUDA kernel of a .cu)."""

from __future__ import annotations

import pytest
import torch

import kernels
from book import solutions
from book.exercises import EXERCISES, check
from book.show import show, source_of
from refimpl import ops


@pytest.mark.parametrize("name", EXERCISES)
def test_every_solution_passes_its_checker(name):
    assert check(name, getattr(solutions, name), quiet=True).passed


@pytest.mark.parametrize("name", EXERCISES)
def test_every_stub_fails_its_checker(name):
    namespace = {}
    exec(EXERCISES[name].stub(), namespace)                  # the stub exactly as the notebook offers it
    stub = next(v for k, v in namespace.items() if callable(v) and not k.startswith("__"))
    result = check(name, stub, quiet=True)
    assert not result.passed and result.problems == ["not written yet (the stub raises NotImplementedError)"]


def test_a_wrong_answer_is_told_where_and_by_how_much():
    def slightly_off(x, weight, eps):
        return solutions.rms_norm(x, weight, eps) * 1.01
    result = check("rms_norm", slightly_off, quiet=True)
    assert not result.passed
    assert "elements are off; at (0, 0, 0) you have" in str(result) and "the book has" in str(result)


def test_a_wrong_shape_and_a_crash_are_told_plainly():
    shape = check("rms_norm", lambda x, weight, eps: x.mean(-1), quiet=True)
    assert "the result has shape [2, 5], expected [2, 5, 8]" in str(shape)
    crash = check("attention", lambda q, k, v: q @ v, quiet=True)
    assert "raised RuntimeError" in str(crash)
    mask = check("causal_mask", lambda T, S, window: solutions.causal_mask(T, S, window + 1), quiet=True)
    assert "entries wrong, first at" in str(mask)
    pair = check("scan_step", lambda *args: solutions.scan_step(*args)[0], quiet=True)
    assert "returned 1 value(s), expected 2" in str(pair)


def test_show_gives_the_source_that_runs():
    text, where, language = source_of(ops.rms_norm)
    assert text.startswith("def rms_norm(") and where.startswith("refimpl/ops/rms_norm.py:") and language == "python"
    with kernels.use("numba", ops=["rms_norm"]):
        swapped, where_swapped, _ = source_of(ops.rms_norm)   # the counting wrapper unwrapped: the kernel
    assert where_swapped.startswith("kernels/rms_norm.py:") and swapped != text


def test_show_takes_one_cuda_kernel_or_a_part():
    cuda, where, language = source_of("kernels/rms_norm.cu")
    assert language == "cuda" and "__global__" in cuda
    name = next(line.split("(")[0].split()[-1] for line in cuda.splitlines() if "__global__" in line)
    one, _, _ = source_of("kernels/rms_norm.cu", part=name)
    assert one.count("__global__") == 1 and one.rstrip().endswith("}")
    part, _, _ = source_of(ops.rms_norm, part="inv_rms")
    assert part.lstrip().startswith("inv_rms") and "def rms_norm" not in part
    with pytest.raises(ValueError, match="has no __global__ kernel named 'nope'; it has"):
        source_of("kernels/rms_norm.cu", part="nope")
    with pytest.raises(ValueError, match="no file"):
        source_of("kernels/missing.cu")


def test_show_prints_outside_a_notebook(capsys):
    text = show(solutions.rms_norm)
    assert "def rms_norm" in capsys.readouterr().out and "def rms_norm" in text


def test_the_solutions_are_not_the_books_code():
    """A solution that called the reference would pass trivially; the solutions are written out."""
    import inspect
    source = inspect.getsource(solutions)
    assert "refimpl" not in source and "ops." not in source
    assert torch.equal(solutions.causal_mask(3, 5, 2), ops.attention_mask(3, 5, True, 2))


def test_an_exercise_shows_its_task_and_stub(capsys):
    from book.exercises import exercise
    e = exercise("delta_rule_step")
    out = capsys.readouterr().out
    assert "def delta_rule_step(S, q, k, v, alpha, beta):" in out and "NotImplementedError" in out
    assert e.name == "delta_rule_step"
    with pytest.raises(KeyError, match="no exercise 'nope'; the exercises are rms_norm"):
        exercise("nope")
