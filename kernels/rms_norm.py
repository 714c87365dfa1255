"""RMSNorm kernels: y = x / sqrt(mean(x^2) + eps) * w over the last dimension.

Reference: `refimpl.ops.rms_norm`. x: [..., C], w: [C] -> y: [..., C].
Each row is independent, so every version below parallelises over rows; they
differ in who sums a row's squares.

The ladder
    numba       one CPU thread per row (prange); fastmath lets LLVM vectorise the sum of squares
    numba_cuda  v1_thread_per_row: one GPU thread walks a whole row. Simple, but
                neighbouring threads read addresses C apart: uncoalesced.
                v2_block_per_row (registered): a block of threads strides along
                one row (coalesced reads), then halves a shared-memory array
                log2(threads) times to get the sum.
    cupy        rms_norm.cu, the same two steps in CUDA C: rms_norm_block_per_row
                (shared-memory tree) and rms_norm_warp_shuffle (each warp sums with
                __shfl_down_sync, then one warp sums the warp totals; fewer barriers).
"""

from __future__ import annotations

import math
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

register("rms_norm", "reference")(ops.rms_norm)

MAX_THREADS = 128  # block size of the block-per-row versions (a power of two)


def _prepare(x, weight, eps, backend, dtypes):
    ops.check_rms_norm_args(x, weight, eps)
    expect_dtype("rms_norm", "x", x, dtypes)
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    expect_device("rms_norm", backend, {"x": x, "weight": weight})
    forward_only("rms_norm", x, weight)
    rows = x.reshape(-1, x.shape[-1])  # [R, C]
    return rows, new_output(rows.shape, x.dtype, x.device)


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _rms_norm_rows_cpu(x, w, eps, out):
    R, C = x.shape
    for r in numba.prange(R):
        acc = x.dtype.type(0.0)  # x's own precision: fastmath then vectorises the sum
        for c in range(C):
            acc += x[r, c] * x[r, c]
        inv_rms = 1.0 / math.sqrt(acc / C + eps)
        for c in range(C):
            out[r, c] = x[r, c] * inv_rms * w[c]


@register("rms_norm", "numba")
def rms_norm_numba(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """numba CPU RMSNorm. x: [..., C], weight: [C], float32 or float64 CPU tensors -> [..., C]."""
    rows, out = _prepare(x, weight, eps, "numba", (torch.float32, torch.float64))
    _rms_norm_rows_cpu(numpy_view(rows), numpy_view(weight), float(eps), numpy_view(out))
    return out.view(x.shape)


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _rms_norm_v1_thread_per_row(x, w, eps, out):
    r = cuda.grid(1)
    if r < x.shape[0]:
        C = x.shape[1]
        acc = numba.float32(0.0)
        for c in range(C):
            acc += x[r, c] * x[r, c]
        inv_rms = numba.float32(1.0) / math.sqrt(acc / numba.float32(C) + eps)
        for c in range(C):
            out[r, c] = x[r, c] * inv_rms * w[c]


@cuda.jit
def _rms_norm_v2_block_per_row(x, w, eps, out):
    partial = cuda.shared.array(MAX_THREADS, numba.float32)
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    C = x.shape[1]
    acc = numba.float32(0.0)
    for c in range(tid, C, cuda.blockDim.x):   # coalesced: thread tid reads c = tid, tid + threads, ...
        acc += x[r, c] * x[r, c]
    partial[tid] = acc
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:                          # tree: threads < stride add their partner's partial sum
        if tid < stride:
            partial[tid] += partial[tid + stride]
        cuda.syncthreads()
        stride //= 2
    inv_rms = numba.float32(1.0) / math.sqrt(partial[0] / numba.float32(C) + eps)
    for c in range(tid, C, cuda.blockDim.x):
        out[r, c] = x[r, c] * inv_rms * w[c]


def rms_norm_numba_cuda_v1(x, weight, eps=1e-6):
    """numba CUDA RMSNorm, v1: one thread per row. x: [..., C], weight: [C] float32 -> [..., C]."""
    rows, out = _prepare(x, weight, eps, "numba_cuda", (torch.float32,))
    R = rows.shape[0]
    threads = launch.block_size()
    launch.numba_cuda(_rms_norm_v1_thread_per_row, launch.grid_for(R, threads), threads,
        numba_cuda_view(rows), numba_cuda_view(weight), np.float32(eps), numba_cuda_view(out))
    return out.view(x.shape)


@register("rms_norm", "numba_cuda")
def rms_norm_numba_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """numba CUDA RMSNorm, v2: one block per row, shared-memory tree sum. x: [..., C], weight: [C] float32 -> [..., C]."""
    rows, out = _prepare(x, weight, eps, "numba_cuda", (torch.float32,))
    launch.numba_cuda(_rms_norm_v2_block_per_row, rows.shape[0], launch.block_size(MAX_THREADS),
        numba_cuda_view(rows), numba_cuda_view(weight), np.float32(eps), numba_cuda_view(out))
    return out.view(x.shape)


NUMBA_CUDA_LADDER = {"v1_thread_per_row": rms_norm_numba_cuda_v1, "v2_block_per_row": rms_norm_numba_cuda}


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("rms_norm.cu")
CUPY_ENTRY_POINTS = ("rms_norm_block_per_row", "rms_norm_warp_shuffle")  # the kernels this file launches


def _rms_norm_cupy(kernel_name: str, x, weight, eps):
    rows, out = _prepare(x, weight, eps, "cupy", (torch.float32,))
    R, C = rows.shape
    launch.cupy(CU_SOURCE, kernel_name, R, MAX_THREADS,
                (cupy_view(rows), cupy_view(weight), cupy_view(out), np.int32(C), np.float32(eps)))
    return out.view(x.shape)


def rms_norm_cupy_block(x, weight, eps=1e-6):
    """CuPy RMSNorm: one block per row, shared-memory tree sum. x: [..., C], weight: [C] float32 CUDA -> [..., C]."""
    return _rms_norm_cupy("rms_norm_block_per_row", x, weight, eps)


@register("rms_norm", "cupy")
def rms_norm_cupy(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CuPy RMSNorm: one block per row, warp-shuffle sums. x: [..., C], weight: [C] float32 CUDA -> [..., C]."""
    return _rms_norm_cupy("rms_norm_warp_shuffle", x, weight, eps)


CUPY_LADDER = {"block_per_row": rms_norm_cupy_block, "warp_shuffle": rms_norm_cupy}


# ---------------------------------------------------------------- PyTorch's own, for comparison

TORCH_BUILTIN_NAME = "torch.nn.functional.rms_norm"


def torch_builtin(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch's fused RMSNorm with this op's signature (what the benchmarks and chapter 00 time beside the kernels)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def useful_flops(x: torch.Tensor) -> int:
    """4 per element: square, add to the row's sum, scale by 1/rms, scale by the weight."""
    return 4 * x.numel()


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: x [R, C], weight [C], eps not the
    default. In the second case x is scaled down to ~1e-3, so eps = 1e-4 outweighs mean(x^2) ~ 1e-6: a kernel
    that drops eps, or adds it in the wrong place, fails there."""
    from kernels.check import random_tensor
    x = random_tensor((shapes["R"], shapes["C"]), generator=generator)
    w = random_tensor((shapes["C"],), generator=generator)
    return {"rms_norm": ((x, w), {"eps": 1e-5}),
            "rms_norm (eps dominates)": ((x * 1e-3, w), {"eps": 1e-4})}
