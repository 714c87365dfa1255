"""Nearest-code search (vector quantisation) kernels: for each row, the closest codebook entry.

Reference: `refimpl.ops.vq_nearest`.
    z [N, C], codebook [K, C] -> (indices [N] int64, distances [N] z.dtype)
    indices_n = argmin_k ||z_n - codebook_k||^2 (exact ties: the lowest k), distances_n = that minimum

The observation every version here uses: rows do not interact. Row n's answer is an argmin over
K distances, each a sum of C squared differences, and nothing else; so N workers (threads, or
thread blocks) search independently. Each distance is computed here from the difference
z_n - c_k, never from the expanded form ||z||^2 - 2 z.c + ||c||^2 the reference searches with, so
it is exact up to the rounding of C squares and their sum. The reference and a kernel can
therefore disagree on the index only at a near-tie, two codes whose distances differ by about
the unit roundoff times ||z||^2 + ||c||^2; the tests check such rows by distance.

"First minimum" is what makes ties deterministic: a worker walking codes in increasing k keeps a
candidate only when it is strictly nearer, and when workers' candidates are merged, equal
distances go to the lower k. So an exact tie (duplicate codes, or integer-valued data) gives the
lowest index on every backend, whatever the number of threads.

The ladder
    numba       a CPU thread per row (prange over N), walking the K codes in order, the full
                squared difference of each, keeping the first minimum.
    numba_cuda  v1 (registered): a thread block per row. Its threads split the codes (thread t
                takes k = t, t + blockDim, ...), each keeps its first minimum (distance, index),
                then a shared-memory tree reduction halves the candidates log2(blockDim) times,
                preferring the lower index on equal distances. Every thread reads the same z_n
                element at once (a broadcast); the codebook reads are strided by C across threads.
    cupy        vq_nearest.cu, vq_nearest_row_per_block: the same in CUDA C.
Faster rungs (codebook tiles staged in shared memory and reused by several rows per block; the
expanded form's z.c as a tensor-core GEMM with the argmin fused into its epilogue, then an exact
re-check of the few candidates within the rounding bound, as similarity-search libraries do) are
the GPU issue's work.

No forward_only check: the op has no gradient by definition (an argmin); the reference runs under
no_grad and returns detached distances, and so do the kernels, so there is no gradient to drop.
There is no per-thread array either, so no size bound beyond the CUDA grid (N <= 2^31 - 1 blocks)
and int32 code indices (K <= 2^31 - 1) in the CUDA versions.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import torch
from numba import cuda

from kernels import launch
from kernels.registry import register
from kernels.tensors import (NUMBA_FASTMATH, cupy_view, expect_device, expect_dtype, new_output, numba_cuda_view,
                             numpy_view)
from refimpl import ops

register("vq_nearest", "reference")(ops.vq_nearest)

MAX_BLOCK = 128          # numba_cuda: shared-memory length of the reduction; a launch uses a power of two <= this
CUPY_BLOCK = 128         # = VQ_BLOCK in vq_nearest.cu: the CUDA C kernel's (fixed) block size
INT32_MAX = 2 ** 31 - 1  # the CUDA versions index codes with int and launch one block per row


def _prepare(z, codebook, backend, dtypes):
    N, K, C = ops.check_vq_nearest_args(z, codebook)
    if backend != "numba" and max(N, K) > INT32_MAX:
        raise ValueError(f"vq_nearest: {backend} kernels support N, K <= {INT32_MAX}, got N = {N}, K = {K}")
    expect_dtype("vq_nearest", "z", z, dtypes)            # the check above made the codebook z's dtype
    expect_device("vq_nearest", backend, {"z": z, "codebook": codebook})
    indices = new_output((N,), torch.int64, z.device)
    distances = new_output((N,), z.dtype, z.device)
    return (N, K, C), indices, distances


def _block_size(K: int) -> int:
    """Threads per row: the launch's usual block (32 under the simulator, 128 on a GPU), but no more
    than the smallest power of two >= K, so a tiny codebook does not start idle threads."""
    block = 1
    while block < min(K, launch.block_size(MAX_BLOCK)):
        block *= 2
    return block


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _vq_nearest_cpu(z, codebook, indices, distances):
    N, C = z.shape
    K = codebook.shape[0]
    zero = z.dtype.type(0.0)                               # accumulate in the inputs' precision
    for n in numba.prange(N):
        best_d, best_k = zero, 0
        for k in range(K):                                 # in order, so the first minimum is the lowest k
            d = zero
            for c in range(C):
                diff = z[n, c] - codebook[k, c]
                d += diff * diff
            if k == 0 or d < best_d:                       # strictly nearer: a tie keeps the earlier code
                best_d, best_k = d, k
        indices[n] = best_k
        distances[n] = best_d


@register("vq_nearest", "numba")
def vq_nearest_numba(z, codebook):
    """numba CPU nearest code (a thread per row), float32/float64 CPU tensors.
    Returns (indices [N] int64, distances [N])."""
    _, indices, distances = _prepare(z, codebook, "numba", (torch.float32, torch.float64))
    _vq_nearest_cpu(numpy_view(z), numpy_view(codebook), numpy_view(indices), numpy_view(distances))
    return indices, distances


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _vq_nearest_v1_row_per_block(z, codebook, indices, distances):
    K, C = codebook.shape
    n, tid, block = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    cand_d = cuda.shared.array(MAX_BLOCK, numba.float32)   # each thread's candidate distance ...
    cand_k = cuda.shared.array(MAX_BLOCK, numba.int32)     # ... and code; K means "no code" (tid >= K)
    best_d, best_k = numba.float32(0.0), K
    k = tid
    while k < K:                                           # this thread's codes, in increasing k
        d = numba.float32(0.0)
        for c in range(C):
            diff = z[n, c] - codebook[k, c]                # z[n, c]: the same address for every thread
            d += diff * diff
        if best_k == K or d < best_d:                      # its first code, or strictly nearer
            best_d, best_k = d, k
        k += block
    cand_d[tid] = best_d
    cand_k[tid] = best_k
    cuda.syncthreads()
    half = block // 2
    while half > 0:                                        # tree: thread tid keeps the better of tid, tid + half
        if tid < half:
            other_d, other_k = cand_d[tid + half], cand_k[tid + half]
            mine_d, mine_k = cand_d[tid], cand_k[tid]
            if other_k < K and (mine_k == K or other_d < mine_d or (other_d == mine_d and other_k < mine_k)):
                cand_d[tid] = other_d
                cand_k[tid] = other_k
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        indices[n] = cand_k[0]
        distances[n] = cand_d[0]


@register("vq_nearest", "numba_cuda")
def vq_nearest_numba_cuda(z, codebook):
    """numba CUDA nearest code (v1: a block per row, a shared-memory argmin), float32.
    Returns (indices [N] int64, distances [N])."""
    (N, K, C), indices, distances = _prepare(z, codebook, "numba_cuda", (torch.float32,))
    launch.numba_cuda(_vq_nearest_v1_row_per_block, N, _block_size(K),
        numba_cuda_view(z), numba_cuda_view(codebook), numba_cuda_view(indices), numba_cuda_view(distances))
    return indices, distances


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("vq_nearest.cu")
CUPY_ENTRY_POINTS = ("vq_nearest_row_per_block",)  # the kernels this file launches


@register("vq_nearest", "cupy")
def vq_nearest_cupy(z, codebook):
    """CuPy nearest code (a block of VQ_BLOCK threads per row), float32 CUDA.
    Returns (indices [N] int64, distances [N])."""
    (N, K, C), indices, distances = _prepare(z, codebook, "cupy", (torch.float32,))
    launch.cupy(CU_SOURCE, "vq_nearest_row_per_block", N, CUPY_BLOCK,
                (cupy_view(z), cupy_view(codebook), cupy_view(indices), cupy_view(distances),
                 np.int32(N), np.int32(K), np.int32(C)))
    return indices, distances


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: N = R rows of width C, and
    K = max(B*D - 1, 143) codes (143 at `tiny`, 511 at `small`): more than a block of 128 threads, and
    not a multiple of it, so the last pass over the codes is partly empty.

    `kernels.check.check_backend` compares the indices exactly, so neither case has a near-tie:
      "vq_nearest"          standard-normal codes (pairwise squared distances ~ 2C, the smallest
                            several units), and each row = a random code + noise of std 0.01
                            (squared distance ~ 1e-4 C): its source code is nearest by a wide margin.
      "vq_nearest (exact ties, integer-valued)"
                            integer codes in [-2, 2] whose second half mirrors the first (code K-1-j
                            = code j), rows = a random code + integers in {-1, 0, 1}: every distance is
                            an integer, computed exactly by every backend and by the reference's
                            expanded form, so the only ties are exact and go to the lower index.
    """
    from kernels.check import random_tensor
    N, C, K = shapes["R"], shapes["C"], max(shapes["B"] * shapes["D"] - 1, launch.GPU_BLOCK + 15)
    codebook = random_tensor((K, C), generator=generator)
    source = torch.randint(K, (N,), generator=generator)
    z = codebook[source] + random_tensor((N, C), generator=generator, scale=0.01)

    int_codes = torch.randint(-2, 3, (K, C), generator=generator).float()
    int_codes[K - K // 2:] = int_codes[:K // 2].flip(0)              # code K-1-j = code j
    int_z = int_codes[torch.randint(K, (N,), generator=generator)] + \
        torch.randint(-1, 2, (N, C), generator=generator).float()
    return {"vq_nearest": ((z, codebook), {}),
            "vq_nearest (exact ties, integer-valued)": ((int_z, int_codes), {})}
