"""The 3D neighbourhood-attention kernels against the reference, on every backend, at awkward grids.

Ground truth is `refimpl.ops.neighbourhood_attention` (itself tested equal to dense
masked attention in the last part of this file), in the kernel's own dtype and from the same
inputs. Outputs are poisoned with NaN before a kernel writes them. numba_cuda runs through numba's
CUDA simulator when there is no GPU (slow: the GPU-size case then skips with a reason); cupy cases
need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked with nvcc and
NVRTC wherever they exist.

The last part tests the reference op itself (chapter 01): the padded-and-shifted op equals dense
attention with a neighbourhood mask, values and gradients; the neighbourhood is the (2r + 1)^3 cube
with no wrap-around (8 / 12 / 18 / 27 neighbours at r = 1); a neuron reads exactly its neighbours;
bad arguments are ValueErrors naming what was expected.
"""

from __future__ import annotations


import pytest
import torch

import kernels
from kernels import neighbourhood_attention as na_kernels
from kernels.check import assert_close, example_shapes, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops
from refimpl.ops import (check_neighbourhood_attention_args, neighbour_count, neighbourhood_attention,
                         neighbourhood_attention_dense, neighbourhood_mask)

OP = "neighbourhood_attention"


def _qkv(B, X, Y, Z, H, D, dtype, device, seed=0):
    """(q, k, v) [B, X, Y, Z, H, D], drawn in float64 and then cast, so every dtype sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return tuple(random_tensor((B, X, Y, Z, H, D), torch.float64, generator=g).to(dtype=dtype, device=device)
                 for _ in range(3))


def _work(B, X, Y, Z, H, D, radius):
    """Inner-loop steps a run takes: queries x (at most) neighbours x 2 D."""
    side = 2 * radius + 1
    return B * X * Y * Z * H * min(side ** 3, X * Y * Z) * 2 * D


def _check_against_reference(backend, args, radius, name):
    expected = ops.neighbourhood_attention(*args, radius=radius)
    with poisoned_outputs():
        got = kernels.get(OP, backend)(*args, radius=radius)
    assert_close(got, expected, name)


# ---------------------------------------------------------------- kernel vs reference

# id -> (B, X, Y, Z, H, D, radius)
CASES = {
    "B2-1x1x1-H3-D5-r1": (2, 1, 1, 1, 3, 5, 1),      # a lone neuron: its output is its own v
    "B1-3x1x5-H1-D8-r2": (1, 3, 1, 5, 1, 8, 2),      # a flat grid, the cube wider than two sides
    "B2-2x3x4-H3-D1-r1": (2, 2, 3, 4, 3, 1, 1),      # D = 1; every neuron on the boundary
    "B1-2x3x4-H3-D5-r2": (1, 2, 3, 4, 3, 5, 2),      # odd H and D, 72 queries over 3 simulator blocks
    "B1-4x3x5-H1-D8-r1": (1, 4, 3, 5, 1, 8, 1),      # interior neurons too (27 neighbours)
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_neighbourhood_attention_kernel_vs_reference(backend, dtype, case):
    *sizes, radius = case
    skip_unless_runnable(backend, work=_work(*case))
    args = _qkv(*sizes, dtype, device_for(backend))
    _check_against_reference(backend, args, radius, f"{OP}[{backend}] {case}")


@pytest.mark.parametrize("radius", [0, 7], ids=["r0-itself-only", "r7-past-the-grid"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_neighbourhood_attention_extreme_radii(backend, dtype, radius):
    skip_unless_runnable(backend)
    q, k, v = _qkv(1, 3, 2, 2, 2, 3, dtype, device_for(backend), seed=1)
    _check_against_reference(backend, (q, k, v), radius, f"{OP}[{backend}] radius {radius}")
    if radius == 0:
        with poisoned_outputs():
            out = kernels.get(OP, backend)(q, k, v, radius=0)
        assert_close(out, v, f"{OP}[{backend}] radius 0 returns v")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_neighbourhood_attention_takes_non_contiguous_inputs(backend):
    """As in a model, where q, k, v are slices of one projection [B, X, Y, Z, 3, H, D]."""
    skip_unless_runnable(backend)
    qkv = random_tensor((1, 2, 3, 2, 3, 2, 4), generator=torch.Generator().manual_seed(2)).to(device_for(backend))
    q, k, v = qkv.unbind(dim=4)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_against_reference(backend, (q, k, v), 1, f"strided {OP}[{backend}]")


def test_example_grids_come_from_T():
    assert [na_kernels.grid_for(T) for T in (1, 8, 9, 128, 7, 32768)] == [
        (1, 1, 1), (2, 2, 2), (3, 3, 1), (8, 4, 4), (7, 1, 1), (32, 32, 32)]
    (q, k, v), kwargs = na_kernels.example_inputs(example_shapes("small"))[OP]
    s = example_shapes("small")
    assert q.shape == (s["B"], 8, 4, 4, s["H"], s["D"]) and kwargs == {"radius": 2}       # T + 1 = 128 tokens


def test_numba_at_the_small_example_size():
    """The `small` example (8 x 4 x 4 grid, batch 16) on the CPU kernel, both dtypes."""
    (q, k, v), kwargs = na_kernels.example_inputs(example_shapes("small"), torch.Generator().manual_seed(4))[OP]
    for dtype in (torch.float32, torch.float64):
        args = tuple(t.to(dtype) for t in (q, k, v))
        _check_against_reference("numba", args, kwargs["radius"], f"{OP}[numba] small {dtype}")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_neighbourhood_attention_at_gpu_size(backend):
    B, X, Y, Z, H, D, radius = 2, 16, 16, 16, 8, 64, 1
    skip_unless_runnable(backend, work=_work(B, X, Y, Z, H, D, radius))
    args = _qkv(B, X, Y, Z, H, D, torch.float32, device_for(backend), seed=5)
    _check_against_reference(backend, args, radius, f"{OP}[{backend}] at GPU size")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_neighbourhood_attention_bad_inputs_are_value_errors(backend):
    op = kernels.get(OP, backend)
    q, k, v = _qkv(1, 2, 3, 2, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"v must be \[B, X, Y, Z, H, D\] = \[1, 2, 3, 2, 2, 4\], got \[2, 3, 2, 2, 4\]"):
        op(q, k, v[0])
    with pytest.raises(ValueError, match=r"k must be \[B, X, Y, Z, H, D\] = \[1, 2, 3, 2, 2, 4\], got"):
        op(q, k[:, :, :2], v)
    with pytest.raises(ValueError, match="radius must be an int >= 0, got -1"):
        op(q, k, v, radius=-1)
    with pytest.raises(ValueError, match="radius must be an int >= 0, got True"):
        op(q, k, v, radius=True)
    with pytest.raises(ValueError, match="q must be a floating-point tensor"):
        op(q.int(), k, v)


def test_neighbourhood_attention_kernels_refuse_wrong_dtypes_devices_and_gradients():
    q, k, v = _qkv(1, 2, 1, 2, 1, 3, torch.float32, "cpu")
    numba_op = kernels.get(OP, "numba")
    with pytest.raises(ValueError, match="q must be float32, float64, got bfloat16"):
        numba_op(*(t.bfloat16() for t in (q, k, v)))
    with pytest.raises(ValueError, match="k must have q's dtype torch.float32, got torch.float64"):
        numba_op(q, k.double(), v)
    with pytest.raises(ValueError, match="q must be float32, got float64"):
        kernels.get(OP, "numba_cuda")(*(t.double() for t in (q, k, v)))
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get(OP, "cupy")(q, k, v)
    q_trained = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        numba_op(q_trained, k, v)
    with torch.no_grad():
        numba_op(q_trained, k, v)                                   # fine without a graph


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_head_dim_beyond_the_cuda_array_is_a_value_error(backend):
    """The size check comes before the device check, so this runs on any machine."""
    D = na_kernels.MAX_HEAD_DIM + 1
    q, k, v = _qkv(1, 1, 1, 2, 1, D, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"head dimension D <= {na_kernels.MAX_HEAD_DIM}, got {D}"):
        kernels.get(OP, backend)(q, k, v)


def test_numba_cpu_has_no_head_dim_limit():
    q, k, v = _qkv(1, 1, 2, 1, 1, na_kernels.MAX_HEAD_DIM + 3, torch.float64, "cpu", seed=6)
    _check_against_reference("numba", (q, k, v), 1, f"{OP}[numba] D > MAX_HEAD_DIM")


# The CUDA C compile checks (nvcc and NVRTC) are in tests/test_kernels.py, over kernels.OP_MODULES.


# ---------------------------------------------------------------- the reference op: equals dense masked attention

FP64 = dict(atol=1e-12, rtol=1e-10)


def _reference_qkv(B, X, Y, Z, H, D, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, X, Y, Z, H, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
                 for _ in range(3))


GRIDS = {"1x1x1": (1, 1, 1), "3x1x5": (3, 1, 5), "4x4x4": (4, 4, 4), "2x3x4": (2, 3, 4), "1x6x1": (1, 6, 1)}


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_neighbourhood_attention_equals_dense_masked_attention(grid, radius):
    q, k, v = _reference_qkv(2, *grid, H=3, D=5)
    torch.testing.assert_close(neighbourhood_attention(q, k, v, radius), neighbourhood_attention_dense(q, k, v, radius),
                               **FP64)


def test_a_radius_past_the_grid_is_full_attention():
    q, k, v = _reference_qkv(1, 2, 3, 2, H=2, D=4, seed=1)
    out = neighbourhood_attention(q, k, v, radius=5)
    B, X, Y, Z, H, D = q.shape
    flat = [t.reshape(B, -1, H, D).transpose(1, 2) for t in (q, k, v)]        # [B, H, N, D]
    full = torch.nn.functional.scaled_dot_product_attention(*flat)          # no mask: every neuron
    torch.testing.assert_close(out, full.transpose(1, 2).reshape(q.shape), **FP64)


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 1, 5), (4, 4, 4)], ids=["1x1x1", "3x1x5", "4x4x4"])
def test_radius_zero_attends_only_to_itself(grid):
    q, k, v = _reference_qkv(2, *grid, H=2, D=3, seed=2)
    assert torch.equal(neighbourhood_attention(q, k, v, radius=0), v)       # softmax over one key is 1
    assert torch.equal(neighbourhood_attention_dense(q, k, v, radius=0), v)


def test_default_radius_is_one():
    q, k, v = _reference_qkv(1, 3, 3, 3, H=1, D=2, seed=3)
    torch.testing.assert_close(neighbourhood_attention(q, k, v), neighbourhood_attention_dense(q, k, v, 1), **FP64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_keeps_the_dtype_and_is_close(dtype):
    q, k, v = _reference_qkv(1, 3, 2, 4, H=2, D=8, seed=4)
    out = neighbourhood_attention(*(t.to(dtype) for t in (q, k, v)), radius=1)
    assert out.dtype == dtype
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[dtype]
    torch.testing.assert_close(out.double(), neighbourhood_attention(q, k, v, radius=1), **tol)


# ---------------------------------------------------------------- the reference op: gradients

@pytest.mark.parametrize("grid, radius", [((3, 1, 5), 1), ((2, 3, 4), 2), ((1, 1, 1), 1), ((4, 4, 4), 1)],
                         ids=["3x1x5-r1", "2x3x4-r2", "1x1x1-r1", "4x4x4-r1"])
def test_gradients_equal_dense_masked_attention(grid, radius):
    q, k, v = _reference_qkv(2, *grid, H=2, D=3, seed=5, requires_grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad((neighbourhood_attention(q, k, v, radius) * weight).sum(), (q, k, v))
    dense_grads = torch.autograd.grad((neighbourhood_attention_dense(q, k, v, radius) * weight).sum(), (q, k, v))
    for name, got, expected in zip("qkv", grads, dense_grads):
        assert got.isfinite().all(), f"d/d{name} has inf or NaN (masked positions leaking into the backward?)"
        torch.testing.assert_close(got, expected, **FP64, msg=lambda m: f"d/d{name}: {m}")


def test_gradcheck_on_a_tiny_grid():
    q, k, v = _reference_qkv(1, 2, 1, 3, H=1, D=2, seed=7, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: neighbourhood_attention(q, k, v, 1), (q, k, v))


# ---------------------------------------------------------------- the reference op: the neighbourhood

def test_neighbour_counts_at_radius_one():
    counts = neighbour_count(5, 4, 6, radius=1)
    assert counts.shape == (5, 4, 6) and counts.dtype == torch.int64
    assert counts[0, 0, 0] == 8 and counts[4, 3, 5] == 8                    # corners
    assert counts[2, 0, 0] == 12 and counts[0, 1, 5] == 12                  # edges
    assert counts[2, 1, 0] == 18 and counts[0, 2, 3] == 18                  # face centres
    assert counts[2, 2, 3] == 27                                            # interior
    c3 = neighbour_count(3, 3, 3, radius=1)
    assert sorted(c3.flatten().tolist()) == [8] * 8 + [12] * 12 + [18] * 6 + [27]


@pytest.mark.parametrize("grid, radius", [((3, 3, 3), 1), ((5, 4, 6), 1), ((5, 4, 6), 2), ((1, 7, 2), 3),
                                          ((3, 1, 5), 0)])
def test_neighbour_count_equals_the_mask_row_sums(grid, radius):
    counts = neighbour_count(*grid, radius)
    assert torch.equal(counts.flatten(), neighbourhood_mask(*grid, radius).sum(dim=1))


def test_the_mask_is_symmetric_row_major_and_does_not_wrap():
    X, Y, Z = 4, 3, 5
    mask = neighbourhood_mask(X, Y, Z, 1)
    assert mask.shape == (60, 60) and mask.dtype == torch.bool
    assert torch.equal(mask, mask.T) and mask.diagonal().all()

    def n(x, y, z):
        return (x * Y + y) * Z + z

    assert mask[n(0, 0, 0), n(1, 1, 1)]                    # diagonal neighbour
    assert not mask[n(0, 0, 0), n(2, 0, 0)]                # two steps away
    assert not mask[n(0, 1, 2), n(X - 1, 1, 2)]            # the far face: no wrap-around in x
    assert not mask[n(1, 1, 0), n(1, 1, Z - 1)]            # nor in z


def _neighbours_changed(radius, where, changed_at, seed=8):
    """Output at neuron `where` before and after changing k and v at neuron `changed_at`."""
    q, k, v = _reference_qkv(2, 4, 3, 5, H=2, D=3, seed=seed)
    before = neighbourhood_attention(q, k, v, radius)
    k2, v2 = k.clone(), v.clone()
    k2[:, changed_at[0], changed_at[1], changed_at[2]] += 1.0
    v2[:, changed_at[0], changed_at[1], changed_at[2]] -= 2.0
    after = neighbourhood_attention(q, k2, v2, radius)
    x, y, z = where
    return before[:, x, y, z], after[:, x, y, z]


@pytest.mark.parametrize("where, outside, radius", [
    ((0, 0, 0), (2, 0, 0), 1),          # two steps along x from a corner
    ((0, 1, 2), (3, 1, 2), 1),          # the opposite face: what a wrap-around would see
    ((1, 1, 0), (1, 1, 4), 1),          # likewise along z
    ((2, 1, 2), (2, 1, 4), 1),          # interior, two steps along z
    ((0, 0, 0), (3, 2, 3), 2),          # outside the r = 2 cube in x and z
])
def test_a_neuron_outside_the_neighbourhood_does_not_change_the_output(where, outside, radius):
    before, after = _neighbours_changed(radius, where, outside)
    assert torch.equal(before, after)


@pytest.mark.parametrize("where, inside, radius", [
    ((0, 0, 0), (1, 1, 1), 1),          # the diagonal corner of the corner's cube
    ((2, 1, 2), (3, 2, 3), 1),
    ((0, 1, 2), (0, 1, 2), 1),          # itself
    ((0, 0, 0), (2, 2, 2), 2),
])
def test_a_neuron_inside_the_neighbourhood_changes_the_output(where, inside, radius):
    before, after = _neighbours_changed(radius, where, inside)
    assert ((before - after).abs().amax(dim=-1) > 1e-6).all()   # every batch row and head moved


# ---------------------------------------------------------------- the reference op: bad input

def test_check_returns_the_sizes():
    q, k, v = _reference_qkv(2, 3, 1, 5, H=4, D=6)
    assert check_neighbourhood_attention_args(q, k, v, 1) == (2, 3, 1, 5, 4, 6)


@pytest.mark.parametrize("op", [neighbourhood_attention, neighbourhood_attention_dense])
def test_bad_inputs_are_value_errors(op):
    q, k, v = _reference_qkv(1, 2, 3, 2, H=2, D=4)
    shape = r"\[B, X, Y, Z, H, D\]"
    with pytest.raises(ValueError, match=f"k must be a floating-point tensor {shape}, got list"):
        op(q, k.tolist(), v)
    with pytest.raises(ValueError, match=f"q must be a floating-point tensor {shape}, got torch.int64"):
        op(q.long(), k, v)
    with pytest.raises(ValueError, match=rf"v must be {shape} = \[1, 2, 3, 2, 2, 4\], got \[1, 2, 3, 2, 8\]"):
        op(q, k, v.reshape(1, 2, 3, 2, 8))
    with pytest.raises(ValueError, match=rf"k must be {shape} = \[1, 2, 3, 2, 2, 4\], got \[1, 1, 3, 2, 2, 4\]"):
        op(q, k[:, :1], v)
    with pytest.raises(ValueError, match="every size must be >= 1, got X = 0"):
        op(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="k must have q's dtype torch.float64, got torch.float32"):
        op(q, k.float(), v)
    with pytest.raises(ValueError, match="v must be on q's device cpu \\(one device for all\\), got meta"):
        op(q, k, v.to("meta"))
    for radius in (-1, True, 1.0, None, "1"):
        with pytest.raises(ValueError, match=f"radius must be an int >= 0, got {radius!r}"):
            op(q, k, v, radius)


def test_bad_grids_for_the_helpers_are_value_errors():
    with pytest.raises(ValueError, match="neighbourhood_mask: grid side Y must be an int >= 1, got 0"):
        neighbourhood_mask(2, 0, 3, 1)
    with pytest.raises(ValueError, match="neighbour_count: radius must be an int >= 0, got -2"):
        neighbour_count(2, 2, 2, -2)
    with pytest.raises(ValueError, match="neighbour_count: grid side X must be an int >= 1, got 2.0"):
        neighbour_count(2.0, 2, 2, 1)
