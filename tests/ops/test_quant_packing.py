"""The bit-packing kernels (pack_bits, unpack_bits, dequantize_packed) against `refimpl.quant`, on every backend.

Packing is integer work, so every comparison is exact: the kernels' bytes equal the reference's
bytes, unpacking gives back exactly the values packed (both extremes included), and the fused
dequantize equals the reference bit for bit (it is the same single float32 multiply). Sizes are
awkward on purpose: n = 0 to 7 (partial groups, a row shorter than one group), 1001, several leading
dimensions, rows of zero length and zero rows. Outputs are poisoned (-1 bytes, NaN floats) before a
kernel writes them. Bad input must raise the reference's own ValueError. numba_cuda runs through
numba's CUDA simulator when there is no GPU (the GPU-size case then skips with a reason); cupy cases
need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked with nvcc and NVRTC
wherever they exist. The last part tests the reference ops themselves: packing round-trips
exactly, rows are packed apart, the INT6 / INT4 layout by hand, the fused dequantize equals
`refimpl.quant.dequantize_per_row`, and bad input.
"""

from __future__ import annotations


import pytest
import torch

import kernels
from kernels import quant_packing as quant_kernels
from kernels.check import poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops, quant
from refimpl.quant import dequantize_per_row, quantize_per_row
from refimpl.ops import dequantize_packed, pack_bits, packed_length, unpack_bits

#: the backends, once each: packing has no float dtype, so only dequantize's scale uses BACKEND_DTYPES' axis
BACKENDS = list(dict.fromkeys(param.values[0] for param in BACKEND_DTYPES))
BITS = [pytest.param(6, id="int6"), pytest.param(4, id="int4")]


def _values(shape, bits, seed=0):
    """Random values in the whole `bits`-bit range, both extremes present (when there are two places)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    if q.numel() >= 2:
        q.view(-1)[0], q.view(-1)[-1] = low, high
    return q


def _bytes(shape, seed=0):
    """Random bytes, any of the 256 patterns (bits in a row's padding too)."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _scale(rows, dtype, bits, seed=0):
    """Positive per-row scales like quantize_per_row's (peak / q_max), drawn in float64 and then cast."""
    draw = random_tensor((rows,), torch.float64, generator=torch.Generator().manual_seed(seed))
    return (torch.exp(draw) / (2 ** (bits - 1) - 1)).to(dtype)


def _workers(shape, bits) -> int:
    """Groups (a kernel's workers) in a tensor of values of this shape."""
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows * -(-shape[-1] // quant_kernels.VALUES_PER_GROUP[bits])


def _assert_equal(got, expected, what):
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"{what}: got {got.dtype} {list(got.shape)}, expected {expected.dtype} {list(expected.shape)}"
    got = got.cpu()
    if not torch.equal(got, expected):                   # NaN (a poisoned float nobody wrote) is never equal
        first = tuple(int(i) for i in (got != expected).nonzero()[0])
        raise AssertionError(f"{what}: {int((got != expected).sum())} of {got.numel()} elements differ; "
                             f"first at {first}: got {got[first].item()}, expected {expected[first].item()}")


def _reference_error(fn, *args) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args)
    return str(err.value)


# ---------------------------------------------------------------- pack and unpack vs the reference

# id -> the shape of the values [..., n]
SHAPES = {
    "n0": (0,), "n1": (1,), "n2": (2,), "n3": (3,), "n4": (4,), "n5": (5,), "n7": (7,),   # 1-D, partial groups
    "n1001": (1001,),                                   # 250 whole INT6 groups and one of a single value
    "2x3x5": (2, 3, 5), "2x3x1": (2, 3, 1), "2x3x8": (2, 3, 8), "2x3x33": (2, 3, 33),   # leading dims
    "rows3-n0": (3, 0), "2x3x0": (2, 3, 0),             # rows of zero length: zero bytes each
    "rows0-n5": (0, 5),                                 # no rows at all
    "rows5-n1001": (5, 1001),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_equals_reference_bytes_and_unpack_round_trips(backend, bits, shape):
    skip_unless_runnable(backend, work=_workers(shape, bits))
    values = _values(shape, bits, seed=len(shape) * 1000 + shape[-1])
    n, device = shape[-1], device_for(backend)
    expected = ops.pack_bits(values, bits)
    with poisoned_outputs():
        packed = kernels.get("pack_bits", backend)(values.to(device), bits)
    _assert_equal(packed, expected, f"pack_bits[{backend}] int{bits} {list(shape)}")
    with poisoned_outputs():
        unpacked = kernels.get("unpack_bits", backend)(packed, n, bits)
    _assert_equal(unpacked, values, f"unpack_bits[{backend}] int{bits} {list(shape)} round trip")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_of_every_byte_pattern_equals_reference(backend, bits):
    """All 256 byte values in every byte position of a group, including bits in the padding of a
    partial last group, which unpacking must ignore as the reference does."""
    n, rows = 7, 256                                     # n = 7, INT6: a whole group and one of 3; INT4: 3 pairs and 1
    nbytes = ops.packed_length(n, bits)
    skip_unless_runnable(backend, work=_workers((rows, n), bits))
    packed = ((torch.arange(rows)[:, None] + torch.arange(nbytes)) % 256).to(torch.uint8)   # byte (r + k) mod 256
    for k in range(nbytes):
        assert packed[:, k].unique().numel() == 256      # every byte value at every byte position
    expected = ops.unpack_bits(packed, n, bits)
    with poisoned_outputs():
        got = kernels.get("unpack_bits", backend)(packed.to(device_for(backend)), n, bits)
    _assert_equal(got, expected, f"unpack_bits[{backend}] int{bits}, every byte pattern")


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_takes_wider_integers_as_the_reference_does(backend, dtype):
    skip_unless_runnable(backend)
    values = _values((3, 11), 6, seed=1)
    with poisoned_outputs():
        got = kernels.get("pack_bits", backend)(values.to(dtype=dtype, device=device_for(backend)), 6)
    _assert_equal(got, ops.pack_bits(values.to(dtype), 6), f"pack_bits[{backend}] from {dtype}")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_kernels_take_non_contiguous_inputs(backend):
    skip_unless_runnable(backend)
    device = device_for(backend)
    values = _values((9, 4), 6, seed=2).T                                   # [4, 9], column-major
    packed = _bytes((6, 5), seed=3).T                                       # [5, 6]: n = 7 at INT6, strided
    scale = _scale(10, torch.float32, 6, seed=4)[::2]                       # [5], stride 2
    assert not (values.is_contiguous() or packed.is_contiguous() or scale.is_contiguous())
    with poisoned_outputs():
        _assert_equal(kernels.get("pack_bits", backend)(values.to(device), 6), ops.pack_bits(values, 6),
                      f"pack_bits[{backend}] strided")
        _assert_equal(kernels.get("unpack_bits", backend)(packed.to(device), 7, 6), ops.unpack_bits(packed, 7, 6),
                      f"unpack_bits[{backend}] strided")
        _assert_equal(kernels.get("dequantize_packed", backend)(packed.to(device), scale.to(device), 7, 6),
                      ops.dequantize_packed(packed, scale, 7, 6), f"dequantize_packed[{backend}] strided")


# ---------------------------------------------------------------- dequantize vs the reference

# id -> (R, n)
DEQUANTIZE_SHAPES = {"R1-n1": (1, 1), "R3-n5": (3, 5), "R4-n7": (4, 7), "R5-n2": (5, 2), "R2-n1001": (2, 1001),
                     "R33-n12": (33, 12), "R0-n5": (0, 5)}


@pytest.mark.parametrize("shape", [(16381,), (2, 8191), (16385,), (2, 32773)],
                         ids=["n16381", "rows2-n8191", "n16385", "rows2-n32773"])
@pytest.mark.parametrize("bits", BITS)
def test_numba_rows_of_several_tasks(bits, shape):
    """The numba CPU kernels cut a row into tasks of SPAN groups. A partial group as the last of exactly
    SPAN groups (INT6 n = 4 SPAN - 3, INT4 n = 2 SPAN - 1), alone in a row's last task (INT6 n = 4 SPAN + 1),
    and rows of several tasks that end in a partial group."""
    assert quant_kernels.SPAN == 4096, "the shapes above are chosen for SPAN = 4096"
    values, n = _values(shape, bits, seed=shape[-1]), shape[-1]
    with poisoned_outputs():
        packed = kernels.get("pack_bits", "numba")(values, bits)
    _assert_equal(packed, ops.pack_bits(values, bits), f"pack_bits[numba] int{bits} {list(shape)}")
    with poisoned_outputs():
        unpacked = kernels.get("unpack_bits", "numba")(packed, n, bits)
    _assert_equal(unpacked, values, f"unpack_bits[numba] int{bits} {list(shape)} round trip")
    rows = packed.reshape(-1, packed.shape[-1])
    scale = _scale(rows.shape[0], torch.float32, bits)
    with poisoned_outputs():
        got = kernels.get("dequantize_packed", "numba")(rows, scale, n, bits)
    _assert_equal(got, ops.dequantize_packed(rows, scale, n, bits), f"dequantize_packed[numba] int{bits} {list(shape)}")


@pytest.mark.parametrize("shape", DEQUANTIZE_SHAPES.values(), ids=DEQUANTIZE_SHAPES.keys())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_dequantize_packed_equals_reference_exactly(backend, dtype, bits, shape):
    """dtype is the scale's; the output is float32 on every backend, as the reference's."""
    R, n = shape
    skip_unless_runnable(backend, work=_workers(shape, bits))
    packed = _bytes((R, ops.packed_length(n, bits)), seed=R * 1000 + n)
    scale = _scale(R, dtype, bits, seed=n)
    if R >= 3:
        scale[1], scale[2] = 0.0, -scale[2]                                  # a zero row and a negative scale
    expected = ops.dequantize_packed(packed, scale, n, bits)
    device = device_for(backend)
    with poisoned_outputs():
        got = kernels.get("dequantize_packed", backend)(packed.to(device), scale.to(device), n, bits)
    _assert_equal(got, expected, f"dequantize_packed[{backend}] int{bits} {list(shape)} scale {dtype}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_quantised_weight_packed_and_dequantised_by_the_kernels(backend, dtype, bits):
    """A weight's trip to the artifact and back, every step a kernel: equals dequantize_per_row exactly."""
    R, K = 6, 37
    skip_unless_runnable(backend, work=_workers((R, K), bits))
    weight = random_tensor((R, K), generator=torch.Generator().manual_seed(5))
    q, scale = quant.quantize_per_row(weight, bits)
    device = device_for(backend)
    with poisoned_outputs():
        packed = kernels.get("pack_bits", backend)(q.to(device), bits)
        got = kernels.get("dequantize_packed", backend)(packed, scale.to(dtype=dtype, device=device), K, bits)
    _assert_equal(got, quant.dequantize_per_row(q, scale.to(dtype)), f"{backend} int{bits} weight round trip")


# ---------------------------------------------------------------- zero-length rows: whatever the reference does

def _outcome(fn, *args):
    """("ok", result on the CPU) or ("ValueError", message)."""
    try:
        return "ok", fn(*args).cpu()
    except ValueError as err:
        return "ValueError", str(err)


@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (1, 0)], ids=["R3-n0", "R0-n0", "R1-n0"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_of_zero_length_rows_does_what_the_reference_does(backend, bits, shape):
    """n = 0 with R > 0 rows: the reference refuses (check_unpack_args counts 0 rows when a row has
    0 bytes, so scale [R] fails its shape check); the kernels share that check and so refuse alike.
    Should the reference accept it one day, the kernels return the same empty [R, 0]."""
    skip_unless_runnable(backend)
    R, n = shape
    packed, scale = torch.zeros((R, 0), dtype=torch.uint8), torch.ones(R)
    expected = _outcome(ops.dequantize_packed, packed, scale, n, bits)
    got = _outcome(kernels.get("dequantize_packed", backend), packed.to(device_for(backend)),
                   scale.to(device_for(backend)), n, bits)
    assert got[0] == expected[0], f"{backend}: {got}, reference: {expected}"
    if got[0] == "ok":
        _assert_equal(got[1], expected[1], f"dequantize_packed[{backend}] {list(shape)}")
    else:
        assert got[1] == expected[1]


# ---------------------------------------------------------------- the examples, GPU size, the registry

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("backend", ["numba", "numba_cuda", "cupy"])
def test_quant_at_gpu_size(backend, bits):
    R, n = 4096, 4099                                   # rows end in partial groups
    skip_unless_runnable(backend, work=_workers((R, n), bits))
    values, device = _values((R, n), bits, seed=6), device_for(backend)
    scale = _scale(R, torch.float32, bits, seed=7)
    expected = ops.pack_bits(values, bits)
    with poisoned_outputs():
        packed = kernels.get("pack_bits", backend)(values.to(device), bits)
        _assert_equal(packed, expected, f"pack_bits[{backend}] at GPU size")
        _assert_equal(kernels.get("unpack_bits", backend)(packed, n, bits), values,
                      f"unpack_bits[{backend}] at GPU size")
        _assert_equal(kernels.get("dequantize_packed", backend)(packed, scale.to(device), n, bits),
                      ops.dequantize_packed(expected, scale, n, bits), f"dequantize_packed[{backend}] at GPU size")


def test_use_swaps_the_quant_ops_in():
    names = ["pack_bits", "unpack_bits", "dequantize_packed"]
    original = ops.pack_bits
    for op in names:
        assert kernels.registered()[op] == list(kernels.BACKENDS)
    values = _values((3, 9), 6, seed=8)
    with kernels.use("numba", ops=names) as swapped:
        assert swapped == names and ops.pack_bits.__wrapped__ is quant_kernels.pack_bits_numba
        packed = ops.pack_bits(values, 6)
        assert torch.equal(ops.unpack_bits(packed, 9, 6), values)
    assert ops.pack_bits is original
    assert torch.equal(packed, ops.pack_bits(values, 6))


# ---------------------------------------------------------------- bad input

def _bad_calls():
    """(id, op, args): each refused by the reference's own checks."""
    v6, packed = _values((2, 7), 6), _bytes((2, 6))                        # n = 7 at INT6: 6 bytes a row
    return [
        ("pack-above-range-int6", "pack_bits", (torch.tensor([0, 32, 1], dtype=torch.int8), 6)),
        ("pack-below-range-int6", "pack_bits", (torch.tensor([-33, 0], dtype=torch.int16), 6)),
        ("pack-above-range-int4", "pack_bits", (torch.tensor([7, 8], dtype=torch.int8), 4)),
        ("pack-below-range-int4", "pack_bits", (torch.tensor([[-9], [0]], dtype=torch.int64), 4)),
        ("pack-float-values", "pack_bits", (v6.float(), 6)),
        ("pack-uint8-values", "pack_bits", (v6.abs().to(torch.uint8), 6)),
        ("pack-bits-8", "pack_bits", (v6, 8)),
        ("pack-0-d", "pack_bits", (torch.tensor(3, dtype=torch.int8), 6)),
        ("unpack-int8-bytes", "unpack_bits", (packed.to(torch.int8), 7, 6)),
        ("unpack-wrong-length", "unpack_bits", (packed[:, :5], 7, 6)),
        ("unpack-wrong-length-int4", "unpack_bits", (packed, 7, 4)),
        ("unpack-negative-n", "unpack_bits", (packed, -1, 6)),
        ("unpack-bits-5", "unpack_bits", (packed, 7, 5)),
        ("dequantize-wrong-length", "dequantize_packed", (packed, torch.ones(2), 9, 6)),
        ("dequantize-3-d", "dequantize_packed", (packed[None], torch.ones(1), 7, 6)),
        ("dequantize-scale-shape", "dequantize_packed", (packed, torch.ones(3), 7, 6)),
        ("dequantize-scale-list", "dequantize_packed", (packed, [1.0, 1.0], 7, 6)),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_the_references_value_error(backend, case):
    """Argument checks come before the device check, so CPU tensors reach them on every backend."""
    _, op, args = case
    message = _reference_error(kernels.get(op, "reference"), *args)
    with pytest.raises(ValueError) as err:
        kernels.get(op, backend)(*args)
    assert str(err.value) == message


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_cuda_kernels_take_a_float32_scale_only(backend):
    packed = _bytes((2, 6))
    with pytest.raises(ValueError, match="dequantize_packed: scale must be float32, got float64"):
        kernels.get("dequantize_packed", backend)(packed, torch.ones(2, dtype=torch.float64), 7, 6)


def test_numba_scale_dtypes_and_gradients():
    packed, dequantize = _bytes((2, 6)), kernels.get("dequantize_packed", "numba")
    with pytest.raises(ValueError, match="scale must be float32, float64, got float16"):
        dequantize(packed, torch.ones(2, dtype=torch.float16), 7, 6)
    trained = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        dequantize(packed, trained, 7, 6)
    with torch.no_grad():
        _assert_equal(dequantize(packed, trained, 7, 6), ops.dequantize_packed(packed, trained.detach(), 7, 6),
                      "dequantize_packed[numba] under no_grad")


@pytest.mark.parametrize("op, args", [("pack_bits", (_values((2, 5), 6), 6)),
                                      ("unpack_bits", (_bytes((2, 3)), 4, 6)),
                                      ("dequantize_packed", (_bytes((2, 3)), torch.ones(2), 4, 6))],
                         ids=["pack_bits", "unpack_bits", "dequantize_packed"])
def test_cpu_tensors_to_the_cupy_kernels_are_a_value_error(op, args):
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get(op, "cupy")(*args)


def test_cpu_tensors_to_numba_cuda_on_a_gpu_are_a_value_error():
    if kernels.cuda_simulator_enabled():
        pytest.skip("numba's CUDA simulator takes CPU tensors; the device check applies on a real GPU")
    with pytest.raises(ValueError, match="cpu tensor but numba_cuda kernels run on a CUDA GPU"):
        kernels.get("pack_bits", "numba_cuda")(_values((2, 5), 6), 6)

# The CUDA C compile checks (nvcc and NVRTC) are in tests/test_kernels.py, over kernels.OP_MODULES.


# ---------------------------------------------------------------- the reference op: round trips, layout by hand

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
    with pytest.raises(ValueError, match=r"scale must be \[R\] = \[2\], got \[3\]"):
        dequantize_packed(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(3), 4, 6)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_per_row(torch.randn(2, 2), 5)
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        quantize_per_row(torch.randn(2), 6)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_row(torch.tensor([[float("nan")]]), 6)
