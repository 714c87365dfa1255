"""RMSNorm's kernels against `refimpl.ops.rms_norm`, on every backend, at awkward shapes, and the ladders of
numba-cuda and CuPy versions. Outputs are poisoned with NaN (floats) or -1
(indices) before a kernel writes them; numba_cuda runs on numba's CUDA simulator when there is no GPU
(the biggest cases then skip with a reason), cupy cases skip without a GPU. The check every kernel
passes (tests/test_every_kernel.py) runs beside these. The last part tests the reference op itself
against torch's `F.rms_norm`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import rms_norm as rms_norm_kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, seeded, skip_unless_runnable
from refimpl import ops
from refimpl.blocks import RMSNorm


RMS_SHAPES = {"rows3-C60": (3, 60), "B2-T5-C63": (2, 5, 63), "one-element": (1, 1), "rows4-C257": (4, 257)}


@pytest.mark.parametrize("shape", RMS_SHAPES.values(), ids=RMS_SHAPES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_rms_norm_kernel_vs_reference(backend, shape, dtype):
    skip_unless_runnable(backend)
    g, device = seeded(), device_for(backend)
    x = random_tensor(shape, dtype, device, g, scale=3.0)
    w = random_tensor(shape[-1:], dtype, device, g)
    expected = kernels.get("rms_norm", "reference")(x, w, 1e-5)
    with poisoned_outputs():
        got = kernels.get("rms_norm", backend)(x, w, 1e-5)
    assert_close(got, expected, f"rms_norm[{backend}]")


@pytest.mark.parametrize("variant", rms_norm_kernels.NUMBA_CUDA_LADDER)
def test_rms_norm_numba_cuda_ladder_vs_reference(variant):
    skip_unless_runnable("numba_cuda")
    g, device = seeded(1), device_for("numba_cuda")
    x, w = random_tensor((3, 70), device=device, generator=g), random_tensor((70,), device=device, generator=g)
    with poisoned_outputs():
        got = rms_norm_kernels.NUMBA_CUDA_LADDER[variant](x, w)
    assert_close(got, kernels.get("rms_norm", "reference")(x, w), variant)


@pytest.mark.parametrize("variant", rms_norm_kernels.CUPY_LADDER)
def test_rms_norm_cupy_ladder_vs_reference(variant):
    skip_unless_runnable("cupy")
    g = seeded(2)
    x, w = random_tensor((64, 1000), device="cuda", generator=g), random_tensor((1000,), device="cuda", generator=g)
    with poisoned_outputs():
        got = rms_norm_kernels.CUPY_LADDER[variant](x, w)
    assert_close(got, kernels.get("rms_norm", "reference")(x, w), variant)


def test_rms_norm_kernel_refuses_wrong_dtype_and_gradients():
    with pytest.raises(ValueError, match="must be float32, float64, got bfloat16"):
        kernels.get("rms_norm", "numba")(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16))
    w = torch.randn(8, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        kernels.get("rms_norm", "numba")(torch.randn(2, 8), w)
    with torch.no_grad():
        kernels.get("rms_norm", "numba")(torch.randn(2, 8), w)  # fine without a graph


# ---------------------------------------------------------------- the reference op: against torch's own

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rms_norm_matches_torch_builtin():
    x, w = random_tensor((3, 5, 60), generator=_gen()), random_tensor((60,), generator=_gen(1))
    assert_close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (60,), w, eps=1e-6), "rms_norm vs F.rms_norm")
    assert RMSNorm(60).eps == 1e-6
