"""The 3D neighbourhood-attention kernels against the reference, on every backend, at awkward grids.

Ground truth is `refimpl.ops.neighbourhood_attention` (itself tested equal to dense
masked attention in tests/test_grid_attention.py), in the kernel's own dtype and from the same
inputs. Outputs are poisoned with NaN before a kernel writes them. numba_cuda runs through numba's
CUDA simulator when there is no GPU (slow: the GPU-size case then skips with a reason); cupy cases
need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked with nvcc and
NVRTC wherever they exist.
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
