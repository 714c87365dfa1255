"""The declarative shape check every op uses (`refimpl.ops.contract.Contract`): what it binds, what it refuses,
and that every op's check is one."""

from __future__ import annotations

import pytest
import torch

from refimpl import ops
from refimpl.ops.contract import Contract

GDR = Contract("gdr", q="B T H K", k="B T H K", v="B T H V", initial_state="B H V K?")


def _args(**change):
    args = dict(q=torch.zeros(2, 5, 3, 4), k=torch.zeros(2, 5, 3, 4), v=torch.zeros(2, 5, 3, 6), initial_state=None)
    return {**args, **change}


def test_the_sizes_come_back_one_per_letter_in_order():
    assert GDR.letters == ("B", "T", "H", "K", "V")
    assert GDR.check(**_args()) == (2, 5, 3, 4, 6)
    assert GDR.check(**_args(initial_state=torch.zeros(2, 3, 6, 4))) == (2, 5, 3, 4, 6)


def test_a_letter_only_an_absent_optional_argument_has_is_zero():
    c = Contract("scan", x="B T", theta="B T K?")
    assert c.check(x=torch.zeros(2, 3), theta=None) == (2, 3, 0)
    assert c.check(x=torch.zeros(2, 3), theta=torch.zeros(2, 3, 4)) == (2, 3, 4)


def test_leading_dots_take_any_number_of_leading_dimensions():
    c = Contract("norm", x="... C", weight="C")
    for shape in [(7,), (2, 7), (2, 3, 7)]:
        assert c.check(x=torch.zeros(shape), weight=torch.zeros(7)) == (7,)
    with pytest.raises(ValueError, match=r"norm: weight must be \[C\] = \[7\], got \[6\]"):
        c.check(x=torch.zeros(2, 7), weight=torch.zeros(6))


@pytest.mark.parametrize("change, message", [
    (dict(v=torch.zeros(2, 5, 2, 6)), r"gdr: v must be \[B, T, H, V\] = \[2, 5, 3, V\], got \[2, 5, 2, 6\]"),
    (dict(k=torch.zeros(5, 3, 4)), r"gdr: k must be \[B, T, H, K\] = \[2, 5, 3, 4\], got \[5, 3, 4\]"),
    (dict(initial_state=torch.zeros(2, 3, 4, 6)), r"initial_state must be \[B, H, V, K\] = \[2, 3, 6, 4\], got"),
    (dict(q=[[0.0]]), r"gdr: q must be a floating-point tensor \[B, T, H, K\], got list"),
    (dict(k=torch.zeros(2, 5, 3, 4, dtype=torch.int64)), r"k must be a floating-point tensor .*, got torch.int64"),
    (dict(v=torch.zeros(2, 5, 3, 6, dtype=torch.float64)), r"v must have q's dtype torch.float32, got torch.float64"),
    (dict(v=torch.zeros(2, 5, 3, 6, device="meta")), r"v must be on q's device cpu \(one device for all\), got meta"),
    (dict(v=torch.zeros(2, 5, 3, 0)), r"every size must be >= 1, got V = 0"),
    (dict(initial_state=torch.zeros(2, 3, 6, 4)[None]), r"initial_state must be \[B, H, V, K\]"),
])
def test_what_it_refuses_it_names(change, message):
    with pytest.raises(ValueError, match=message):
        GDR.check(**_args(**change))


def test_an_undeclared_or_missing_argument_is_a_programming_error():
    with pytest.raises(TypeError, match="takes exactly"):
        GDR.check(q=torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="'...' only first"):
        Contract("bad", x="B ... C")


def test_every_op_declares_its_shapes_as_a_contract():
    """Each op file's argument check is built on a Contract, so a reference and its kernels refuse shapes in one
    wording."""
    import importlib
    for op in ops.SWAPPABLE:
        module = importlib.import_module(f"refimpl.ops.{op}")
        contracts = [v for v in vars(module).values() if isinstance(v, Contract)]
        assert contracts, f"refimpl/ops/{op}.py declares no Contract"


def test_integer_and_uint8_arguments_and_empty_sizes():
    c = Contract("dequantize", packed="uint8: R bytes", scale="R")
    assert c.check(packed=torch.zeros(2, 3, dtype=torch.uint8), scale=torch.ones(2)) == (2, 3)
    with pytest.raises(ValueError, match=r"packed must be a uint8 tensor \[R, bytes\], got torch.int8"):
        c.check(packed=torch.zeros(2, 3, dtype=torch.int8), scale=torch.ones(2))
    assert c.check(packed=torch.zeros(2, 3, dtype=torch.uint8), scale=torch.ones(2, dtype=torch.float64)) == (2, 3)
    ints = Contract("pack", q="integer: ... n")
    with pytest.raises(ValueError, match=r"q must be an integer tensor \[..., n\], got torch.bool"):
        ints.check(q=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="every size must be >= 1, got n = 0"):
        ints.check(q=torch.zeros(2, 0, dtype=torch.int8))
    assert Contract("pack", q="integer: ... n", empty_ok=True).check(q=torch.zeros(2, 0, dtype=torch.int8)) == (0,)
    with pytest.raises(ValueError, match="kind must be one of"):
        Contract("bad", x="complex: N")
