"""True INT6 / INT4 bit packing of quantised weights, and dequantisation straight from the packed bytes.

Source: the write-up (seed 001) and the parameter-golf entries it follows; no paper. The layout is
the plain one: values side by side, low bits first.

Chapter 02 (seed 001, H-ENN) claims an "INT6" artifact; its public code stores int8 per tensor. Here
the bits are really packed (values from `refimpl.quant.quantize_per_row`):

    INT6   four values in three bytes: values v0..v3 in [-32, 31], stored as u = v + 32 in [0, 63];
           byte0 = u0 | u1 << 6,  byte1 = u1 >> 2 | u2 << 4,  byte2 = u2 >> 4 | u3 << 2   (low bits first)
    INT4   two values per byte: u = v + 8 in [0, 15]; byte = u0 | u1 << 4

Packing works on the last dimension, row by row, so a packed weight [R, bytes] can be dequantised
row by row: w[r, j] = unpack(packed[r])[j] * scale[r].

Shapes: pack_bits q [..., n] (int) -> [..., packed_length(n, bits)] uint8;
        unpack_bits packed [..., bytes] -> [..., n] int8;  dequantize_packed packed [R, bytes], scale [R] -> [R, n].

Glossary: R rows, n values per row, bits 6 or 4.

Does not include: the quantisation itself (`refimpl.quant`), compression of the bytes (chapter 02 uses
the standard library's lzma), or per-group scales.
"""

from __future__ import annotations

import math

import torch

from refimpl.ops.contract import Contract


PACKED_BITS = (4, 6)


def packed_length(n: int, bits: int) -> int:
    """Bytes that n values take packed at `bits` bits: 3 per group of four at 6 bits, 1 per pair at 4."""
    if bits not in PACKED_BITS:
        raise ValueError(f"bits must be one of {PACKED_BITS} for packing, got {bits!r}")
    return 3 * -(-n // 4) if bits == 6 else -(-n // 2)


PACK_BITS = Contract("pack_bits", q="integer: ... n", empty_ok=True)
UNPACK_BITS = Contract("unpack_bits", packed="uint8: ... bytes", empty_ok=True)
DEQUANTIZE_PACKED = Contract("dequantize_packed", packed="uint8: R bytes", scale="R", empty_ok=True)


def _check_bits(op: str, bits) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"{op}: bits must be one of {PACKED_BITS}, got {bits!r}")


def check_pack_args(q, bits: int) -> tuple[int, int]:
    """Validate pack_bits' arguments; return (rows, n): q viewed as [rows, n]."""
    _check_bits("pack_bits", bits)
    (n,) = PACK_BITS.check(q=q)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < low or int(q.max()) > high):
        raise ValueError(f"pack_bits: {bits}-bit values must lie in [{low}, {high}], "
                         f"got [{int(q.min())}, {int(q.max())}]")
    return math.prod(q.shape[:-1]), n


def _check_length(op: str, row_bytes: int, n, bits: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or row_bytes != packed_length(n, bits):
        raise ValueError(f"{op}: {n} values at {bits} bits need {packed_length(max(int(n), 0), bits)} "
                         f"bytes per row, got {row_bytes}")


def check_unpack_args(packed, n: int, bits: int) -> int:
    """Validate unpack_bits' arguments; return rows: packed viewed as [rows, packed_length(n, bits)]."""
    _check_bits("unpack_bits", bits)
    (row_bytes,) = UNPACK_BITS.check(packed=packed)
    _check_length("unpack_bits", row_bytes, n, bits)
    return math.prod(packed.shape[:-1])


def check_dequantize_packed_args(packed, scale, n: int, bits: int) -> int:
    """Validate dequantize_packed's arguments; return the rows R."""
    _check_bits("dequantize_packed", bits)
    R, row_bytes = DEQUANTIZE_PACKED.check(packed=packed, scale=scale)
    _check_length("dequantize_packed", row_bytes, n, bits)
    return R


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [..., n] in [-2^(bits-1), 2^(bits-1) - 1] -> uint8 [..., packed_length(n, bits)].

    Each row (the last dimension) is packed on its own and zero padded to whole groups, so a
    packed matrix keeps its rows apart (a kernel can dequantise row r without reading row r - 1).
    """
    check_pack_args(q, bits)
    group = 4 if bits == 6 else 2                                                  # values per group
    u = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)                      # offset to [0, 2^bits)
    u = torch.nn.functional.pad(u, (0, -q.shape[-1] % group)).unflatten(-1, (-1, group))  # [..., groups, group]
    if bits == 4:
        return u[..., 0] | (u[..., 1] << 4)                                        # [..., groups]
    out = torch.stack([u[..., 0] | (u[..., 1] << 6),
                       (u[..., 1] >> 2) | (u[..., 2] << 4),
                       (u[..., 2] >> 4) | (u[..., 3] << 2)], dim=-1)               # [..., groups, 3]
    return out.flatten(-2)


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 [..., packed_length(n, bits)] from `pack_bits` -> int8 [..., n]."""
    check_unpack_args(packed, n, bits)
    if bits == 4:
        u = torch.stack([packed & 0x0F, packed >> 4], dim=-1)                       # [..., bytes, 2]
    else:
        b = packed.unflatten(-1, (-1, 3))                                           # [..., groups, 3]
        u = torch.stack([b[..., 0] & 0x3F,
                         (b[..., 0] >> 6) | ((b[..., 1] & 0x0F) << 2),
                         (b[..., 1] >> 4) | ((b[..., 2] & 0x03) << 4),
                         b[..., 2] >> 2], dim=-1)                                   # [..., groups, 4]
    u = u.flatten(-2)[..., :n]
    return (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """A packed per-row quantised matrix back to float32: packed uint8 [R, packed_length(n, bits)],
    scale [R] -> [R, n] (unpack, then multiply row r by scale[r]). The op a model loading the
    artifact runs once per weight; kernels fuse the two steps."""
    check_dequantize_packed_args(packed, scale, n, bits)
    return unpack_bits(packed, n, bits).float() * scale.float()[:, None]
