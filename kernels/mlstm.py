"""Stabilised mLSTM kernels (xLSTM, Beck et al. 2024): the recurrent forward, state in and state out.

Reference: `refimpl.ops.mlstm` (= `mlstm_recurrent(..., stabilised=True)`, the step loop).
    q, k [B, T, H, Dk], v [B, T, H, Dv], i_pre, f_pre [B, T, H] (gate pre-activations i~, f~),
    initial_state (C [B, H, Dv, Dk], n [B, H, Dk], m [B, H]) or None
    -> h [B, T, H, Dv], final state (C, n, m)
Keys are scaled by 1/sqrt(Dk). Per (b, h) pair and token, with the stabiliser m:

    m_t    = max(f~_t + m_{t-1}, i~_t)
    i'_t   = exp(i~_t - m_t),   f'_t = exp(f~_t + m_{t-1} - m_t)                   (both <= 1)
    C[i,:] = f'_t C[i,:] + i'_t v_t[i] k_t          n = f'_t n + i'_t k_t
    h_t[i] = (C[i,:] . q_t) / max(|n . q_t|, exp(-m_t))

The observation every version here uses: given the scalar gates, row i of C (its Dk values)
evolves on its own. The normaliser n (Dk values) and the stabiliser m (one scalar) are shared by
the rows of a head, but they depend only on k, q and the gates, so each worker that owns a row
can recompute them itself: n costs the same Dk work per token as a row of C. So B * H * Dv
workers walk through time with no communication at all, each doing ~3 dot products of length Dk
per token (n . q, the row update, row . q).

One hazard the GPU versions avoid: every worker of a pair must *start* from the same n and m,
but only one of them (row 0) writes the final n and m back. Were n and m updated in place, row 0
could finish (its block done) before a row of the same pair in a later block had read the
starting values. So the starting n, m are read from the inputs (or zeros) and the final ones go
to separate outputs; C is updated in place, since each row of it has exactly one owner.

The ladder
    numba       a CPU thread per (b, h) pair (prange): m, the gates and n updated once per token,
                then the Dv rows of C one after another, updated in place in the output state.
    numba_cuda  v1 (registered): one GPU thread per (b, h, i) row; the row of C and its own copy
                of n live in thread-local arrays of MAX_HEAD_DIM floats (local memory); q_t, k_t
                are re-read by every thread of the pair (they hit in L1). Thread i == 0 writes
                n and m back.
    cupy        mlstm.cu, mlstm_row_per_thread: the same in CUDA C.
Faster rungs (q_t, k_t and the n . q_t product shared through shared memory by a block that owns a
whole head; the chunkwise-parallel form on tensor cores) are the GPU issue's work.
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

register("mlstm", "reference")(ops.mlstm)

MAX_HEAD_DIM = 128  # length of the per-thread C row and n vector in the CUDA versions (bounds Dk)


def _prepare(q, k, v, i_pre, f_pre, initial_state, backend, dtypes):
    """Check the arguments; allocate h and the final state. Returns
    (sizes, h, C [filled with the starting C, updated in place], n0, m0 [starting n, m: read only],
    n, m [the final n, m: written by the kernel])."""
    B, T, H, Dk, Dv = ops.check_mlstm_args(q, k, v, i_pre, f_pre, initial_state)
    expect_dtype("mlstm", "q", q, dtypes)
    tensors = {"q": q, "k": k, "v": v, "i_pre": i_pre, "f_pre": f_pre}
    if initial_state is not None:
        tensors.update(zip(("initial C", "initial n", "initial m"), initial_state))
    for name, t in tensors.items():                        # one precision throughout: no silent casts
        if t.dtype != q.dtype:
            raise ValueError(f"mlstm: {name} must match q's dtype {str(q.dtype).replace('torch.', '')}, "
                             f"got {str(t.dtype).replace('torch.', '')}")
    expect_device("mlstm", backend, tensors)
    forward_only("mlstm", *tensors.values())
    if backend != "numba" and Dk > MAX_HEAD_DIM:
        raise ValueError(f"mlstm: {backend} kernels support key dimension Dk <= {MAX_HEAD_DIM}, got {Dk}")
    h = new_output((B, T, H, Dv), q.dtype, q.device)
    C = new_output((B, H, Dv, Dk), q.dtype, q.device)
    n = new_output((B, H, Dk), q.dtype, q.device)
    m = new_output((B, H), q.dtype, q.device)
    if initial_state is None:
        C.zero_()
        n0, m0 = q.new_zeros(B, H, Dk), q.new_zeros(B, H)
    else:
        C.copy_(initial_state[0])
        n0, m0 = initial_state[1], initial_state[2]
    return (B, T, H, Dk, Dv), h, C, n0, m0, n, m


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _mlstm_cpu(q, k, v, i_pre, f_pre, key_scale, n0, m0, h_out, C, n, m):
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    zero = q.dtype.type(0.0)                               # accumulate in the inputs' precision (vectorises)
    for pair in numba.prange(B * H):
        b, head = pair // H, pair % H
        C_bh, n_bh = C[b, head], n[b, head]                # [Dv, Dk] and [Dk], updated in place
        for j in range(Dk):
            n_bh[j] = n0[b, head, j]
        m_prev = m0[b, head]
        for t in range(T):
            # the stabiliser and the two gates, both <= 1 (the larger of them is exactly 1)
            i_t = i_pre[b, t, head]
            f_plus_m = f_pre[b, t, head] + m_prev
            m_t = i_t if i_t > f_plus_m else f_plus_m
            i_gate = q.dtype.type(math.exp(i_t - m_t))
            f_gate = q.dtype.type(math.exp(f_plus_m - m_t))
            floor = q.dtype.type(math.exp(-m_t))             # the max(., 1) in units of e^{-m}
            m_prev = m_t
            # normaliser, once per token for the whole head
            nq = zero
            for j in range(Dk):
                n_bh[j] = f_gate * n_bh[j] + i_gate * (key_scale * k[b, t, head, j])
                nq += n_bh[j] * q[b, t, head, j]
            abs_nq = abs(nq)
            denominator = floor if abs_nq < floor else abs_nq    # a NaN stays NaN, as torch.maximum keeps it
            # the rows of C: write v_t[i] k_t into each, read it with q_t
            for i in range(Dv):
                write = i_gate * v[b, t, head, i]
                read = zero
                for j in range(Dk):
                    C_bh[i, j] = f_gate * C_bh[i, j] + write * (key_scale * k[b, t, head, j])
                    read += C_bh[i, j] * q[b, t, head, j]
                h_out[b, t, head, i] = read / denominator
        m[b, head] = m_prev


@register("mlstm", "numba")
def mlstm_numba(q, k, v, i_pre, f_pre, initial_state=None):
    """numba CPU stabilised mLSTM, float32/float64 CPU tensors. Returns (h [B, T, H, Dv], (C, n, m))."""
    (B, T, H, Dk, Dv), h, C, n0, m0, n, m = _prepare(q, k, v, i_pre, f_pre, initial_state, "numba",
                                                      (torch.float32, torch.float64))
    q_view = numpy_view(q)
    key_scale = q_view.dtype.type(1.0 / math.sqrt(Dk))      # a scalar of the inputs' dtype (no float64 promotion)
    _mlstm_cpu(q_view, numpy_view(k), numpy_view(v), numpy_view(i_pre), numpy_view(f_pre), key_scale,
               numpy_view(n0), numpy_view(m0), numpy_view(h), numpy_view(C), numpy_view(n), numpy_view(m))
    return h, (C, n, m)


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _mlstm_v1_row_per_thread(q, k, v, i_pre, f_pre, key_scale, n0, m0, h_out, C, n, m):
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    row = cuda.grid(1)
    if row >= B * H * Dv:
        return
    b, head, i = row // (H * Dv), (row // Dv) % H, row % Dv
    C_row = cuda.local.array(MAX_HEAD_DIM, numba.float32)   # this thread's row of C
    n_own = cuda.local.array(MAX_HEAD_DIM, numba.float32)   # this thread's copy of the head's n
    for j in range(Dk):
        C_row[j] = C[b, head, i, j]
        n_own[j] = n0[b, head, j]
    m_prev = m0[b, head]
    for t in range(T):
        i_t = i_pre[b, t, head]
        f_plus_m = f_pre[b, t, head] + m_prev
        m_t = i_t if i_t > f_plus_m else f_plus_m
        i_gate = math.exp(i_t - m_t)
        f_gate = math.exp(f_plus_m - m_t)
        floor = math.exp(-m_t)
        m_prev = m_t
        write = i_gate * v[b, t, head, i]
        nq = numba.float32(0.0)
        read = numba.float32(0.0)
        for j in range(Dk):                                  # n and the row in one pass over k_t, q_t
            k_j = key_scale * k[b, t, head, j]
            q_j = q[b, t, head, j]
            n_own[j] = f_gate * n_own[j] + i_gate * k_j
            nq += n_own[j] * q_j
            C_row[j] = f_gate * C_row[j] + write * k_j
            read += C_row[j] * q_j
        abs_nq = abs(nq)
        h_out[b, t, head, i] = read / (floor if abs_nq < floor else abs_nq)
    for j in range(Dk):
        C[b, head, i, j] = C_row[j]
    if i == 0:                                               # every thread of the pair holds the same n, m
        for j in range(Dk):
            n[b, head, j] = n_own[j]
        m[b, head] = m_prev


@register("mlstm", "numba_cuda")
def mlstm_numba_cuda(q, k, v, i_pre, f_pre, initial_state=None):
    """numba CUDA stabilised mLSTM (v1: a thread per row of C), float32. Returns (h [B, T, H, Dv], (C, n, m))."""
    (B, T, H, Dk, Dv), h, C, n0, m0, n, m = _prepare(q, k, v, i_pre, f_pre, initial_state, "numba_cuda",
                                                      (torch.float32,))
    threads, rows = launch.block_size(), B * H * Dv
    launch.numba_cuda(_mlstm_v1_row_per_thread, launch.grid_for(rows, threads), threads,
        numba_cuda_view(q), numba_cuda_view(k), numba_cuda_view(v), numba_cuda_view(i_pre), numba_cuda_view(f_pre),
        np.float32(1.0 / math.sqrt(Dk)), numba_cuda_view(n0), numba_cuda_view(m0),
        numba_cuda_view(h), numba_cuda_view(C), numba_cuda_view(n), numba_cuda_view(m))
    return h, (C, n, m)


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("mlstm.cu")
CUPY_ENTRY_POINTS = ("mlstm_row_per_thread",)  # the kernels this file launches


@register("mlstm", "cupy")
def mlstm_cupy(q, k, v, i_pre, f_pre, initial_state=None):
    """CuPy stabilised mLSTM (a thread per row of C), float32 CUDA. Returns (h [B, T, H, Dv], (C, n, m))."""
    (B, T, H, Dk, Dv), h, C, n0, m0, n, m = _prepare(q, k, v, i_pre, f_pre, initial_state, "cupy",
                                                      (torch.float32,))
    rows, threads = B * H * Dv, launch.GPU_BLOCK                           # any block size works: threads never cooperate
    launch.cupy(CU_SOURCE, "mlstm_row_per_thread", launch.grid_for(rows, threads), threads,
                (cupy_view(q), cupy_view(k), cupy_view(v), cupy_view(i_pre), cupy_view(f_pre), cupy_view(n0),
                 cupy_view(m0), cupy_view(h), cupy_view(C), cupy_view(n), cupy_view(m),
                 np.int32(B), np.int32(T), np.int32(H), np.int32(Dk), np.int32(Dv), np.float32(1.0 / math.sqrt(Dk))))
    return h, (C, n, m)


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: B, T, H heads of Dk = D, Dv = V, gates
    i~ ~ N(0, 3^2) and f~ ~ N(2, 1), a non-zero starting state (m uniform in [-1, 1], n and C small).

    Keys, queries and the starting n share a mean direction (2 along all-ones; the query's sign flips
    at random per token), so |n . q| stays well away from zero. With zero-mean draws, n . q passes
    near zero somewhere among thousands of tokens, the division by it amplifies rounding by
    |n| |q| / |n . q| (10^3 - 10^4 measured at the `small` size), and no float32 evaluation, the
    reference's included, then meets the float32 tolerance: a property of the inputs, not the kernel.
    """
    from kernels.check import random_tensor
    B, T, H, Dk, Dv = shapes["B"], shapes["T"], shapes["H"], shapes["D"], shapes["V"]
    sign = 2.0 * torch.randint(0, 2, (B, T, H, 1), generator=generator) - 1.0
    q = random_tensor((B, T, H, Dk), generator=generator) + 2.0 * sign
    k = random_tensor((B, T, H, Dk), generator=generator) + 2.0
    v = random_tensor((B, T, H, Dv), generator=generator)
    i_pre = random_tensor((B, T, H), generator=generator, scale=3.0)
    f_pre = 2.0 + random_tensor((B, T, H), generator=generator)
    C = random_tensor((B, H, Dv, Dk), generator=generator, scale=0.1)
    n = 0.1 * (random_tensor((B, H, Dk), generator=generator) + 2.0)
    m = 2.0 * torch.rand(B, H, generator=generator) - 1.0
    # The floor: in the first half of the batch the input gate is shut (i~ = -8) and the memory forgets
    # slowly from m = 0, so |n . q| stays far below e^{-m_t} >= 1 and max(|n . q|, e^{-m_t}) takes the floor
    # at every step; the second half is the first case's regime. A kernel without the floor fails here.
    shut = torch.arange(B) < (B + 1) // 2
    i_floor = torch.where(shut[:, None, None], torch.full_like(i_pre, -8.0), i_pre)
    f_floor = torch.where(shut[:, None, None], torch.full_like(f_pre, -0.05), f_pre)
    m_floor = torch.where(shut[:, None], torch.zeros_like(m), m)
    return {"mlstm": ((q, k, v, i_pre, f_pre), {"initial_state": (C, n, m)}),
            "mlstm (the floor)": ((q, k, v, i_floor, f_floor), {"initial_state": (C, 0.01 * n, m_floor)})}
