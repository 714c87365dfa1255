"""Fast-weight memory kernels: the fused recurrent forward, state in and state out.

Reference: `refimpl.ops.fast_weight_memory` (ground truth: `fast_weight_memory_recurrent`).
    q, k [B, T, H, Dk], v [B, T, H, Dv], gate [B, T, H] (pre-sigmoid), initial_state [B, H, Dk, Dv] or None
    -> reads [B, T, H, Dv], final W [B, H, Dk, Dv]

Per token, read first, then decay and write, with a_t = strength * sigmoid(gate_t):

    r_t = W^T q_t
    W   = decay * W + a_t k_t v_t^T

The observation every version here uses: column j of W (its Dk entries) evolves on its own.

    r_t[j]  = sum_i W[i, j] q_t[i]
    W[:, j] = decay * W[:, j] + (a_t v_t[j]) k_t

so B * H * Dv workers can each hold one column of W and walk through time with no
communication at all: one dot product and one scaled add of length Dk per token.

The ladder
    numba       a CPU thread per (b, h) pair (prange), updating the output memory [Dk, Dv] in
                place: one pass over W per token does both the read and the write, row by row.
                The inner loop runs along j over contiguous per-thread arrays (this token's read
                and its value row, copied in and out once per token), so LLVM vectorises it. Its
                first version accumulated straight into a strided view of the output reads and did
                not: 3.4x its step loop at the `small` example shapes, against 17x now.
    numba_cuda  v1 (registered): one GPU thread per column (b, h, j); the column of Dk values
                lives in a thread-local array (registers / local memory), q_t and k_t are
                re-read by every thread of the (b, h) pair (they hit in L1), and neighbouring
                threads read v_t[j] and write r_t[j] at neighbouring addresses (coalesced).
    cupy        fast_weight_memory.cu, fast_weight_column_per_thread: the same in CUDA C.
Faster rungs (q_t, k_t staged in shared memory; the chunked form of
`refimpl.ops.fast_weight_memory_parallel` on tensor cores) are the GPU issue's work.
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

register("fast_weight_memory", "reference")(ops.fast_weight_memory)

MAX_KEY_DIM = 128  # length of the per-thread column of W in the CUDA versions


def _prepare(q, k, v, gate, decay, strength, initial_state, backend, dtypes):
    B, T, H, Dk, Dv = ops.check_fast_weight_args(q, k, v, gate, initial_state)
    if min(B, T, H, Dk, Dv) < 1:
        raise ValueError(f"fast_weight_memory: every size must be >= 1, got B={B}, T={T}, H={H}, Dk={Dk}, Dv={Dv}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"fast_weight_memory: decay must be in [0, 1], got {decay}")
    tensors = {"q": q, "k": k, "v": v, "gate": gate}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    for name, t in tensors.items():                        # one dtype for all: the kernels compile for one
        expect_dtype("fast_weight_memory", name, t, (q.dtype,) if name != "q" else dtypes)
    if backend != "numba" and Dk > MAX_KEY_DIM:
        raise ValueError(f"fast_weight_memory: {backend} kernels support key dimension Dk <= {MAX_KEY_DIM}, got {Dk}")
    expect_device("fast_weight_memory", backend, tensors)
    forward_only("fast_weight_memory", *tensors.values())
    reads = new_output((B, T, H, Dv), q.dtype, q.device)
    W = new_output((B, H, Dk, Dv), q.dtype, q.device)      # filled with the initial state, then updated in place
    if initial_state is None:
        W.zero_()
    else:
        W.copy_(initial_state)
    return (B, T, H, Dk, Dv), reads, W


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _fast_weight_memory_cpu(q, k, v, gate, decay, strength, reads, W):
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    one = q.dtype.type(1.0)                                # work in the inputs' precision (vectorises)
    decay, strength = q.dtype.type(decay), q.dtype.type(strength)
    for pair in numba.prange(B * H):
        b, h = pair // H, pair % H
        M = W[b, h]                                        # [Dk, Dv], updated in place
        read = np.empty(Dv, dtype=q.dtype)                 # this token's read, and its value row: contiguous
        value = np.empty(Dv, dtype=q.dtype)                # copies, so the loops over j vectorise
        for t in range(T):
            a = strength * q.dtype.type(one / (one + math.exp(-gate[b, t, h])))   # strength * sigmoid(gate)
            for j in range(Dv):
                read[j] = 0.0
                value[j] = v[b, t, h, j]
            for i in range(Dk):                            # one pass over W: read row i, then rewrite it
                qi, aki = q[b, t, h, i], a * k[b, t, h, i]
                row = M[i]
                for j in range(Dv):
                    read[j] += row[j] * qi                 # r_t = W^T q_t, with W before this token's write
                    row[j] = decay * row[j] + aki * value[j]
            for j in range(Dv):
                reads[b, t, h, j] = read[j]


@register("fast_weight_memory", "numba")
def fast_weight_memory_numba(q, k, v, gate, decay=0.95, strength=0.1, initial_state=None):
    """numba CPU fast-weight memory, float32/float64 CPU tensors. Returns (reads [B, T, H, Dv], W [B, H, Dk, Dv])."""
    _, reads, W = _prepare(q, k, v, gate, decay, strength, initial_state, "numba", (torch.float32, torch.float64))
    _fast_weight_memory_cpu(numpy_view(q), numpy_view(k), numpy_view(v), numpy_view(gate), float(decay),
                            float(strength), numpy_view(reads), numpy_view(W))
    return reads, W


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _fast_weight_memory_v1_column_per_thread(q, k, v, gate, decay, strength, reads, W):
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    column = cuda.grid(1)
    if column >= B * H * Dv:
        return
    b, h, j = column // (H * Dv), (column // Dv) % H, column % Dv
    w = cuda.local.array(MAX_KEY_DIM, numba.float32)       # this thread's column of W
    for i in range(Dk):
        w[i] = W[b, h, i, j]
    for t in range(T):
        read = numba.float32(0.0)
        for i in range(Dk):
            read += w[i] * q[b, t, h, i]                   # read before writing
        reads[b, t, h, j] = read
        a = strength * (numba.float32(1.0) / (numba.float32(1.0) + math.exp(-gate[b, t, h])))  # strength * sigmoid
        av = a * v[b, t, h, j]                             # this column's share of the write a_t v_t k_t^T
        for i in range(Dk):
            w[i] = decay * w[i] + av * k[b, t, h, i]
    for i in range(Dk):
        W[b, h, i, j] = w[i]


@register("fast_weight_memory", "numba_cuda")
def fast_weight_memory_numba_cuda(q, k, v, gate, decay=0.95, strength=0.1, initial_state=None):
    """numba CUDA fast-weight memory (v1: a thread per column of W), float32.
    Returns (reads [B, T, H, Dv], W [B, H, Dk, Dv])."""
    (B, T, H, Dk, Dv), reads, W = _prepare(q, k, v, gate, decay, strength, initial_state, "numba_cuda",
                                           (torch.float32,))
    threads, columns = launch.block_size(), B * H * Dv
    launch.numba_cuda(_fast_weight_memory_v1_column_per_thread, launch.grid_for(columns, threads), threads,
        numba_cuda_view(q), numba_cuda_view(k), numba_cuda_view(v), numba_cuda_view(gate), np.float32(decay),
        np.float32(strength), numba_cuda_view(reads), numba_cuda_view(W))
    return reads, W


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("fast_weight_memory.cu")
CUPY_ENTRY_POINTS = ("fast_weight_column_per_thread",)  # the kernels this file launches


@register("fast_weight_memory", "cupy")
def fast_weight_memory_cupy(q, k, v, gate, decay=0.95, strength=0.1, initial_state=None):
    """CuPy fast-weight memory (a thread per column of W), float32 CUDA.
    Returns (reads [B, T, H, Dv], W [B, H, Dk, Dv])."""
    (B, T, H, Dk, Dv), reads, W = _prepare(q, k, v, gate, decay, strength, initial_state, "cupy", (torch.float32,))
    columns, threads = B * H * Dv, launch.GPU_BLOCK                        # any block size works: threads never cooperate
    launch.cupy(CU_SOURCE, "fast_weight_column_per_thread", launch.grid_for(columns, threads), threads,
                (cupy_view(q), cupy_view(k), cupy_view(v), cupy_view(gate), cupy_view(reads), cupy_view(W),
                 np.int32(B), np.int32(T), np.int32(H), np.int32(Dk), np.int32(Dv), np.float32(decay),
                 np.float32(strength)))
    return reads, W


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: B, T, H heads of Dk = D, Dv = V != Dk,
    a non-zero memory to start from, gates spread over the sigmoid's range, and decay 0.6 and strength 0.3
    (not the defaults 0.95 and 0.1): strong decay, so a kernel ignoring either is far off."""
    from kernels.check import random_tensor
    B, T, H, Dk, Dv = shapes["B"], shapes["T"], shapes["H"], shapes["D"], shapes["V"]
    q = random_tensor((B, T, H, Dk), generator=generator)
    k = random_tensor((B, T, H, Dk), generator=generator)
    v = random_tensor((B, T, H, Dv), generator=generator)
    gate = random_tensor((B, T, H), generator=generator, scale=3.0)
    state = random_tensor((B, H, Dk, Dv), generator=generator, scale=0.1)
    return {"fast_weight_memory": ((q, k, v, gate), {"decay": 0.6, "strength": 0.3, "initial_state": state})}
