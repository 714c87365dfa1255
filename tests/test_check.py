"""The comparison helper: what passes, what does not, and what it reports."""

from __future__ import annotations

import pytest
import torch

from kernels.check import TOLERANCES, assert_close, compare


def test_within_tolerance_passes_and_just_beyond_fails():
    ref = torch.tensor([1.0, -2.0, 100.0])
    atol, rtol = TOLERANCES[torch.float32]
    inside = ref + 0.9 * (atol + rtol * ref.abs())
    outside = ref.clone()
    outside[2] += 1.5 * (atol + rtol * 100.0)
    assert compare(inside, ref).passed
    result = compare(outside, ref, "x")
    assert not result.passed and "1 of 3 elements" in result.message and "(2,)" in result.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_never_pass(bad):
    ref = torch.ones(4)
    out = ref.clone()
    out[1] = bad
    assert not compare(out, ref).passed
    assert not compare(torch.full((4,), bad), torch.full((4,), bad)).passed


def test_shape_dtype_and_integers():
    assert not compare(torch.zeros(3), torch.zeros(4)).shape_ok
    assert not compare(torch.zeros(3, dtype=torch.float64), torch.zeros(3)).dtype_ok
    assert compare(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])).passed
    assert not compare(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3])).passed  # indices match exactly


def test_relative_l2_error_is_reported():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)               # norm 5
    result = compare(ref + torch.tensor([0.0, 5e-6], dtype=torch.float64), ref, atol=1e-5)
    assert result.passed and result.rel_l2_error == pytest.approx(1e-6, rel=1e-3)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close(ref + 1, ref, "shifted")
