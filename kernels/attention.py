"""Causal grouped-query attention kernels, with an optional sliding window.

Reference: `refimpl.ops.attention`. q: [B, T, H, D], k and v: [B, S, G, D] -> out: [B, T, H, D].
Query t sits at position p = S - T + t; it reads keys s with lo <= s <= p, where
lo = 0 for full attention and lo = max(0, p - W + 1) with a window of W.
Query head h reads key/value head h // (H / G).

The GPU versions are "one query row at a time, online softmax" (Milakov &
Gimelshein 2018, "Online normalizer calculation for softmax", arXiv:1805.02867;
the idea inside FlashAttention, Dao et al. 2022, arXiv:2205.14135): walk the
keys once, keeping the running max m, the running denominator l and the
running weighted sum of values, rescaling both by exp(m_old - m_new) whenever
the max grows. No [T, S] score matrix is ever stored.

The ladder
    numba       a prange task per block of ROWS_PER_TASK query rows of one (b, h) pair (more
                tasks than pairs when B * H is small), in three passes over the block:
                1. scores along a transposed copy of the keys (K^T, [B, G, D, S], made once), four
                   dimensions per pass over the score row; then the row's max subtracted;
                2. one exp per score, the whole block's scores in one long loop, with a polynomial
                   exp (_exp_nonpositive) that LLVM vectorises;
                3. the output row accumulates the values, four keys per pass.
                Why this beats its first version (a task per pair, one query at a time, a D-long
                dot product per score, libm's exp per key, one key per pass over the output row):
                its inner loops run along contiguous rows from index 0 (indexed from lo instead,
                the same loops did not vectorise), which LLVM turns into full-width SIMD with no
                horizontal sum per score; the exps vectorise instead of being a library call each;
                each load and store of the output row serves four multiply-adds, not one; and with
                fast-math's reassociation left off (NO_REASSOC) the four products are summed before
                the one add into the stored row, so a pass waits on one add of the pass before it,
                not on four chained multiply-adds. A block's rows share one (b, g)'s K^T and V, which
                stay in cache. No [T, S] matrix: the scratch is one block's score rows.
    numba_cuda  v1 (registered): one GPU thread per row, the output row accumulated in a
                thread-local array of MAX_HEAD_DIM floats. Simple; each thread re-reads
                K and V, and neighbouring threads' reads are not coalesced.
    cupy        attention.cu, attention_row_per_thread: the same in CUDA C.
Faster rungs (a warp per row, K/V tiles in shared memory) are the GPU issue's work.
"""

from __future__ import annotations

import functools
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

register("attention", "reference")(ops.attention)

MAX_HEAD_DIM = 256  # size of the per-thread accumulator in the CUDA versions


def _prepare(q, k, v, causal, window, scale, backend, dtypes):
    B, T, H, S, G, D = ops.check_attention_args(q, k, v, causal, window)
    expect_dtype("attention", "q", q, dtypes)
    expect_device("attention", backend, {"q": q, "k": k, "v": v})
    forward_only("attention", q, k, v)
    if backend != "numba" and D > MAX_HEAD_DIM:
        raise ValueError(f"attention: {backend} kernels support head dimension D <= {MAX_HEAD_DIM}, got {D}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    window_arg = 0 if window is None or window >= S else window  # 0 means "no window" inside the kernels
    out = new_output((B, T, H, D), q.dtype, q.device)
    return (B, T, H, S, G, D), scale, window_arg, out


# ---------------------------------------------------------------- numba (CPU)

ROWS_PER_TASK = 32  # query rows per prange task, so there are more tasks than (b, h) pairs when B * H is small
INV_FACTORIAL = np.array([1.0 / math.factorial(i) for i in range(13)])  # e^r's Taylor coefficients, 1 / i!
LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # ln 2 in two parts (fdlibm's)
#: The project's fast-math flags less "reassoc". Each pass of the loops below adds a sum of four products
#: into a row that lives in memory (a score row, an output row), and the next pass needs that row back:
#: written `acc + (four products)` and not reassociated, one add stands between the load and the store;
#: reassociated, LLVM starts the four multiply-adds from the loaded value, a chain four times as long
#: (measured slower). No loop here needs reassoc: the max loop is scalar either way, and the weights are
#: summed four at a time beside the values.
NO_REASSOC = set(NUMBA_FASTMATH) - {"reassoc"}


@numba.njit(fastmath=NO_REASSOC, inline="always", cache=True)
def _key_range(t, T, S, causal, window):
    """Keys [lo, hi) that query row t reads (0 as the window means no window)."""
    p = S - T + t                                       # absolute position of this query
    hi = p + 1 if causal else S
    lo = max(0, p - window + 1) if window > 0 else 0
    return lo, hi


@numba.njit(fastmath=NO_REASSOC, inline="always", cache=True)
def _exp_nonpositive(x):
    """e^x for x <= 0, in plain float64 arithmetic that LLVM vectorises (a call to libm's exp per element
    does not vectorise). e^x = 2^n e^r with n = round(x / ln 2), so |r| <= ln 2 / 2: r = x - n ln 2 with
    ln 2 in two parts, so that n ln 2 loses nothing; e^r from its Taylor series to r^12; 2^n written
    straight into a float64's exponent bits. Relative error under 4e-16 on [-708, 0] (checked against
    mpmath); below -708 it returns e^-708 (about 3e-308); a NaN stays NaN."""
    if x < -708.0:
        x = -708.0
    n = math.floor(x / (LN2_HI + LN2_LO) + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = INV_FACTORIAL[12]
    for i in range(11, -1, -1):                         # Horner's rule
        p = p * r + INV_FACTORIAL[i]
    return p * np.int64((np.int64(n) + 1023) << 52).view(np.float64)


@numba.njit(parallel=True, fastmath=NO_REASSOC, cache=True)
def _attention_rows_cpu(q, k, v, causal, window, scale, out):
    B, T, H, D = q.shape
    S, G = k.shape[1], k.shape[2]
    group = H // G
    k_t = np.empty((B, G, D, S), q.dtype)               # keys transposed: score loops run along keys
    for bg in numba.prange(B * G):
        b, g = bg // G, bg % G
        for s in range(S):
            for d in range(D):
                k_t[b, g, d, s] = k[b, s, g, d]
    rows = min(ROWS_PER_TASK, T)
    blocks = (T + rows - 1) // rows
    for task in numba.prange(B * H * blocks):           # one block of query rows of one (b, h) per task
        pair, block = task // blocks, task % blocks
        b, h = pair // H, pair % H
        g = h // group
        keys = k_t[b, g]                                # [D, S]: the block's rows all reread it from cache
        t0, t1 = block * rows, min(T, block * rows + rows)
        weights = np.empty(rows * S, q.dtype)           # the block's score rows end to end; pass 2 makes
                                                        # them the softmax's (unnormalised) weights
        qs = np.empty(D, q.dtype)
        start = 0
        for t in range(t0, t1):                         # pass 1: scores, less their row's max
            lo, hi = _key_range(t, T, S, causal, window)
            n = hi - lo
            for d in range(D):
                qs[d] = q[b, t, h, d] * scale
            row = weights[start:start + n]              # slices, so inner loops count from 0 and vectorise
            row[:] = 0.0
            for d in range(0, D - D % 4, 4):            # four dimensions per pass over the score row
                q0, q1, q2, q3 = qs[d], qs[d + 1], qs[d + 2], qs[d + 3]
                k0, k1, k2, k3 = keys[d, lo:hi], keys[d + 1, lo:hi], keys[d + 2, lo:hi], keys[d + 3, lo:hi]
                for s in range(n):
                    row[s] = row[s] + (q0 * k0[s] + q1 * k1[s] + q2 * k2[s] + q3 * k3[s])
            for d in range(D - D % 4, D):
                q0, k0 = qs[d], keys[d, lo:hi]
                for s in range(n):
                    row[s] = row[s] + q0 * k0[s]
            m = row[0]
            for s in range(n):
                m = max(m, row[s])
            for s in range(n):
                row[s] -= m
            start += n
        block_scores = weights[:start]                  # pass 2: every exp of the block in one long loop
        for i in range(start):
            block_scores[i] = _exp_nonpositive(block_scores[i])
        start = 0
        for t in range(t0, t1):                         # pass 3: weighted sum of values, into the output row
            lo, hi = _key_range(t, T, S, causal, window)
            n = hi - lo
            w = weights[start:start + n]
            start += n
            acc = out[b, t, h]
            acc[:] = 0.0
            l = 0.0                                     # the softmax's denominator, summed alongside
            for s in range(0, n - n % 4, 4):            # four keys per pass over the output row
                w0, w1, w2, w3 = w[s], w[s + 1], w[s + 2], w[s + 3]
                v0, v1, v2, v3 = v[b, lo + s, g], v[b, lo + s + 1, g], v[b, lo + s + 2, g], v[b, lo + s + 3, g]
                for d in range(D):
                    acc[d] = acc[d] + (w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d])
                l += (w0 + w1) + (w2 + w3)
            for s in range(n - n % 4, n):
                w0, v0 = w[s], v[b, lo + s, g]
                for d in range(D):
                    acc[d] = acc[d] + w0 * v0[d]
                l += w0
            for d in range(D):
                acc[d] /= l


@register("attention", "numba")
def attention_numba(q, k, v, *, causal=True, window=None, scale=None):
    """numba CPU attention. q: [B, T, H, D], k, v: [B, S, G, D], float32 or float64 CPU -> [B, T, H, D]."""
    _, scale, window_arg, out = _prepare(q, k, v, causal, window, scale, "numba", (torch.float32, torch.float64))
    _attention_rows_cpu(numpy_view(q), numpy_view(k), numpy_view(v), bool(causal), window_arg, scale,
                        numpy_view(out))
    return out


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _attention_v1_thread_per_row(q, k, v, causal, window, scale, out):
    B, T, H, D = q.shape
    S, G = k.shape[1], k.shape[2]
    row = cuda.grid(1)
    if row >= B * T * H:
        return
    b, t, h = row // (T * H), (row // H) % T, row % H
    g = h // (H // G)
    p = S - T + t
    hi = p + 1 if causal else S
    lo = max(0, p - window + 1) if window > 0 else 0
    acc = cuda.local.array(MAX_HEAD_DIM, numba.float32)
    for d in range(D):
        acc[d] = 0.0
    m = numba.float32(-math.inf)
    l = numba.float32(0.0)
    for s in range(lo, hi):
        score = numba.float32(0.0)
        for d in range(D):
            score += q[b, t, h, d] * k[b, s, g, d]
        score *= scale
        m_new = max(m, score)
        correction = math.exp(m - m_new)
        weight = math.exp(score - m_new)
        l = l * correction + weight
        for d in range(D):
            acc[d] = acc[d] * correction + weight * v[b, s, g, d]
        m = m_new
    for d in range(D):
        out[b, t, h, d] = acc[d] / l


@register("attention", "numba_cuda")
def attention_numba_cuda(q, k, v, *, causal=True, window=None, scale=None):
    """numba CUDA attention, v1: one thread per query row. q: [B, T, H, D], k, v: [B, S, G, D] float32 -> [B, T, H, D]."""
    (B, T, H, _, _, _), scale, window_arg, out = _prepare(q, k, v, causal, window, scale, "numba_cuda",
                                                         (torch.float32,))
    threads = launch.block_size()
    rows = B * T * H
    launch.numba_cuda(_attention_v1_thread_per_row, launch.grid_for(rows, threads), threads,
        numba_cuda_view(q), numba_cuda_view(k), numba_cuda_view(v), bool(causal), window_arg,
        np.float32(scale), numba_cuda_view(out))
    return out


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("attention.cu")
CUPY_ENTRY_POINTS = ("attention_row_per_thread",)  # the kernels this file launches


@register("attention", "cupy")
def attention_cupy(q, k, v, *, causal=True, window=None, scale=None):
    """CuPy attention, one thread per query row (attention.cu). q: [B, T, H, D], k, v: [B, S, G, D] float32 CUDA -> [B, T, H, D]."""
    (B, T, H, S, G, D), scale, window_arg, out = _prepare(q, k, v, causal, window, scale, "cupy", (torch.float32,))
    rows, threads = B * T * H, launch.GPU_BLOCK
    launch.cupy(CU_SOURCE, "attention_row_per_thread", launch.grid_for(rows, threads), threads,
                (cupy_view(q), cupy_view(k), cupy_view(v), cupy_view(out),
                 np.int32(B), np.int32(T), np.int32(H), np.int32(S), np.int32(G), np.int32(D),
                 np.int32(bool(causal)), np.int32(window_arg), np.float32(scale)))
    return out


# ---------------------------------------------------------------- PyTorch's own, for comparison

TORCH_BUILTIN_NAME = "torch.nn.functional.scaled_dot_product_attention (enable_gqa)"


@functools.cache
def _allowed(T: int, S: int, window: int | None, device: str) -> torch.Tensor:
    # Built once per shape, as a model would build it once per forward and share it across layers.
    return ops.attention_mask(T, S, True, window, device=device)


def torch_builtin(q, k, v, *, causal=True, window=None, scale=None):
    """F.scaled_dot_product_attention in its [B, heads, T, D] layout, GQA via enable_gqa, with this op's
    signature (what the benchmarks and chapter 00 time beside the kernels)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T, S = q.shape[1], k.shape[1]
    if causal and window is None and T == S:
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                               enable_gqa=True)
    else:
        mask = _allowed(T, S, window, q.device.type) if causal else None
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                                               enable_gqa=True)
    return out.transpose(1, 2)


def useful_flops(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, window: int | None = None) -> int:
    """2 D for q.k and 2 D for p.v per allowed (query, key) pair, per head and batch row."""
    B, T, H, D = q.shape
    pairs = int(ops.attention_mask(T, k.shape[1], causal, window).sum())
    return 4 * D * pairs * H * B


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: q [B, T, H, D], k and v [B, T, G, D];
    every keyword away from its default in some case (scale 0.3, a window, not causal)."""
    from kernels.check import random_tensor
    B, T, H, G, D = (shapes[n] for n in "BTHGD")
    q = random_tensor((B, T, H, D), generator=generator)
    k = random_tensor((B, T, G, D), generator=generator)
    v = random_tensor((B, T, G, D), generator=generator)
    return {"attention": ((q, k, v), {"causal": True, "window": None, "scale": 0.3}),
            "attention (sliding window)": ((q, k, v), {"causal": True, "window": shapes["window"], "scale": 0.3}),
            "attention (not causal)": ((q, k, v), {"causal": False, "window": None, "scale": 0.3})}
