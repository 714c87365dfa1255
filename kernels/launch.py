"""Launching a kernel: the block size, the grid that covers n workers, and one call per toolkit.

    threads = launch.block_size()                           # 128 on a GPU, 32 under numba's simulator
    launch.numba_cuda(kernel, launch.grid_for(n, threads), threads, *arrays)
    launch.cupy(CU_SOURCE, "entry_name", launch.grid_for(n, threads), threads, arrays)

Every numba-cuda and CuPy launch in `kernels/` goes through `numba_cuda` and `cupy`, on PyTorch's
current stream, so torch ops and kernels stay ordered. Kernels whose threads never cooperate work at
any block size; the ones that reduce inside a block (shared memory) say which sizes they take.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kernels.machine import cuda_simulator_enabled

GPU_BLOCK = 128        # threads per block on a GPU: four warps, enough to hide latency, small enough for many blocks
SIMULATOR_BLOCK = 32   # under numba's simulator each thread is a Python thread: one warp's worth is plenty


def block_size(gpu_threads: int = GPU_BLOCK) -> int:
    """Threads per block: `gpu_threads` on a GPU, SIMULATOR_BLOCK under the simulator."""
    return SIMULATOR_BLOCK if cuda_simulator_enabled() else gpu_threads


def grid_for(n: int, threads: int) -> int:
    """Blocks of `threads` that cover n workers (the last block may be partly idle)."""
    return (n + threads - 1) // threads


def numba_cuda_stream():
    """PyTorch's current stream, as numba sees it (the default stream under the simulator)."""
    from numba import cuda
    if cuda_simulator_enabled():
        return cuda.default_stream()
    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)


def numba_cuda(kernel, grid: int, threads: int, *args) -> None:
    """Launch a numba.cuda kernel on `grid` blocks of `threads`, on PyTorch's current stream."""
    kernel[grid, threads, numba_cuda_stream()](*args)


def cupy_stream():
    """PyTorch's current CUDA stream as a CuPy stream (use as a context manager around launches)."""
    import cupy
    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


@functools.cache
def cupy_module(cu_file: str | Path, options: tuple[str, ...] = ("-std=c++17",)):
    """The CUDA C file compiled by CuPy (NVRTC), once per process."""
    import cupy
    return cupy.RawModule(code=Path(cu_file).read_text(), options=options)


def cupy(cu_file: str | Path, entry: str, grid: int, threads: int, args: tuple) -> None:
    """Launch `entry` of the CUDA C file on `grid` blocks of `threads`, on PyTorch's current stream."""
    with cupy_stream():
        cupy_module(cu_file).get_function(entry)((grid,), (threads,), args)
