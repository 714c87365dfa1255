"""Per-row quantisation and the straight-through estimator. (INT6 / INT4 packing: tests/ops/test_quant_packing.py.)"""

from __future__ import annotations

import torch

from refimpl.quant import dequantize_per_row, fake_quantize, quantize_per_row


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
