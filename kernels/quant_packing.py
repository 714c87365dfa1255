"""Bit-packing kernels: INT6 / INT4 pack, unpack, and the fused unpack-and-scale.

Reference: `refimpl.quant` (the layouts are in its module docstring).
    pack_bits(q, bits)                       integers [..., n] in [-2^(bits-1), 2^(bits-1) - 1]
                                             -> uint8 [..., packed_length(n, bits)]
    unpack_bits(packed, n, bits)             uint8 [..., packed_length(n, bits)] -> int8 [..., n]
    dequantize_packed(packed, scale, n, bits)  uint8 [R, packed_length(n, bits)], scale [R]
                                             -> float32 [R, n] = unpacked value * scale[r]

These are not recurrences: no value depends on another. They move bytes, a few shifts and
masks per value, so they are bound by memory bandwidth, and the only question for the
parallelisation is who writes which byte.

Why the unit of work is a group, not a value or a byte. At 6 bits the value boundaries and
the byte boundaries line up only every lcm(6, 8) = 24 bits: four values in three bytes,

    byte0 = u0 | u1 << 6,   byte1 = u1 >> 2 | u2 << 4,   byte2 = u2 >> 4 | u3 << 2     (u = v + 32)

Value u1 straddles bytes 0 and 1, u2 straddles bytes 1 and 2. A worker per value would have
two workers writing parts of the same byte: a read-modify-write race (it would need atomicOr,
and the output zeroed first). A worker per byte would gather bits from two values and need to
know which byte of the group it is. A worker per *group* reads its four values and writes its
three whole bytes (unpacking: reads three bytes, writes four values); no byte is written by
two workers, so there are no races and nothing to synchronise. At 4 bits the group is two
values in one byte (lcm(4, 8) = 8), byte = u0 | u1 << 4 with u = v + 8.

Rows stay apart because `pack_bits` pads every row (the last dimension) to whole groups with
zero bits: a group never spans two rows, row r's bytes start at r * packed_length(n, bits),
and a worker finds its row and its group within it by one division. In the last group of a
row the positions past n are padding: packing reads them as code 0, unpacking writes nothing
there (whatever bits a packed buffer has there are ignored, as in the reference).

The ladder
    numba       prange over every group of every row (rows * groups iterations, split by numba into
                one chunk per core), the group's bytes and values handled in registers.
    numba_cuda  v1 (registered): one GPU thread per group. Neighbouring threads own neighbouring
                groups, so a warp's byte loads and stores fall in a few contiguous 32-byte
                segments (coalesced, but one byte per instruction).
    cupy        quant_packing.cu: pack_bits_group_per_thread, unpack_bits_group_per_thread,
                dequantize_packed_group_per_thread, the same in CUDA C.
One worker's whole job (`_pack_group`; `_group_codes` for unpacking) is written once here in
Python and compiled for both numba targets, which differ only in how the workers are numbered;
quant_packing.cu spells it out again in C.

Faster rung, for the GPU issue: each thread handles four INT6 groups = 16 values = 12 bytes =
three 32-bit words. Packing, it loads its 16 int8 values with one 128-bit load and stores three
32-bit words; unpacking, it loads three words and stores 16 int8 values with one 128-bit store
(dequantising: 16 floats, four 128-bit stores), instead of one byte per instruction. INT4
likewise, eight values per 32-bit word. Its catch: a packed row of 3 * groups bytes starts 4-byte aligned only when the
row's group count is a multiple of 4, so a vectorised kernel needs aligned rows (or the buffer
treated as one long row when there is no padding) and a scalar path for heads and tails.

dtypes: pack_bits accepts int8, int16, int32 and int64 as the reference does; after the
reference's range check every value fits in int8, so the wrappers convert to int8 (a copy
for the wider types) and the kernels read int8 only. unpack_bits takes uint8 and returns int8.
dequantize_packed returns float32 like the reference and computes as it does,
float32(value) * float32(scale): the scale may be float32 or float64 for numba (a float64 scale
is rounded to float32 first, as `scale.float()` does), float32 only for the CUDA backends.
The product is one correctly rounded float32 multiply on every backend, so it equals the
reference bit for bit. Indices are 64-bit throughout (numba's cuda.grid(1) is int64; quant_packing.cu
uses long long), so there is no size limit below what memory holds.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import torch
from numba import cuda

from kernels import launch
from kernels.registry import register
from kernels.tensors import (NUMBA_FASTMATH, cupy_view, expect_device, expect_dtype, forward_only, new_output,
                             numba_cuda_view, numpy_view)
from refimpl import ops

register("pack_bits", "reference")(ops.pack_bits)
register("unpack_bits", "reference")(ops.unpack_bits)
register("dequantize_packed", "reference")(ops.dequantize_packed)

VALUES_PER_GROUP = {6: 4, 4: 2}   # a group: the fewest values that fill whole bytes (lcm(bits, 8) bits: 3 or 1)


# ---------------------------------------------------------------- one worker's group, for both numba targets
# Written once in Python, compiled twice: by numba.njit for the CPU kernels and as numba.cuda device
# functions for the GPU ones (and run as plain Python by the CUDA simulator). Everything is widened to
# int32 first: the codes u = v + 2^(bits-1) (0..63 or 0..15) are shifted past 8 bits before the masks.

def _pack_group(q, bits, r, g, packed):
    """Worker (r, g): read group g of row r of q [rows, n] int8, write its bytes of packed [rows, bytes].
    A group always starts inside the row; its later values may lie past the end: padding, code 0."""
    n = q.shape[1]
    offset = 1 << (bits - 1)
    if bits == 6:
        i = 4 * g
        u0 = numba.int32(q[r, i]) + offset
        u1 = numba.int32(q[r, i + 1]) + offset if i + 1 < n else 0
        u2 = numba.int32(q[r, i + 2]) + offset if i + 2 < n else 0
        u3 = numba.int32(q[r, i + 3]) + offset if i + 3 < n else 0
        packed[r, 3 * g] = (u0 | (u1 << 6)) & 0xFF             # u0, then u1's low 2 bits
        packed[r, 3 * g + 1] = ((u1 >> 2) | (u2 << 4)) & 0xFF   # u1's high 4 bits, u2's low 4
        packed[r, 3 * g + 2] = ((u2 >> 4) | (u3 << 2)) & 0xFF   # u2's high 2 bits, then u3
    else:
        i = 2 * g
        u0 = numba.int32(q[r, i]) + offset
        u1 = numba.int32(q[r, i + 1]) + offset if i + 1 < n else 0
        packed[r, g] = (u0 | (u1 << 4)) & 0xFF                  # u0 in the low nibble, u1 in the high


def _group_codes(packed, bits, r, g):
    """Group g of row r of packed [rows, bytes] as four codes (an INT4 pair followed by two zeros)."""
    if bits == 6:
        b0, b1, b2 = numba.int32(packed[r, 3 * g]), numba.int32(packed[r, 3 * g + 1]), numba.int32(packed[r, 3 * g + 2])
        return b0 & 0x3F, (b0 >> 6) | ((b1 & 0x0F) << 2), (b1 >> 4) | ((b2 & 0x03) << 4), b2 >> 2
    b = numba.int32(packed[r, g])
    return b & 0x0F, b >> 4, b & 0, b & 0                       # (b & 0: a zero of the same type)


_pack_group_cpu, _group_codes_cpu = (numba.njit(inline="always", cache=True)(f) for f in (_pack_group, _group_codes))
_pack_group_gpu, _group_codes_gpu = (cuda.jit(device=True)(f) for f in (_pack_group, _group_codes))


# ---------------------------------------------------------------- argument checks and outputs

def _workers(rows: int, n: int, bits: int) -> int:
    """How many groups, so workers, `rows` rows of n values make: each row is padded to whole groups."""
    return rows * -(-n // VALUES_PER_GROUP[bits])


def _prepare_pack(q, bits, backend):
    rows, n = ops.check_pack_args(q, bits)                 # the reference's check: bits, integer dtype, range
    expect_device("pack_bits", backend, {"q": q})
    # In range means it fits in int8: a copy for int16/32/64 inputs, none for int8 ones.
    values = q.to(torch.int8).reshape(rows, n)
    nbytes = ops.packed_length(n, bits)
    packed = new_output((*q.shape[:-1], nbytes), torch.uint8, q.device)
    return values, packed.view(rows, nbytes), packed, _workers(rows, n, bits)   # (kernel's 2-D views, output, workers)


def _prepare_unpack(packed, n, bits, backend):
    rows = ops.check_unpack_args(packed, n, bits)          # the reference's check: bits, uint8, bytes per row
    expect_device("unpack_bits", backend, {"packed": packed})
    out = new_output((*packed.shape[:-1], n), torch.int8, packed.device)
    return packed.reshape(rows, packed.shape[-1]), out.view(rows, n), out, _workers(rows, n, bits)


def _prepare_dequantize(packed, scale, n, bits, backend, scale_dtypes):
    ops.check_dequantize_packed_args(packed, scale, n, bits)
    expect_dtype("dequantize_packed", "scale", scale, scale_dtypes)
    expect_device("dequantize_packed", backend, {"packed": packed, "scale": scale})
    forward_only("dequantize_packed", scale)                 # the reference would pass a gradient to scale
    R = packed.shape[0]
    return new_output((R, n), torch.float32, packed.device), _workers(R, n, bits)


# Each wrapper launches nothing when there is no group at all (n = 0 or no rows): the output is empty,
# and a CUDA grid of zero blocks would be a launch error.

# ---------------------------------------------------------------- numba (CPU)
# A prange task per span of up to SPAN groups of one row: inside it, the whole groups run in a loop with no
# branch and no division (which LLVM vectorises: the bytes of many groups at once), and only a row's last,
# partial group goes through the per-group functions above. (The first version, a task per group with a
# divmod and a bound check for every value, was 0.6-1.4x PyTorch; see chapter 02.)
# Integer code: NUMBA_FASTMATH changes nothing here, and dequantize has one multiply per value, no sum.

SPAN = 4096                                                  # groups per task: 12-16 KiB of bytes


@numba.njit(inline="always", cache=True)
def _spans(rows, groups):
    """(tasks, spans per row) for rows of `groups` groups cut into spans of SPAN (at least one per row)."""
    per_row = max(1, -(-groups // SPAN))
    return rows * per_row, per_row


@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _pack_cpu(q, bits, packed):
    rows, n = q.shape
    per_group = 4 if bits == 6 else 2
    whole, groups = n // per_group, -(-n // per_group)
    tasks, per_row = _spans(rows, groups)
    for task in numba.prange(tasks):
        r, first = task // per_row, (task % per_row) * SPAN
        src, dst = q[r], packed[r]
        if bits == 6:
            for g in range(first, min(first + SPAN, whole)):
                u0, u1 = np.int32(src[4 * g]) + 32, np.int32(src[4 * g + 1]) + 32
                u2, u3 = np.int32(src[4 * g + 2]) + 32, np.int32(src[4 * g + 3]) + 32
                dst[3 * g] = np.uint8((u0 | (u1 << 6)) & 0xFF)
                dst[3 * g + 1] = np.uint8(((u1 >> 2) | (u2 << 4)) & 0xFF)
                dst[3 * g + 2] = np.uint8(((u2 >> 4) | (u3 << 2)) & 0xFF)
        else:
            for g in range(first, min(first + SPAN, whole)):
                dst[g] = np.uint8(((np.int32(src[2 * g]) + 8) | ((np.int32(src[2 * g + 1]) + 8) << 4)) & 0xFF)
        if whole < groups and first + SPAN >= groups:        # this span holds the row's partial group
            _pack_group_cpu(q, bits, r, whole, packed)


@numba.njit(inline="always", cache=True)
def _unpack_span(src, bits, first, last, scale, dst):
    """Groups [first, last) of one packed row, all whole, into dst as code - offset, times scale."""
    if bits == 6:
        for g in range(first, last):
            b0, b1, b2 = np.int32(src[3 * g]), np.int32(src[3 * g + 1]), np.int32(src[3 * g + 2])
            dst[4 * g] = ((b0 & 0x3F) - 32) * scale
            dst[4 * g + 1] = (((b0 >> 6) | ((b1 & 0x0F) << 2)) - 32) * scale
            dst[4 * g + 2] = (((b1 >> 4) | ((b2 & 0x03) << 4)) - 32) * scale
            dst[4 * g + 3] = ((b2 >> 2) - 32) * scale
    else:
        for g in range(first, last):
            b = np.int32(src[g])
            dst[2 * g] = ((b & 0x0F) - 8) * scale
            dst[2 * g + 1] = ((b >> 4) - 8) * scale


@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _unpack_cpu(packed, bits, out):
    rows, n = out.shape
    per_group = 4 if bits == 6 else 2
    whole, groups = n // per_group, -(-n // per_group)
    offset = 1 << (bits - 1)
    tasks, per_row = _spans(rows, groups)
    for task in numba.prange(tasks):
        r, first = task // per_row, (task % per_row) * SPAN
        _unpack_span(packed[r], bits, first, min(first + SPAN, whole), np.int32(1), out[r])
        if whole < groups and first + SPAN >= groups:        # the row's partial group
            codes = _group_codes_cpu(packed, bits, r, whole)
            for j in range(n - whole * per_group):
                out[r, whole * per_group + j] = codes[j] - offset


@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _dequantize_cpu(packed, scale, bits, out):
    rows, n = out.shape
    per_group = 4 if bits == 6 else 2
    whole, groups = n // per_group, -(-n // per_group)
    offset = 1 << (bits - 1)
    tasks, per_row = _spans(rows, groups)
    for task in numba.prange(tasks):
        r, first = task // per_row, (task % per_row) * SPAN
        s = np.float32(scale[r])                             # scale.float(): a float64 scale rounded first
        _unpack_span(packed[r], bits, first, min(first + SPAN, whole), s, out[r])   # float32 * float32
        if whole < groups and first + SPAN >= groups:
            codes = _group_codes_cpu(packed, bits, r, whole)
            for j in range(n - whole * per_group):
                out[r, whole * per_group + j] = np.float32(codes[j] - offset) * s


@register("pack_bits", "numba")
def pack_bits_numba(q, bits):
    """numba CPU pack: integer CPU tensor [..., n] -> uint8 [..., packed_length(n, bits)]."""
    values, rows_out, packed, total = _prepare_pack(q, bits, "numba")
    if total:
        _pack_cpu(numpy_view(values), bits, numpy_view(rows_out))
    return packed


@register("unpack_bits", "numba")
def unpack_bits_numba(packed, n, bits):
    """numba CPU unpack: uint8 CPU tensor [..., packed_length(n, bits)] -> int8 [..., n]."""
    rows_in, rows_out, out, total = _prepare_unpack(packed, n, bits, "numba")
    if total:
        _unpack_cpu(numpy_view(rows_in), bits, numpy_view(rows_out))
    return out


@register("dequantize_packed", "numba")
def dequantize_packed_numba(packed, scale, n, bits):
    """numba CPU fused unpack-and-scale: uint8 [R, bytes], float32/float64 scale [R] -> float32 [R, n]."""
    out, total = _prepare_dequantize(packed, scale, n, bits, "numba", (torch.float32, torch.float64))
    if total:
        _dequantize_cpu(numpy_view(packed), numpy_view(scale), bits, numpy_view(out))
    return out


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _pack_v1_group_per_thread(q, bits, packed):
    rows, n = q.shape
    per_group = 4 if bits == 6 else 2
    groups = (n + per_group - 1) // per_group
    job = cuda.grid(1)                                       # int64: no overflow at any size memory holds
    if job < rows * groups:
        _pack_group_gpu(q, bits, job // groups, job % groups, packed)   # whole bytes no other thread writes


@cuda.jit
def _unpack_v1_group_per_thread(packed, bits, out):
    rows, n = out.shape
    per_group = 4 if bits == 6 else 2
    groups = (n + per_group - 1) // per_group
    job = cuda.grid(1)
    if job >= rows * groups:
        return
    r, g = job // groups, job % groups
    codes = _group_codes_gpu(packed, bits, r, g)
    for j in range(per_group):
        if g * per_group + j < n:                            # the last group of a row may be partial
            out[r, g * per_group + j] = codes[j] - (1 << (bits - 1))


@cuda.jit
def _dequantize_v1_group_per_thread(packed, scale, bits, out):
    rows, n = out.shape
    per_group = 4 if bits == 6 else 2
    groups = (n + per_group - 1) // per_group
    job = cuda.grid(1)
    if job >= rows * groups:
        return
    r, g = job // groups, job % groups
    codes = _group_codes_gpu(packed, bits, r, g)
    s = scale[r]                                             # float32 (checked); the row's threads share it
    for j in range(per_group):
        if g * per_group + j < n:
            out[r, g * per_group + j] = numba.float32(codes[j] - (1 << (bits - 1))) * s


@register("pack_bits", "numba_cuda")
def pack_bits_numba_cuda(q, bits):
    """numba CUDA pack (v1: a thread per group): integer tensor [..., n] -> uint8 [..., packed_length(n, bits)]."""
    values, rows_out, packed, total = _prepare_pack(q, bits, "numba_cuda")
    if total:
        threads = launch.block_size()
        launch.numba_cuda(_pack_v1_group_per_thread, launch.grid_for(total, threads), threads,
            numba_cuda_view(values), bits, numba_cuda_view(rows_out))
    return packed


@register("unpack_bits", "numba_cuda")
def unpack_bits_numba_cuda(packed, n, bits):
    """numba CUDA unpack (v1: a thread per group): uint8 [..., packed_length(n, bits)] -> int8 [..., n]."""
    rows_in, rows_out, out, total = _prepare_unpack(packed, n, bits, "numba_cuda")
    if total:
        threads = launch.block_size()
        launch.numba_cuda(_unpack_v1_group_per_thread, launch.grid_for(total, threads), threads,
            numba_cuda_view(rows_in), bits, numba_cuda_view(rows_out))
    return out


@register("dequantize_packed", "numba_cuda")
def dequantize_packed_numba_cuda(packed, scale, n, bits):
    """numba CUDA fused unpack-and-scale (v1: a thread per group): uint8 [R, bytes], float32 scale [R]
    -> float32 [R, n]."""
    out, total = _prepare_dequantize(packed, scale, n, bits, "numba_cuda", (torch.float32,))
    if total:
        threads = launch.block_size()
        launch.numba_cuda(_dequantize_v1_group_per_thread, launch.grid_for(total, threads), threads,
            numba_cuda_view(packed), numba_cuda_view(scale), bits, numba_cuda_view(out))
    return out


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("quant_packing.cu")
CUPY_ENTRY_POINTS = ("pack_bits_group_per_thread", "unpack_bits_group_per_thread",
                     "dequantize_packed_group_per_thread")  # the kernels this file launches


def _cupy_launch(kernel: str, total: int, args: tuple) -> None:
    launch.cupy(CU_SOURCE, kernel, launch.grid_for(total, launch.GPU_BLOCK), launch.GPU_BLOCK, args)


@register("pack_bits", "cupy")
def pack_bits_cupy(q, bits):
    """CuPy pack (a thread per group): integer CUDA tensor [..., n] -> uint8 [..., packed_length(n, bits)]."""
    values, rows_out, packed, total = _prepare_pack(q, bits, "cupy")
    if total:
        _cupy_launch("pack_bits_group_per_thread", total,
                     (cupy_view(values), cupy_view(rows_out), np.int64(values.shape[0]), np.int64(values.shape[1]),
                      np.int32(bits)))
    return packed


@register("unpack_bits", "cupy")
def unpack_bits_cupy(packed, n, bits):
    """CuPy unpack (a thread per group): uint8 CUDA tensor [..., packed_length(n, bits)] -> int8 [..., n]."""
    rows_in, rows_out, out, total = _prepare_unpack(packed, n, bits, "cupy")
    if total:
        _cupy_launch("unpack_bits_group_per_thread", total,
                     (cupy_view(rows_in), cupy_view(rows_out), np.int64(rows_in.shape[0]), np.int64(n),
                      np.int32(bits)))
    return out


@register("dequantize_packed", "cupy")
def dequantize_packed_cupy(packed, scale, n, bits):
    """CuPy fused unpack-and-scale (a thread per group): uint8 [R, bytes], float32 scale [R] -> float32 [R, n]."""
    out, total = _prepare_dequantize(packed, scale, n, bits, "cupy", (torch.float32,))
    if total:
        _cupy_launch("dequantize_packed_group_per_thread", total,
                     (cupy_view(packed), cupy_view(scale), cupy_view(out), np.int64(packed.shape[0]), np.int64(n),
                      np.int32(bits)))
    return out


# ---------------------------------------------------------------- example inputs

def _values_with_extremes(shape, bits, generator):
    """Random values in the full `bits`-bit range, both extremes planted in every row."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(low, high + 1, shape, generator=generator, dtype=torch.int8)
    q[..., 0], q[..., -1] = low, high
    return q


def _bytes_with_extremes(shape, generator):
    """Random bytes, all 256 patterns possible (padding bits included), 0 and 255 planted in every row."""
    b = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    b[..., 0], b[..., -1] = 0, 255
    return b


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: B * H rows of n = T * D + 3 values
    (75 at `tiny`, 4099 at `small`), so rows end in a partial INT6 group and an odd INT4 pair. pack_bits
    gets [B, H, n] values, unpack_bits [B, H, bytes] random bytes, dequantize_packed [B * H, bytes] random
    bytes with positive scales; each at 6 and at 4 bits, the extreme values present in every row."""
    from kernels.check import random_tensor
    B, H, n = shapes["B"], shapes["H"], shapes["T"] * shapes["D"] + 3
    cases = {}
    for bits in (6, 4):
        nbytes = ops.packed_length(n, bits)
        cases[f"pack_bits int{bits} [B, H, T*D + 3]"] = ((_values_with_extremes((B, H, n), bits, generator), bits), {})
        cases[f"unpack_bits int{bits} [B, H, bytes]"] = ((_bytes_with_extremes((B, H, nbytes), generator), n, bits), {})
        scale = torch.exp(random_tensor((B * H,), generator=generator)) / (2 ** (bits - 1) - 1)   # peak / q_max
        cases[f"dequantize_packed int{bits} [B*H, bytes]"] = (
            (_bytes_with_extremes((B * H, nbytes), generator), scale, n, bits), {})
    return cases
