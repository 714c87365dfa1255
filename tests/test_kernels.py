"""What all kernels share: every op's CUDA C (kernels.OP_MODULES) compiled with nvcc and with NVRTC, and
bad input refused by any backend. Each op's own kernel tests are tests/ops/test_<op>.py. CuPy kernels
need a GPU to run, but their CUDA C is compile-checked here wherever nvcc / NVRTC exist.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

import kernels
from kernel_testing import ptx_entries


# ---------------------------------------------------------------- bad input

def test_cpu_tensor_to_cuda_kernel_is_a_value_error():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("rms_norm", "cupy")(x, w)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="cpu tensor"):
        kernels.get("attention", "cupy")(q, q, q)
    if not kernels.cuda_simulator_enabled():
        with pytest.raises(ValueError, match="cpu tensor"):
            kernels.get("rms_norm", "numba_cuda")(x, w)


def test_degenerate_sizes_are_value_errors():
    with pytest.raises(ValueError, match="every size must be >= 1"):
        kernels.get("attention", "numba")(torch.randn(1, 4, 2, 0), torch.randn(1, 4, 2, 0), torch.randn(1, 4, 2, 0))
    with pytest.raises(ValueError, match="every size must be >= 1, got C = 0"):
        kernels.get("rms_norm", "numba")(torch.randn(3, 0), torch.randn(0))
    with pytest.raises(ValueError, match="k >= 1"):
        kernels.get("moe_dispatch", "numba")(torch.randn(3, 4), torch.zeros(3, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="every size must be >= 1, got N = 0"):
        kernels.get("moe_dispatch", "numba")(torch.randn(0, 4), torch.zeros(0, 1, dtype=torch.long), 2)


# ---------------------------------------------------------------- CUDA C compiles

KERNEL_MODULES = list(kernels.OP_MODULES)  # every op's .cu file


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=[m.CU_SOURCE.name for m in KERNEL_MODULES])
def test_cuda_source_compiles_with_nvcc(module, tmp_path):
    nvcc = kernels.machine.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    ptx = tmp_path / "out.ptx"
    result = subprocess.run([nvcc, "-ptx", "-arch=sm_80", "-std=c++17", str(module.CU_SOURCE), "-o", str(ptx)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(module.CUPY_ENTRY_POINTS) <= ptx_entries(ptx.read_text())


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=[m.CU_SOURCE.name for m in KERNEL_MODULES])
def test_cuda_source_compiles_with_nvrtc_as_cupy_will(module):
    """CuPy's RawModule compiles with NVRTC, which (unlike nvcc) has no host headers such as math.h."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as err:  # missing library or CuPy: the error type depends on which
        pytest.skip(f"NVRTC is not loadable here ({type(err).__name__}: {err})")
    program = nvrtc.createProgram(module.CU_SOURCE.read_text(), module.CU_SOURCE.name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, ["-arch=compute_80", "-std=c++17"])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(program))
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert set(module.CUPY_ENTRY_POINTS) <= ptx_entries(ptx)
