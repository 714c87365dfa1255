"""INT6 / INT4 packing round-trips exactly; per-row quantisation and the straight-through estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refimpl.quant import (dequantize_per_row, fake_quantize, pack_int4, pack_int6, quantize_per_row, unpack_int4,
                           unpack_int6)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1001, 4096])
def test_int6_round_trip_is_exact_and_really_packed(n):
    g = torch.Generator().manual_seed(n)
    values = torch.randint(-32, 32, (n,), generator=g, dtype=torch.int8)
    if n >= 2:
        values[0], values[-1] = -32, 31                                   # both extremes
    data = pack_int6(values)
    assert len(data) == 3 * -(-n // 4)                                    # 6 bits per value, not 8
    assert torch.equal(unpack_int6(data, n), values)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_int4_round_trip_is_exact_and_really_packed(n):
    g = torch.Generator().manual_seed(n)
    values = torch.randint(-8, 8, (n,), generator=g, dtype=torch.int8)
    if n >= 2:
        values[0], values[-1] = -8, 7
    data = pack_int4(values)
    assert len(data) == -(-n // 2)
    assert torch.equal(unpack_int4(data, n), values)


def test_int6_layout_by_hand():
    # u = v + 32: (1, 2, 3, 63) -> byte0 = 1 | 2<<6 = 129, byte1 = 2>>2 | 3<<4 = 48, byte2 = 3>>4 | 63<<2 = 252
    assert pack_int6(np.array([-31, -30, -29, 31])) == bytes([129, 48, 252])


def test_per_row_quantisation():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.1, 0.0, -3.1]])
    q, scale = quantize_per_row(w, 6)
    assert q.dtype == torch.int8 and q.abs().max() <= 31
    assert q[0].tolist() == [16, -31, 8] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [31, 0, -31]
    assert torch.allclose(scale, torch.tensor([1 / 31, 1.0, 0.1]))
    err = (dequantize_per_row(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()                      # rounding error at most half a step
    q4, _ = quantize_per_row(w, 4)
    assert q4.abs().max() <= 7


def test_straight_through_estimator():
    w = torch.randn(4, 6, requires_grad=True)
    out = fake_quantize(w, 4)
    q, scale = quantize_per_row(w, 4)
    assert torch.allclose(out, dequantize_per_row(q, scale))             # forward: the quantised weight
    (out * torch.arange(24.0).view(4, 6)).sum().backward()
    assert torch.equal(w.grad, torch.arange(24.0).view(4, 6))            # backward: the identity


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match=r"\[-32, 31\]"):
        pack_int6(np.array([32]))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([-9]))
    with pytest.raises(ValueError, match="integers"):
        pack_int6(np.array([1.5]))
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_int6(b"\x00\x00", 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_per_row(torch.randn(2, 2), 5)
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        quantize_per_row(torch.randn(2), 6)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_row(torch.tensor([[float("nan")]]), 6)
