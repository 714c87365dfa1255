"""What every kernel test file shares: the backend/dtype grid, the skip rule, the PTX reader, and a
fixture that holds torch to one thread (import `one_torch_thread` into a test module to use it).

numba CPU kernels take float32 and float64; the CUDA ones float32. numba_cuda runs through
numba's CUDA simulator when there is no GPU (slow: cases above SIMULATOR_BUDGET skip with a
reason and run on a GPU); cupy needs a GPU and skips with a reason elsewhere, while its CUDA C
is compile-checked with nvcc and NVRTC (tests/test_kernels.py) wherever they exist.
"""

from __future__ import annotations

import re

import pytest
import torch

import kernels

BACKEND_DTYPES = [pytest.param("numba", torch.float32, id="numba-fp32"),
                  pytest.param("numba", torch.float64, id="numba-fp64"),
                  pytest.param("numba_cuda", torch.float32, id="numba_cuda-fp32"),
                  pytest.param("cupy", torch.float32, id="cupy-fp32")]
SIMULATOR_BUDGET = 3_000_000  # rough count of inner-loop steps the simulator finishes in about a second


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """For test modules that run thousands of small torch ops (an optimiser's reference steps): on a busy
    2-core machine each op split over two OpenMP threads waits at a barrier for a core another process
    holds, about 10x slower than one thread doing it alone. Put back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def skip_unless_runnable(backend: str, work: int = 0) -> None:
    """Skip (with the reason) when this machine cannot run `backend`, or when `work` inner-loop steps
    would take the CUDA simulator too long."""
    status = kernels.backend_status()[backend]
    if status.startswith("unavailable"):
        pytest.skip(f"{backend}: {status}")
    if backend == "numba_cuda" and kernels.cuda_simulator_enabled() and work > SIMULATOR_BUDGET:
        pytest.skip(f"too large for the CUDA simulator ({work:,} steps); runs on a GPU")


def ptx_entries(ptx: str) -> set[str]:
    """Names of the kernels (`.entry name(`) in PTX text."""
    return set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx))


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator with this seed: each test draws its inputs from its own."""
    return torch.Generator().manual_seed(seed)
