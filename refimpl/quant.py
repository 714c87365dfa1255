"""Low-bit weights: per-row symmetric quantisation and the straight-through estimator.

Chapter 02 (seed 001, H-ENN) claims an "INT6" artifact of 15.9 MB. Its public code stores int8 per
tensor; the challenge entries it follows clamp to +-31 and keep one value per int8 byte.

Per-row symmetric quantisation with b bits: scale_r = max_j |w_rj| / q_max, q_max = 2^(b-1) - 1
(31 for INT6, 7 for INT4), q = round(w / scale).clamp(-q_max, q_max); the dequantised weight is q * scale.
A row of zeros gets scale 1 (and stays zeros). `fake_quantize` rounds in the forward pass and lets the
gradient through unchanged (the straight-through estimator), for quantisation-aware training.

Shapes: weight [R, K] (as nn.Linear stores it) -> q [R, K] int8, scale [R].

Does not include: the bit packing (INT6: four values in three bytes), which is the op
`refimpl.ops.quant_packing`; compression (chapter 02 uses the standard library's lzma); per-group scales.
"""

from __future__ import annotations

import torch

BITS = (4, 6, 8)


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def quantize_per_row(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [R, K] float -> (q [R, K] int8 in [-q_max, q_max], scale [R] float32)."""
    q_max = _check_bits(bits)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_per_row expects a float tensor [R, K], got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {list(getattr(weight, 'shape', []))}")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_per_row: the weight has inf or NaN entries")
    w = weight.detach().float()
    peak = w.abs().amax(dim=1)                                                    # [R]
    scale = torch.where(peak > 0, peak / q_max, torch.ones_like(peak))
    q = torch.round(w / scale[:, None]).clamp(-q_max, q_max).to(torch.int8)
    return q, scale


def dequantize_per_row(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [R, K] int8, scale [R]) -> float32 [R, K]."""
    if q.dim() != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"dequantize_per_row: need q [R, K] and scale [R], got {list(q.shape)} and {list(scale.shape)}")
    return q.float() * scale.float()[:, None]


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise then dequantise in the forward pass; pass the gradient straight through (Bengio et al. 2013).
    Training with this sees the rounding error it will meet after quantisation."""
    q, scale = quantize_per_row(weight, bits)
    rounded = dequantize_per_row(q, scale).to(weight.dtype)
    return weight + (rounded - weight).detach()


