"""Coordinate-modulated linear layer kernels: a base GEMM plus low-rank cos/sin terms, in one pass.

Reference: `refimpl.ops.modulated_linear` (obviously right: `modulated_linear_materialised`).
    x [N, I], weight [O, I], U, P [M, O, r], V, Q [M, I, r], cos, sin [N, M] -> y [N, O]

Every row n has its own effective weight
    W_eff(n) = W + sum_m cos[n, m] U_m V_m^T + sin[n, m] P_m Q_m^T,
which is O * I numbers per row: far too many to build. The observation every version here
uses is that a row never needs W_eff, only x_n W_eff(n)^T, and that factors. First the row's
2 M r "coefficients", each a dot product of length I,

    t_c[m, k] = cos[n, m] * sum_i x[n, i] V[m, i, k]
    t_s[m, k] = sin[n, m] * sum_i x[n, i] Q[m, i, k]

then every output is a dot of length I with W's row o plus a dot of length 2 M r with the factors:

    y[n, o] = sum_i x[n, i] W[o, i] + sum_{m, k} t_c[m, k] U[m, o, k] + t_s[m, k] P[m, o, k].

Cost per row: O(I O + M r (I + O)) instead of O(M r I O). Rows are independent (no row reads
another's coefficients), so the rows are the parallel axis; within a row, the O outputs are
independent once the 2 M r coefficients exist, so a row splits into two phases with one
hand-over in between.

The ladder
    numba       a CPU thread per row n (prange): the row's t_c, t_s in two small per-thread arrays
                (np.empty), then its O outputs. The coefficient loop runs along k, V's fast axis,
                and the output loop along i and k, W's and U's fast axes, so all reads are
                contiguous.
    numba_cuda  v1 (registered): one thread block per row. Phase 1: the block's threads split the
                2 M r coefficients (each thread a few dot products of length I) and write them to
                shared memory. __syncthreads(). Phase 2: the threads split the O outputs; each
                reads the coefficients from shared memory (the same address for every thread of a
                warp: a broadcast). Shared memory bounds M r: MAX_MODULATION coefficients per term.
    cupy        modulated_linear.cu, modulated_linear_row_per_block: the same in CUDA C.
Faster rungs are the GPU issue's work: a block per tile of rows, so W, U and P are read into shared
memory once per tile instead of once per row (every block here reads all of W: N times in all);
tensor cores for the base GEMM and the two low-rank GEMMs (phase 1 is [rows, I] x [I, 2 M r],
phase 2 is [rows, I + 2 M r] x [I + 2 M r, O] with W, U, P stacked); and fusing the coefficients
themselves, cos and sin of theta . c_m, into the same kernel so they never touch global memory.
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

register("modulated_linear", "reference")(ops.modulated_linear)

# Coefficients per term (cos or sin) a CUDA block keeps in shared memory: M * r <= 1024, e.g. 64 x 16
# (the write-up's 64 x 12 fits). Two terms of float32: 2 * 1024 * 4 B = 8 KB per block.
MAX_MODULATION = 1024
MAX_THREADS = 128  # block size of the block-per-row versions on a GPU


def _prepare(x, weight, U, V, P, Q, cos, sin, backend, dtypes):
    N, I, O, M, r = ops.check_modulated_linear_args(x, weight, U, V, P, Q, cos, sin)  # shapes, one dtype
    if backend != "numba" and M * r > MAX_MODULATION:
        raise ValueError(f"modulated_linear: {backend} kernels keep M * r <= {MAX_MODULATION} coefficients per term "
                         f"in shared memory (MAX_MODULATION), got M * r = {M} * {r} = {M * r}")
    expect_dtype("modulated_linear", "x", x, dtypes)        # the others share x's dtype (checked above)
    tensors = {"x": x, "weight": weight, "U": U, "V": V, "P": P, "Q": Q, "cos": cos, "sin": sin}
    expect_device("modulated_linear", backend, tensors)
    forward_only("modulated_linear", *tensors.values())
    return (N, I, O, M, r), new_output((N, O), x.dtype, x.device)


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _modulated_linear_cpu(x, W, U, V, P, Q, cos, sin, y):
    N, I = x.shape
    O = W.shape[0]
    M, _, r = U.shape
    zero = x.dtype.type(0.0)                               # accumulate in the inputs' precision (vectorises)
    for n in numba.prange(N):
        # Phase 1: the row's 2 M r coefficients, in this thread's own arrays.
        t_c = np.empty((M, r), dtype=x.dtype)
        t_s = np.empty((M, r), dtype=x.dtype)
        for m in range(M):
            for k in range(r):
                t_c[m, k] = zero
                t_s[m, k] = zero
            for i in range(I):                             # V[m, i, :] and Q[m, i, :] are contiguous
                xi = x[n, i]
                for k in range(r):
                    t_c[m, k] += xi * V[m, i, k]
                    t_s[m, k] += xi * Q[m, i, k]
            a, b = cos[n, m], sin[n, m]
            for k in range(r):
                t_c[m, k] *= a
                t_s[m, k] *= b
        # Phase 2: every output, base dot product plus the low-rank sum.
        for o in range(O):
            acc = zero
            for i in range(I):                             # W[o, :] is contiguous
                acc += x[n, i] * W[o, i]
            for m in range(M):
                for k in range(r):                         # U[m, o, :] and P[m, o, :] are contiguous
                    acc += t_c[m, k] * U[m, o, k] + t_s[m, k] * P[m, o, k]
            y[n, o] = acc


@register("modulated_linear", "numba")
def modulated_linear_numba(x, weight, U, V, P, Q, cos, sin):
    """numba CPU modulated linear, float32/float64 CPU tensors. Returns y [N, O]."""
    _, y = _prepare(x, weight, U, V, P, Q, cos, sin, "numba", (torch.float32, torch.float64))
    _modulated_linear_cpu(numpy_view(x), numpy_view(weight), numpy_view(U), numpy_view(V), numpy_view(P),
                          numpy_view(Q), numpy_view(cos), numpy_view(sin), numpy_view(y))
    return y


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _modulated_linear_v1_row_per_block(x, W, U, V, P, Q, cos, sin, y):
    t_c = cuda.shared.array(MAX_MODULATION, numba.float32)   # the row's coefficients, flattened j = m * r + k
    t_s = cuda.shared.array(MAX_MODULATION, numba.float32)
    n, tid, threads = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    I = x.shape[1]
    O = W.shape[0]
    M, _, r = U.shape
    # Phase 1: threads split the M r pairs (m, k); each computes both terms' dot products of length I.
    # Neighbouring threads are neighbouring k of one m, so their reads of V[m, i, k] are neighbours too.
    for j in range(tid, M * r, threads):
        m, k = j // r, j % r
        acc_c = numba.float32(0.0)
        acc_s = numba.float32(0.0)
        for i in range(I):
            xi = x[n, i]                                   # the same address across the block: a broadcast
            acc_c += xi * V[m, i, k]
            acc_s += xi * Q[m, i, k]
        t_c[j] = cos[n, m] * acc_c
        t_s[j] = sin[n, m] * acc_s
    cuda.syncthreads()                                     # every coefficient written before any is read
    # Phase 2: threads split the O outputs. Writes of y[n, o] coalesce; each thread walks its own row of W
    # (neighbouring threads I floats apart: the uncoalesced read a tiled version fixes).
    for o in range(tid, O, threads):
        acc = numba.float32(0.0)
        for i in range(I):
            acc += x[n, i] * W[o, i]
        for m in range(M):
            for k in range(r):                             # t_c[j], t_s[j]: one shared-memory broadcast per warp
                j = m * r + k
                acc += t_c[j] * U[m, o, k] + t_s[j] * P[m, o, k]
        y[n, o] = acc


@register("modulated_linear", "numba_cuda")
def modulated_linear_numba_cuda(x, weight, U, V, P, Q, cos, sin):
    """numba CUDA modulated linear (v1: a block per row, coefficients in shared memory), float32. Returns y [N, O]."""
    (N, I, O, M, r), y = _prepare(x, weight, U, V, P, Q, cos, sin, "numba_cuda", (torch.float32,))
    launch.numba_cuda(_modulated_linear_v1_row_per_block, N, launch.block_size(MAX_THREADS),
        numba_cuda_view(x), numba_cuda_view(weight), numba_cuda_view(U), numba_cuda_view(V), numba_cuda_view(P),
        numba_cuda_view(Q), numba_cuda_view(cos), numba_cuda_view(sin), numba_cuda_view(y))
    return y


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("modulated_linear.cu")
CUPY_ENTRY_POINTS = ("modulated_linear_row_per_block",)  # the kernels this file launches


@register("modulated_linear", "cupy")
def modulated_linear_cupy(x, weight, U, V, P, Q, cos, sin):
    """CuPy modulated linear (a block per row, coefficients in shared memory), float32 CUDA. Returns y [N, O]."""
    (N, I, O, M, r), y = _prepare(x, weight, U, V, P, Q, cos, sin, "cupy", (torch.float32,))
    launch.cupy(CU_SOURCE, "modulated_linear_row_per_block", N, MAX_THREADS,
                (cupy_view(x), cupy_view(weight), cupy_view(U), cupy_view(V), cupy_view(P), cupy_view(Q),
                 cupy_view(cos), cupy_view(sin), cupy_view(y), np.int32(N), np.int32(I), np.int32(O), np.int32(M),
                 np.int32(r)))
    return y


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: N = R rows (B sequences of R / B), I = C in, O = 4 C out
    (an MLP's up-projection), M = D wavelet pairs of rank r = 2 H (tiny: 8 of rank 8; small: 32 of rank 8).
    Factors scaled so each term of y is O(1); cos, sin are those of random angles (a^2 + b^2 = 1)."""
    from kernels.check import random_tensor
    B, N, C = shapes["B"], shapes["R"], shapes["C"]
    T, I, O, M, r = N // B, C, 4 * C, shapes["D"], 2 * shapes["H"]
    x = random_tensor((N, I), generator=generator)
    weight = random_tensor((O, I), generator=generator, scale=I ** -0.5)
    U = random_tensor((M, O, r), generator=generator, scale=(M * r) ** -0.5)
    V = random_tensor((M, I, r), generator=generator, scale=I ** -0.5)
    P = random_tensor((M, O, r), generator=generator, scale=(M * r) ** -0.5)
    Q = random_tensor((M, I, r), generator=generator, scale=I ** -0.5)
    angle = 2 * torch.pi * torch.rand(N, M, generator=generator)           # theta_n . c_m, one per row
    angle_per_sequence = (2 * torch.pi * torch.rand(B, 1, M, generator=generator)).expand(B, T, M).reshape(N, M)
    factors = (x, weight, U, V, P, Q)
    return {"modulated_linear": (factors + (torch.cos(angle), torch.sin(angle)), {}),
            "modulated_linear (one theta per sequence)":
                (factors + (torch.cos(angle_per_sequence), torch.sin(angle_per_sequence)), {})}
