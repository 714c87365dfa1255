"""INT6 / INT4 packing round-trips exactly; per-row quantisation and the straight-through estimator."""

from __future__ import annotations

import pytest
import torch

from refimpl.quant import dequantize_per_row, fake_quantize, quantize_per_row
from refimpl.ops import dequantize_packed, pack_bits, packed_length, unpack_bits


def _random_values(shape, bits, seed):
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    if values.numel() >= 2:
        values.view(-1)[0], values.view(-1)[-1] = low, high                 # both extremes
    return values


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 1001, 4096])
def test_round_trip_is_exact_and_really_packed(n, bits):
    values = _random_values((n,), bits, n)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (3 * -(-n // 4) if bits == 6 else -(-n // 2))  # 6 (or 4) bits per value, not 8
    assert torch.equal(unpack_bits(packed, n, bits), values)


@pytest.mark.parametrize("bits", [4, 6])
def test_rows_are_packed_apart(bits):
    values = _random_values((5, 7), bits, 1)
    packed = pack_bits(values, bits)
    assert packed.shape == (5, packed_length(7, bits))
    for r in range(5):
        assert torch.equal(packed[r], pack_bits(values[r], bits))
    assert torch.equal(unpack_bits(packed, 7, bits), values)


def test_int6_layout_by_hand():
    # u = v + 32: (1, 2, 3, 63) -> byte0 = 1 | 2<<6 = 129, byte1 = 2>>2 | 3<<4 = 48, byte2 = 3>>4 | 63<<2 = 252
    assert pack_bits(torch.tensor([-31, -30, -29, 31]), 6).tolist() == [129, 48, 252]
    # u = v + 8: (0, 15) -> 0 | 15<<4 = 240
    assert pack_bits(torch.tensor([-8, 7]), 4).tolist() == [240]


@pytest.mark.parametrize("bits", [4, 6])
def test_dequantize_packed_equals_dequantize_per_row(bits):
    w = torch.randn(6, 13, generator=torch.Generator().manual_seed(bits))
    q, scale = quantize_per_row(w, bits)
    assert torch.equal(dequantize_packed(pack_bits(q, bits), scale, 13, bits), dequantize_per_row(q, scale))


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
        pack_bits(torch.tensor([32]), 6)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_bits(torch.tensor([-9]), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.tensor([1.5]), 6)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 6)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.int8), 4, 6)
    with pytest.raises(ValueError, match=r"scale \[R\]"):
        dequantize_packed(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(3), 4, 6)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_per_row(torch.randn(2, 2), 5)
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        quantize_per_row(torch.randn(2), 6)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_row(torch.tensor([[float("nan")]]), 6)
