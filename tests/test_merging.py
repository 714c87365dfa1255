"""Task-vector merging on hand-made vectors, checked against results worked out by hand."""

from __future__ import annotations

import pytest
import torch

from refimpl.ops import average, elect_sign, task_arithmetic, ties_merge, ties_merge_as_written, trim

# Three task vectors over five parameters.
TAU = torch.tensor([[ 4.0, -1.0,  0.5, -3.0,  0.0],
                    [ 2.0,  3.0, -0.5, -1.0,  0.2],
                    [-1.0,  2.0,  0.1,  5.0, -0.3]])


def test_trim_keeps_the_top_fraction_by_magnitude():
    kept = trim(TAU, 0.4)                                         # ceil(0.4 * 5) = 2 per row
    assert kept.tolist() == [[4.0, 0.0, 0.0, -3.0, 0.0],
                             [2.0, 3.0, 0.0, 0.0, 0.0],
                             [0.0, 2.0, 0.0, 5.0, 0.0]]


def test_ties_by_hand():
    # trimmed (above): column sums 6, 5, 0, 2, 0 -> elected signs +, +, 0, +, 0
    # agreeing entries: col0 {4, 2} -> 3; col1 {3, 2} -> 2.5; col3 {5} (the -3 disagrees) -> 5
    merged = ties_merge(TAU, density=0.4, lam=1.0)
    assert merged.tolist() == [3.0, 2.5, 0.0, 5.0, 0.0]
    assert ties_merge(TAU, density=0.4, lam=0.5).tolist() == [1.5, 1.25, 0.0, 2.5, 0.0]


def test_mass_and_count_elect_differently():
    tau = torch.tensor([[-10.0], [1.0], [1.0]])                  # two small positives against one large negative
    assert elect_sign(tau, "mass").item() == -1.0
    assert elect_sign(tau, "count").item() == 1.0


def test_the_write_ups_variant_by_hand():
    # keep ceil(0.8 * 5) = 4 per row: row0 drops 0.0, row1 drops 0.2, row2 drops 0.1
    # vote signs per column: (+,+,-) +; (-,+,+) +; (+,-,0) 0; (-,-,+) -; (0,0,-) -
    # keep agreeing, divide by K = 3: col0 (4+2)/3 = 2; col1 (3+2)/3; col2 0; col3 (-3-1)/3; col4 -0.3/3
    merged = ties_merge_as_written(TAU)
    expected = torch.tensor([2.0, 5.0 / 3, 0.0, -4.0 / 3, -0.1])
    assert torch.allclose(merged, expected)


def test_average_and_task_arithmetic():
    assert torch.allclose(average(TAU), TAU.mean(0))
    assert torch.allclose(task_arithmetic(TAU, 0.3), 0.3 * TAU.sum(0))


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        ties_merge(torch.ones(5))
    with pytest.raises(ValueError, match="density must be in"):
        trim(TAU, 0.0)
    with pytest.raises(ValueError, match="sign rule"):
        elect_sign(TAU, "median")
