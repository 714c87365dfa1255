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
    numba       a CPU thread per (b, h) pair (prange), its queries one after another in two
                passes over the keys: scores and their max into a scratch row, then one exp
                per key (the online form needs two). The output row is the accumulator;
                fastmath lets LLVM vectorise the D-long loops.
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

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _attention_rows_cpu(q, k, v, causal, window, scale, out):
    B, T, H, D = q.shape
    S, G = k.shape[1], k.shape[2]
    group = H // G
    for pair in numba.prange(B * H):                    # one (batch, head) pair per task
        b, h = pair // H, pair % H
        g = h // group
        scores = np.empty(S, dtype=q.dtype)             # scratch, reused by every query of the pair
        zero = q.dtype.type(0.0)                        # accumulate in the inputs' precision (vectorises)
        for t in range(T):
            p = S - T + t                               # absolute position of this query
            hi = p + 1 if causal else S                 # keys [lo, hi)
            lo = max(0, p - window + 1) if window > 0 else 0
            m = -np.inf
            for s in range(lo, hi):                     # pass 1: scores and their max
                score = zero
                for d in range(D):
                    score += q[b, t, h, d] * k[b, s, g, d]
                scores[s] = score * scale
                m = max(m, scores[s])
            acc = out[b, t, h]                          # the output row doubles as the accumulator
            acc[:] = 0.0
            l = 0.0
            for s in range(lo, hi):                     # pass 2: one exp per key, weighted sum of values
                weight = math.exp(scores[s] - m)
                l += weight
                for d in range(D):
                    acc[d] += weight * v[b, s, g, d]
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
