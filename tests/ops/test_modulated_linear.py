"""The modulated-linear kernels against the reference and against W_eff built per row, on every backend.

Two ground truths, from the same inputs: `refimpl.ops.modulated_linear` in the kernel's own
dtype (the op models call), and `modulated_linear_materialised` in float64 (W_eff per row, the
obviously right form; compared at the kernel dtype's tolerance, since the float64 answer differs
from any float32 one only by the kernel's own rounding). Shapes are awkward on purpose: every size 1,
odd sizes that are not multiples of 32, rank 1, M r at the CUDA kernels' shared-memory limit, O far
beyond a block. Outputs are poisoned with NaN before a kernel writes them. numba_cuda runs through
numba's CUDA simulator when there is no GPU (slow: the GPU-size case then skips with a reason); cupy
cases need a GPU and skip with a reason elsewhere, while the CUDA C is compile-checked with nvcc and
NVRTC wherever they exist.
"""

from __future__ import annotations


import pytest
import torch

import kernels
from kernels import modulated_linear as modulated_linear_kernels
from kernels.check import TOLERANCES, assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops

LIMIT = modulated_linear_kernels.MAX_MODULATION


def _inputs(N, I, O, M, r, dtype, device, seed=0):
    """(x, weight, U, V, P, Q, cos, sin), drawn in float64 and then cast, so every dtype sees the same numbers.
    Factors are scaled so each of y's three terms is O(1); cos, sin are those of random angles."""
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((N, I), torch.float64, generator=g)
    weight = random_tensor((O, I), torch.float64, generator=g, scale=I ** -0.5)
    U = random_tensor((M, O, r), torch.float64, generator=g, scale=(M * r) ** -0.5)
    V = random_tensor((M, I, r), torch.float64, generator=g, scale=I ** -0.5)
    P = random_tensor((M, O, r), torch.float64, generator=g, scale=(M * r) ** -0.5)
    Q = random_tensor((M, I, r), torch.float64, generator=g, scale=I ** -0.5)
    angle = 2 * torch.pi * torch.rand(N, M, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (x, weight, U, V, P, Q, torch.cos(angle), torch.sin(angle)))


def _work(N, I, O, M, r) -> int:
    """Inner-loop steps of one call: every output's dot of length I plus its low-rank sum of 2 M r."""
    return N * O * (I + 2 * M * r)


def _check(backend, args, name):
    """The kernel (outputs poisoned) against the reference in its dtype and W_eff-per-row in float64."""
    with poisoned_outputs():
        y = kernels.get("modulated_linear", backend)(*args)
    assert_close(y, ops.modulated_linear(*args), f"{name} vs reference")
    atol, rtol = TOLERANCES[args[0].dtype]
    expected = ops.modulated_linear_materialised(*(a.cpu().double() for a in args))
    assert_close(y.cpu().double(), expected, f"{name} vs W_eff per row (float64)", atol=atol, rtol=rtol)
    return y


# ---------------------------------------------------------------- kernel vs reference and W_eff

# id -> (N, I, O, M, r)
CASES = {
    "N9-I12-O48-M8-r4": (9, 12, 48, 8, 4),          # the `tiny` example's sizes
    "all-1": (1, 1, 1, 1, 1),                       # every size 1
    "N7-I13-O37-M3-r5": (7, 13, 37, 3, 5),          # odd everything, none a multiple of 32
    "N5-I33-O65-M6-r1": (5, 33, 65, 6, 1),          # rank 1; I and O one past a multiple of 32
    "N2-I3-O5-M64-r16": (2, 3, 5, 64, 16),          # M r = 1024 coefficients per term: the CUDA limit
    "N3-I4-O300-M2-r3": (3, 4, 300, 2, 3),          # O far past a block (128 on a GPU, 32 simulated)
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_modulated_linear_kernel_vs_reference_and_materialised(backend, dtype, case):
    skip_unless_runnable(backend, work=_work(*case))
    args = _inputs(*case, dtype, device_for(backend))
    _check(backend, args, f"modulated_linear[{backend}] {case}")


@pytest.mark.parametrize("zeroed, cos_value", [("U", 1.0), ("P", 1.0), ("U", 0.0)],
                         ids=["cos1-U0-plain-linear", "cos1-P0-W-plus-UV", "sin1-U0-W-plus-PQ"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_modulated_linear_with_fixed_coefficients_is_a_plain_linear(backend, dtype, zeroed, cos_value):
    """cos = 1, sin = 0 switches the sin term off; U = 0 the cos term too, leaving x W^T. With one term
    on (a coefficient of 1, the other term's factor zero), the layer is a fixed linear with W + sum U V^T."""
    skip_unless_runnable(backend)
    N, I, O, M, r = 6, 10, 21, 4, 3
    x, weight, U, V, P, Q, cos, sin = _inputs(N, I, O, M, r, dtype, device_for(backend), seed=1)
    cos, sin = torch.full_like(cos, cos_value), torch.full_like(sin, 1.0 - cos_value)
    U, P = (torch.zeros_like(U), P) if zeroed == "U" else (U, torch.zeros_like(P))
    args = (x, weight, U, V, P, Q, cos, sin)
    y = _check(backend, args, f"modulated_linear[{backend}] cos={cos_value} {zeroed}=0")
    if cos_value == 1.0 and zeroed == "U":
        fixed = weight
    elif cos_value == 1.0:
        fixed = weight + torch.einsum("mor,mir->oi", U, V)                          # W + sum_m U_m V_m^T
    else:
        fixed = weight + torch.einsum("mor,mir->oi", P, Q)                          # W + sum_m P_m Q_m^T
    assert_close(y, x @ fixed.T, f"modulated_linear[{backend}] as a plain linear layer")


@pytest.mark.parametrize("backend", ["numba", "numba_cuda"])
def test_modulated_linear_takes_non_contiguous_inputs(backend):
    """cos and sin as the two halves of one [N, 2M] tensor, x stored transposed."""
    skip_unless_runnable(backend)
    x, weight, U, V, P, Q, cos, sin = _inputs(5, 7, 11, 3, 2, torch.float32, device_for(backend), seed=2)
    cos, sin = torch.cat([cos, sin], dim=1).split([3, 3], dim=1)                 # views with row stride 2M
    x = x.T.contiguous().T
    assert not (cos.is_contiguous() or sin.is_contiguous() or x.is_contiguous())
    _check(backend, (x, weight, U, V, P, Q, cos, sin), f"strided modulated_linear[{backend}]")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_modulated_linear_at_gpu_size(backend):
    N, I, O, M, r = 1024, 256, 1024, 64, 12                 # the write-up's M = 64 wavelet pairs of rank 12
    skip_unless_runnable(backend, work=_work(N, I, O, M, r))
    args = _inputs(N, I, O, M, r, torch.float32, device_for(backend), seed=4)
    with poisoned_outputs():
        y = kernels.get("modulated_linear", backend)(*args)
    assert_close(y, ops.modulated_linear(*args), f"modulated_linear[{backend}] at GPU size")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba", "numba_cuda", "cupy"])
def test_modulated_linear_bad_shapes_are_value_errors(backend):
    """The shape checks come before the device checks, so these run on any machine."""
    op = kernels.get("modulated_linear", backend)
    x, weight, U, V, P, Q, cos, sin = _inputs(4, 5, 6, 3, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"V must be \[M, I, r\] = \[3, 5, 2\]"):
        op(x, weight, U, V[:, :4], P, Q, cos, sin)
    with pytest.raises(ValueError, match=r"P must be \[M, O, r\] = \[3, 6, 2\]"):
        op(x, weight, U, V, P[:, :, :1], Q, cos, sin)
    with pytest.raises(ValueError, match=r"sin must be \[N, M\] = \[4, 3\]"):
        op(x, weight, U, V, P, Q, cos, sin.T)
    with pytest.raises(ValueError, match=r"U must be \[M, O, r\] = \[M, 6, r\], got \[3, 5, 2\]"):
        op(x, weight, U[:, :5], V, P, Q, cos, sin)
    with pytest.raises(ValueError, match=r"weight must be \[O, I\] = \[O, 5\], got \[6, 4\]"):
        op(x, weight[:, :4], U, V, P, Q, cos, sin)
    with pytest.raises(ValueError, match="every size must be >= 1"):
        op(x[:0], weight, U, V, P, Q, cos[:0], sin[:0])
    with pytest.raises(ValueError, match="weight must have x's dtype torch.float32, got torch.float64"):
        op(x, weight.double(), U, V, P, Q, cos, sin)


def test_modulated_linear_kernels_refuse_wrong_dtypes_and_gradients():
    args = _inputs(2, 3, 4, 2, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="x must be float32, float64, got bfloat16"):
        kernels.get("modulated_linear", "numba")(*(a.bfloat16() for a in args))
    for backend in ("numba_cuda", "cupy"):       # the dtype check comes before the device check
        with pytest.raises(ValueError, match="x must be float32, got float64"):
            kernels.get("modulated_linear", backend)(*(a.double() for a in args))
    trained = args[1].clone().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        kernels.get("modulated_linear", "numba")(args[0], trained, *args[2:])
    with torch.no_grad():
        kernels.get("modulated_linear", "numba")(args[0], trained, *args[2:])   # fine without a graph


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_modulation_beyond_shared_memory_is_a_value_error(backend):
    """M r = LIMIT + 1 coefficients per term would overflow the block's shared arrays. The size check comes
    before the device check, so this runs on any machine; the numba CPU kernel has no such limit."""
    M, r = LIMIT + 1, 1
    args = _inputs(2, 3, 4, M, r, torch.float32, "cpu")
    with pytest.raises(ValueError, match=rf"M \* r <= {LIMIT} .*got M \* r = {M} \* {r} = {M * r}"):
        kernels.get("modulated_linear", backend)(*args)
    y = kernels.get("modulated_linear", "numba")(*args)
    assert_close(y, ops.modulated_linear(*args), "numba modulated_linear past the CUDA limit")


def test_cpu_tensors_to_the_cupy_kernel_are_a_value_error():
    args = _inputs(2, 3, 4, 2, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("modulated_linear", "cupy")(*args)

# The CUDA C compile checks (nvcc and NVRTC) are in tests/test_kernels.py, over kernels.OP_MODULES.
