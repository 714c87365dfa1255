"""3D neighbourhood attention kernels: every neuron of a grid attends over the cube around it.

Reference: `refimpl.ops.neighbourhood_attention` (ground truth: `neighbourhood_attention_dense`).
    q, k, v [B, X, Y, Z, H, D], radius r -> out [B, X, Y, Z, H, D]
Neuron (x, y, z), head h, reads the neurons (x', y', z') of the grid with
max(|x - x'|, |y - y'|, |z - z'|) <= r, itself included; the grid does not wrap around.

The observation every version here uses: each (batch, neuron, head) is an independent query
over at most (2r + 1)^3 keys (27 at r = 1), all of them its own head's keys. So B * X * Y * Z * H
workers can each walk their neighbourhood once with an online softmax (Milakov & Gimelshein 2018,
arXiv:1805.02867: a running max m, a running denominator l and a D-long running sum of values,
rescaled by exp(m_old - m_new) whenever the max grows) and write their own D outputs, with no
communication at all. The boundary costs nothing: the loops over x', y', z' are clamped to the
grid, so there is no padding and no (2r + 1)^3-fold copy of k and v as in the reference.

The ladder
    numba       a CPU thread per query (prange over the flattened B * X * Y * Z * H); the output row
                is the accumulator, updated in the inputs' precision.
    numba_cuda  v1 (registered): one GPU thread per query (b, x, y, z, h), the accumulator in a
                thread-local array of MAX_HEAD_DIM floats. Simple; each thread walks its own D-long
                rows, so reads are not coalesced, but neighbouring threads are neighbouring heads
                (then neighbouring z) whose rows sit side by side, and the cubes of adjacent neurons
                overlap, so most k and v reads hit in L1/L2.
    cupy        neighbourhood_attention.cu, neighbourhood_attention_query_per_thread: the same in CUDA C.
Faster rungs (a block per tile of neurons with the tile's k and v, plus a halo of r, staged in
shared memory; a warp per query splitting D with shuffles) are the GPU issue's work.
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

register("neighbourhood_attention", "reference")(ops.neighbourhood_attention)

MAX_HEAD_DIM = 128  # per-thread accumulator length in the CUDA versions (the write-up: d = 1024 / 8 heads)


def _prepare(q, k, v, radius, backend, dtypes):
    B, X, Y, Z, H, D = ops.check_neighbourhood_attention_args(q, k, v, radius)
    if backend != "numba" and D > MAX_HEAD_DIM:
        raise ValueError(f"neighbourhood_attention: {backend} kernels support head dimension "
                         f"D <= {MAX_HEAD_DIM}, got {D}")
    expect_dtype("neighbourhood_attention", "q", q, dtypes)   # k and v share q's dtype (checked above)
    expect_device("neighbourhood_attention", backend, {"q": q, "k": k, "v": v})
    forward_only("neighbourhood_attention", q, k, v)
    # A radius past the longest side already covers the whole grid; clamping it keeps the CUDA
    # kernels' x + r + 1 inside int32 for any radius a caller passes.
    radius = min(radius, max(X, Y, Z))
    scale = 1.0 / math.sqrt(D)
    out = new_output((B, X, Y, Z, H, D), q.dtype, q.device)
    return (B, X, Y, Z, H, D), radius, scale, out


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _neighbourhood_attention_cpu(q, k, v, radius, scale, out):
    B, X, Y, Z, H, D = q.shape
    zero = q.dtype.type(0.0)                                # accumulate in the inputs' precision
    typed_scale = q.dtype.type(scale)
    for query in numba.prange(B * X * Y * Z * H):          # row-major (b, x, y, z, h)
        h = query % H
        z = (query // H) % Z
        y = (query // (H * Z)) % Y
        x = (query // (H * Z * Y)) % X
        b = query // (H * Z * Y * X)
        acc = out[b, x, y, z, h]                           # [D]: the output row is the accumulator
        acc[:] = zero
        m = q.dtype.type(-np.inf)                          # running max of the scores
        l = zero                                           # running softmax denominator
        for xn in range(max(0, x - radius), min(X, x + radius + 1)):   # bounds, not padding
            for yn in range(max(0, y - radius), min(Y, y + radius + 1)):
                for zn in range(max(0, z - radius), min(Z, z + radius + 1)):
                    score = zero
                    for d in range(D):
                        score += q[b, x, y, z, h, d] * k[b, xn, yn, zn, h, d]
                    score *= typed_scale
                    m_new = max(m, score)
                    correction = q.dtype.type(math.exp(m - m_new))   # 0 for the first key (m = -inf)
                    weight = q.dtype.type(math.exp(score - m_new))
                    l = l * correction + weight
                    for d in range(D):
                        acc[d] = acc[d] * correction + weight * v[b, xn, yn, zn, h, d]
                    m = m_new
        for d in range(D):                                 # l >= 1: the largest score adds exp(0) = 1
            acc[d] /= l


@register("neighbourhood_attention", "numba")
def neighbourhood_attention_numba(q, k, v, radius=1):
    """numba CPU neighbourhood attention. q, k, v: [B, X, Y, Z, H, D] float32 or float64 CPU -> same shape."""
    _, radius, scale, out = _prepare(q, k, v, radius, "numba", (torch.float32, torch.float64))
    _neighbourhood_attention_cpu(numpy_view(q), numpy_view(k), numpy_view(v), radius, scale, numpy_view(out))
    return out


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _neighbourhood_attention_v1_query_per_thread(q, k, v, radius, scale, out):
    B, X, Y, Z, H, D = q.shape
    query = cuda.grid(1)
    if query >= B * X * Y * Z * H:
        return
    h = query % H
    z = (query // H) % Z
    y = (query // (H * Z)) % Y
    x = (query // (H * Z * Y)) % X
    b = query // (H * Z * Y * X)
    acc = cuda.local.array(MAX_HEAD_DIM, numba.float32)    # this thread's D running sums
    for d in range(D):
        acc[d] = 0.0
    m = numba.float32(-math.inf)
    l = numba.float32(0.0)
    for xn in range(max(0, x - radius), min(X, x + radius + 1)):
        for yn in range(max(0, y - radius), min(Y, y + radius + 1)):
            for zn in range(max(0, z - radius), min(Z, z + radius + 1)):
                score = numba.float32(0.0)
                for d in range(D):
                    score += q[b, x, y, z, h, d] * k[b, xn, yn, zn, h, d]
                score *= scale
                m_new = max(m, score)
                correction = math.exp(m - m_new)
                weight = math.exp(score - m_new)
                l = l * correction + weight
                for d in range(D):
                    acc[d] = acc[d] * correction + weight * v[b, xn, yn, zn, h, d]
                m = m_new
    for d in range(D):
        out[b, x, y, z, h, d] = acc[d] / l


@register("neighbourhood_attention", "numba_cuda")
def neighbourhood_attention_numba_cuda(q, k, v, radius=1):
    """numba CUDA neighbourhood attention, v1: a thread per (b, neuron, h). q, k, v: [B, X, Y, Z, H, D] float32."""
    (B, X, Y, Z, H, _), radius, scale, out = _prepare(q, k, v, radius, "numba_cuda", (torch.float32,))
    threads, queries = launch.block_size(), B * X * Y * Z * H
    launch.numba_cuda(_neighbourhood_attention_v1_query_per_thread, launch.grid_for(queries, threads), threads,
        numba_cuda_view(q), numba_cuda_view(k), numba_cuda_view(v), radius, np.float32(scale), numba_cuda_view(out))
    return out


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("neighbourhood_attention.cu")
CUPY_ENTRY_POINTS = ("neighbourhood_attention_query_per_thread",)  # the kernels this file launches


@register("neighbourhood_attention", "cupy")
def neighbourhood_attention_cupy(q, k, v, radius=1):
    """CuPy neighbourhood attention, a thread per query (neighbourhood_attention.cu). q, k, v: [B, X, Y, Z, H, D]
    float32 CUDA -> same shape."""
    (B, X, Y, Z, H, D), radius, scale, out = _prepare(q, k, v, radius, "cupy", (torch.float32,))
    queries, threads = B * X * Y * Z * H, launch.GPU_BLOCK               # any block size works: threads never cooperate
    launch.cupy(CU_SOURCE, "neighbourhood_attention_query_per_thread", launch.grid_for(queries, threads), threads,
                (cupy_view(q), cupy_view(k), cupy_view(v), cupy_view(out),
                 np.int32(B), np.int32(X), np.int32(Y), np.int32(Z), np.int32(H), np.int32(D),
                 np.int32(radius), np.float32(scale)))
    return out


def grid_for(T: int) -> tuple[int, int, int]:
    """A grid X >= Y >= Z of exactly T neurons, as close to a cube as T allows (smallest X + Y + Z):
    9 -> (3, 3, 1), 128 -> (8, 4, 4), 8 -> (2, 2, 2), a prime p -> (p, 1, 1)."""
    triples = []
    for z in range(1, T + 1):                      # z is the smallest side, so z^3 <= T
        if z ** 3 > T:
            break
        if T % z:
            continue
        rest = T // z
        for y in range(z, rest + 1):               # z <= y <= x, so y^2 <= rest
            if y * y > rest:
                break
            if rest % y == 0:
                triples.append((rest // y, y, z))
    return min(triples, key=lambda s: (sum(s), s))


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: T + 1 tokens laid out as a grid
    (`grid_for`: tiny 20 -> 5 x 2 x 2, small 128 -> 8 x 4 x 4), H heads of D, radius 2 (not the default 1)."""
    from kernels.check import random_tensor
    B, T, H, D = shapes["B"], shapes["T"], shapes["H"], shapes["D"]
    X, Y, Z = grid_for(T + 1)
    q, k, v = (random_tensor((B, X, Y, Z, H, D), generator=generator) for _ in range(3))
    return {"neighbourhood_attention": ((q, k, v), {"radius": 2})}
