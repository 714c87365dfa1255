"""Low-bit weights: per-row symmetric quantisation, true INT6 / INT4 bit packing, and the
straight-through estimator for quantisation-aware training.

Chapter 02 (seed 001, H-ENN) claims an "INT6" artifact of 15.9 MB. Its public code stores int8 per
tensor; the challenge entries it follows clamp to +-31 and keep one value per int8 byte. Here the
bits are really packed:

    INT6   four values in three bytes: values v0..v3 in [-32, 31], stored as u = v + 32 in [0, 63];
           byte0 = u0 | u1 << 6,  byte1 = u1 >> 2 | u2 << 4,  byte2 = u2 >> 4 | u3 << 2   (low bits first)
    INT4   two values per byte: u = v + 8 in [0, 15]; byte = u0 | u1 << 4

Per-row symmetric quantisation with b bits: scale_r = max_j |w_rj| / q_max, q_max = 2^(b-1) - 1
(31 for INT6, 7 for INT4), q = round(w / scale).clamp(-q_max, q_max); the dequantised weight is q * scale.
A row of zeros gets scale 1 (and stays zeros).

Glossary: R rows, K columns (a weight [R, K] as nn.Linear stores it), n values packed.

Does not include: compression of the packed bytes (the artifact calculator in chapter 02 does that
with the standard library's lzma), or per-group scales.
"""

from __future__ import annotations

import numpy as np
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


def _as_values(q, low: int, high: int, name: str) -> np.ndarray:
    values = np.asarray(q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else q).reshape(-1)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name}: values must be integers, got {values.dtype}")
    if values.size and (values.min() < low or values.max() > high):
        raise ValueError(f"{name}: values must lie in [{low}, {high}], got [{values.min()}, {values.max()}]")
    return values.astype(np.int16)


def pack_int6(q) -> bytes:
    """Integers in [-32, 31] (any shape, flattened) -> 3 * ceil(n / 4) bytes."""
    u = (_as_values(q, -32, 31, "pack_int6") + 32).astype(np.uint8)
    u = np.concatenate([u, np.zeros(-len(u) % 4, np.uint8)]).reshape(-1, 4)     # [groups, 4], zero padded
    out = np.empty((len(u), 3), np.uint8)
    out[:, 0] = u[:, 0] | (u[:, 1] << 6)
    out[:, 1] = (u[:, 1] >> 2) | (u[:, 2] << 4)
    out[:, 2] = (u[:, 2] >> 4) | (u[:, 3] << 2)
    return out.tobytes()


def unpack_int6(data: bytes, n: int) -> torch.Tensor:
    """The first n values packed by `pack_int6`, as int8 [n]."""
    if n < 0 or len(data) != 3 * -(-n // 4):
        raise ValueError(f"unpack_int6: {n} values need {3 * -(-max(n, 0) // 4)} bytes, got {len(data)}")
    b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.uint8)
    u = np.empty((len(b), 4), np.uint8)
    u[:, 0] = b[:, 0] & 0x3F
    u[:, 1] = (b[:, 0] >> 6) | ((b[:, 1] & 0x0F) << 2)
    u[:, 2] = (b[:, 1] >> 4) | ((b[:, 2] & 0x03) << 4)
    u[:, 3] = b[:, 2] >> 2
    return torch.from_numpy(u.reshape(-1)[:n].astype(np.int8) - 32)


def pack_int4(q) -> bytes:
    """Integers in [-8, 7] (any shape, flattened) -> ceil(n / 2) bytes."""
    u = (_as_values(q, -8, 7, "pack_int4") + 8).astype(np.uint8)
    u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)]).reshape(-1, 2)
    return (u[:, 0] | (u[:, 1] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, n: int) -> torch.Tensor:
    """The first n values packed by `pack_int4`, as int8 [n]."""
    if n < 0 or len(data) != -(-n // 2):
        raise ValueError(f"unpack_int4: {n} values need {-(-max(n, 0) // 2)} bytes, got {len(data)}")
    b = np.frombuffer(data, np.uint8)
    u = np.stack([b & 0x0F, b >> 4], axis=1).reshape(-1)
    return torch.from_numpy(u[:n].astype(np.int8) - 8)
