"""Gated delta rule kernels: the fused recurrent forward, state in and state out.

Reference: `refimpl.ops.gated_delta_rule` (ground truth: `gated_delta_rule_recurrent`).
    q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], initial_state [B, H, V, K] or None
    -> o [B, T, H, V], final state [B, H, V, K]

The observation every version here uses: row i of the state S (its K entries) evolves on
its own. With alpha = exp(g_t),

    recalled_i = alpha * sum_j S[i, j] k_t[j]
    delta_i    = beta_t (v_t[i] - recalled_i)
    S[i, j]    = alpha * S[i, j] + delta_i k_t[j]          for every j
    o_t[i]     = scale * sum_j S[i, j] q_t[j]

so B * H * V workers can each hold one row of S and walk through time with no
communication at all: two dot products of length K per token.

The ladder
    numba       a CPU thread per (b, h) pair (prange), its V rows one after another, updating
                the output state [V, K] in place (it fits in L1/L2).
    numba_cuda  v1 (registered): one GPU thread per state row (b, h, i); the row of K values
                lives in a thread-local array (registers / local memory), q_t and k_t are
                re-read by every thread of the (b, h) pair (they hit in L1).
    cupy        gated_delta_rule.cu, gated_delta_rule_row_per_thread: the same in CUDA C.
Faster rungs (q_t, k_t staged in shared memory; a warp per row splitting K with shuffles;
chunked tensor-core forms) are the GPU issue's work.
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

register("gated_delta_rule", "reference")(ops.gated_delta_rule)

MAX_KEY_DIM = 256  # length of the per-thread state row in the CUDA versions


def _prepare(q, k, v, g, beta, initial_state, scale, backend, dtypes):
    B, T, H, K, V = ops.check_gated_delta_rule_args(q, k, v, g, beta, initial_state)
    expect_dtype("gated_delta_rule", "q", q, dtypes)
    tensors = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    expect_device("gated_delta_rule", backend, tensors)
    forward_only("gated_delta_rule", *tensors.values())
    if backend != "numba" and K > MAX_KEY_DIM:
        raise ValueError(f"gated_delta_rule: {backend} kernels support key dimension K <= {MAX_KEY_DIM}, got {K}")
    scale = K ** -0.5 if scale is None else float(scale)
    out = new_output((B, T, H, V), q.dtype, q.device)
    state = new_output((B, H, V, K), q.dtype, q.device)     # filled with the initial state, then updated in place
    if initial_state is None:
        state.zero_()
    else:
        state.copy_(initial_state)
    return (B, T, H, K, V), scale, out, state


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _gated_delta_rule_cpu(q, k, v, g, beta, scale, out, state):
    B, T, H, K = q.shape
    V = v.shape[3]
    zero = q.dtype.type(0.0)                               # accumulate in the inputs' precision (vectorises)
    for pair in numba.prange(B * H):
        b, h = pair // H, pair % H
        S = state[b, h]                                    # [V, K], updated in place
        for t in range(T):
            alpha = q.dtype.type(math.exp(g[b, t, h]))
            for i in range(V):
                recalled = zero
                for j in range(K):
                    recalled += S[i, j] * k[b, t, h, j]
                delta = beta[b, t, h] * (v[b, t, h, i] - alpha * recalled)
                read = zero
                for j in range(K):
                    S[i, j] = alpha * S[i, j] + delta * k[b, t, h, j]
                    read += S[i, j] * q[b, t, h, j]
                out[b, t, h, i] = scale * read


@register("gated_delta_rule", "numba")
def gated_delta_rule_numba(q, k, v, g, beta, initial_state=None, scale=None):
    """numba CPU gated delta rule, float32/float64 CPU tensors. Returns (o [B, T, H, V], state [B, H, V, K])."""
    _, scale, out, state = _prepare(q, k, v, g, beta, initial_state, scale, "numba", (torch.float32, torch.float64))
    _gated_delta_rule_cpu(numpy_view(q), numpy_view(k), numpy_view(v), numpy_view(g), numpy_view(beta),
                          scale, numpy_view(out), numpy_view(state))
    return out, state


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _gated_delta_rule_v1_row_per_thread(q, k, v, g, beta, scale, out, state):
    B, T, H, K = q.shape
    V = v.shape[3]
    row = cuda.grid(1)
    if row >= B * H * V:
        return
    b, h, i = row // (H * V), (row // V) % H, row % V
    S = cuda.local.array(MAX_KEY_DIM, numba.float32)       # this thread's row of the state
    for j in range(K):
        S[j] = state[b, h, i, j]
    for t in range(T):
        alpha = math.exp(g[b, t, h])
        recalled = numba.float32(0.0)
        for j in range(K):
            recalled += S[j] * k[b, t, h, j]
        delta = beta[b, t, h] * (v[b, t, h, i] - alpha * recalled)
        read = numba.float32(0.0)
        for j in range(K):
            S[j] = alpha * S[j] + delta * k[b, t, h, j]
            read += S[j] * q[b, t, h, j]
        out[b, t, h, i] = scale * read
    for j in range(K):
        state[b, h, i, j] = S[j]


@register("gated_delta_rule", "numba_cuda")
def gated_delta_rule_numba_cuda(q, k, v, g, beta, initial_state=None, scale=None):
    """numba CUDA gated delta rule (v1: a thread per state row), float32. Returns (o [B, T, H, V], state [B, H, V, K])."""
    (B, T, H, K, V), scale, out, state = _prepare(q, k, v, g, beta, initial_state, scale, "numba_cuda",
                                                  (torch.float32,))
    threads, rows = launch.block_size(), B * H * V
    launch.numba_cuda(_gated_delta_rule_v1_row_per_thread, launch.grid_for(rows, threads), threads,
        numba_cuda_view(q), numba_cuda_view(k), numba_cuda_view(v), numba_cuda_view(g), numba_cuda_view(beta),
        np.float32(scale), numba_cuda_view(out), numba_cuda_view(state))
    return out, state


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("gated_delta_rule.cu")
CUPY_ENTRY_POINTS = ("gated_delta_rule_row_per_thread",)  # the kernels this file launches


@register("gated_delta_rule", "cupy")
def gated_delta_rule_cupy(q, k, v, g, beta, initial_state=None, scale=None):
    """CuPy gated delta rule (a thread per state row), float32 CUDA. Returns (o [B, T, H, V], state [B, H, V, K])."""
    (B, T, H, K, V), scale, out, state = _prepare(q, k, v, g, beta, initial_state, scale, "cupy", (torch.float32,))
    rows, threads = B * H * V, launch.GPU_BLOCK                            # any block size works: threads never cooperate
    launch.cupy(CU_SOURCE, "gated_delta_rule_row_per_thread", launch.grid_for(rows, threads), threads,
                (cupy_view(q), cupy_view(k), cupy_view(v), cupy_view(g), cupy_view(beta), cupy_view(out),
                 cupy_view(state), np.int32(B), np.int32(T), np.int32(H), np.int32(K), np.int32(V), np.float32(scale)))
    return out, state


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: B, T, H heads of K = D, V != K, a
    non-zero starting state, scale 0.3 (not K^-1/2); alpha = e^g in (e^-1, 1], and on every fourth token
    strong decay (alpha < e^-4), where a kernel that mishandles the gate is far off."""
    from kernels.check import random_tensor
    B, T, H, K, V = shapes["B"], shapes["T"], shapes["H"], shapes["D"], shapes["V"]
    q = random_tensor((B, T, H, K), generator=generator)
    k = torch.nn.functional.normalize(random_tensor((B, T, H, K), generator=generator), dim=-1)
    v = random_tensor((B, T, H, V), generator=generator)
    g = -torch.rand(B, T, H, generator=generator)
    g[:, ::4] -= 4.0
    beta = torch.rand(B, T, H, generator=generator)
    state = random_tensor((B, H, V, K), generator=generator, scale=0.1)
    return {"gated_delta_rule": ((q, k, v, g, beta), {"initial_state": state, "scale": 0.3})}
